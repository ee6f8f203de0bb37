"""predict.py at scale on this machine (a script, not a test): prints each figure with the CPU it ran on.

  python bench/scale_bench.py                       # all four parts, a few minutes on 2 cores
  python bench/scale_bench.py --parts resume,rss    # some of them
  python bench/scale_bench.py --parts decode --n_photos 200 --rate_model resnet50   # the 12 MP rate, a heavier model

Parts:
  resume  2,000 320x240 JPEGs: one uninterrupted run (the reference), the same command killed with SIGKILL once about
          half of the rows are on disk, then --resume: each image once, the same rows, and the resumed part's
          time against the whole run's; then torchrun with 2 processes: the same rows as one process.
  decode  --n_photos 12-megapixel JPEGs (4000x3000, quality 90, made from the photos skimage and matplotlib ship,
          and the camera photos among Debian's wallpapers where installed (WALLPAPER_PHOTOS), upscaled with a little
          grain) and the same photos resized to a 300 px short side: predict.py's rate on
          each (reduced-scale JPEG decode), its top-1 agreement with a full decode, and a plain one-process loop
          over the 12 MP list (full decode, forward, write) as the baseline. EfficientNet-Lite0 with its ImageNet
          classifier (1000 classes; weights from its pip package). One core's work per image (decode at each
          scale, forward) gives the share the 12 MP rate reaches when both runs keep every core busy; a control
          (torchvision's own tensor
          resize against Pillow's, on the same full decode) says how much the set's near ties move anyway.
          --rate_model resnet50: the rates and work only, with that torchvision model (random weights).
  rss     peak resident memory of predict.py over --file_list lists of 10,000 and 100,000 lines (32 px PNGs, each
          file listed many times), a SqueezeNet 1.1 at 32 px with random weights.
"""

import csv
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import data_loader as dl  # noqa: E402
import efficientnet_lite  # noqa: E402
import model_loader as ml  # noqa: E402
import prediction_output  # noqa: E402
from cli import ArgumentParser  # noqa: E402
from timed import agreement, read_rows, run  # noqa: E402

PREDICT = [sys.executable, str(ROOT / "predict.py")]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--parts", default="resume,decode,rss", help="comma-separated: resume, decode, rss")
    p.add_argument("--work_dir", default=str(ROOT / "data" / "scale_bench"), help="images and runs (kept)")
    p.add_argument("--n_images", type=int, default=2000, help="images of the resume part")
    p.add_argument("--n_photos", type=int, default=48, help="12 MP JPEGs of the decode part")
    p.add_argument(
        "--rate_model",
        default=None,
        help="decode part: only the rates, with this torchvision model "
        "(random weights) instead of EfficientNet-Lite0's ImageNet one, e.g. resnet50",
    )
    p.add_argument("--rss_counts", default="10000,100000", help="list lengths of the rss part")
    p.add_argument("--rss_files", type=int, default=500, help="distinct 32 px PNGs the rss part's lists repeat")
    p.add_argument(
        "--plain_loop",
        nargs=3,
        metavar=("MODEL", "LIST", "OUT"),
        default=None,
        help="run only the baseline loop (the decode part starts it as a process of its own)",
    )
    return p.parse_args(argv)


def cpu_line():
    """The CPU the figures come from: its model name, cores, and whether it has bf16 instructions."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    bf16 = "yes" if " avx512_bf16" in info else "no"
    return f"{name}, {os.cpu_count()} cores, avx512_bf16 {bf16}, torch {torch.__version__}"


def checkpoint(path, name, classes, input_size, state=None):
    """A predict.py checkpoint of torchvision's `name` (random weights unless `state`)."""
    model = (
        efficientnet_lite.build(len(classes))
        if name == efficientnet_lite.NAME
        else ml.make_model(name, num_classes=len(classes))
    )
    if state is not None:
        model.load_state_dict(state)
    defaults = ml.model_defaults(name)
    ckpt = ml.make_checkpoint(
        model.eval(),
        name,
        classes,
        input_size,
        dl.default_resize(input_size),
        defaults["mean"],
        defaults["std"],
        0,
        {},
        {},
    )
    ml.save_checkpoint(ckpt, path)
    return path


# camera photos (1.3-4 MP) among the desktop wallpapers of the Debian packages mate-backgrounds and
# plasma-workspace-wallpapers, used when installed: `apt-get install mate-backgrounds plasma-workspace-wallpapers`
WALLPAPER_PHOTOS = [
    f"/usr/share/backgrounds/mate/nature/{n}.jpg"
    for n in (
        "Aqua",
        "Blinds",
        "Dune",
        "FreshFlower",
        "Garden",
        "GreenMeadow",
        "LadyBird",
        "RainDrops",
        "Storm",
        "TwoWings",
        "Wood",
        "YellowFlower",
    )
] + [
    f"/usr/share/wallpapers/{n}/contents/images/2560x1600.jpg"
    for n in (
        "BytheWater",
        "ColdRipple",
        "ColorfulCups",
        "DarkestHour",
        "EveningGlow",
        "FallenLeaf",
        "Grey",
        "Kite",
        "OneStandsOut",
        "Path",
        "summer_1am",
    )
]


def photos():
    """The real photos shipped with skimage and matplotlib, and the wallpapers' photos where installed, as RGB
    images."""
    import matplotlib
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    names = [
        "astronaut.png",
        "chelsea.png",
        "coffee.png",
        "rocket.jpg",
        "motorcycle_left.png",
        "hubble_deep_field.jpg",
        "retina.jpg",
        "horse.png",
        "brick.png",
        "grass.png",
        "gravel.png",
        "color.png",
    ]
    found = [folder / n for n in names if (folder / n).is_file()]
    found.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    found += [Path(p) for p in WALLPAPER_PHOTOS]
    return [dl.load_rgb(f) for f in found if f.is_file()]


def views(images, n):
    """n different 4:3 views of the photos: crops at several places and scales, mirrored every other time."""
    out = []
    for i in range(n):
        img = images[i % len(images)]
        w, h = img.size
        scale = 1.0 - 0.15 * ((i // len(images)) % 4)
        cw = min(w, int(h * scale * 4 / 3)) if w * 3 >= h * 4 else int(w * scale)
        ch = cw * 3 // 4
        x, y = (w - cw) * ((i * 7) % 5) // 4, (h - ch) * ((i * 3) % 5) // 4
        crop = img.crop((x, y, x + cw, y + ch))
        out.append(crop.transpose(Image.FLIP_LEFT_RIGHT) if i % 2 else crop)
    return out


def grainy(img, size, rng):
    big = img.resize(size, Image.BICUBIC)
    noise = rng.normal(0, 4, (size[1], size[0], 1)).astype(np.float32)  # sensor-like grain, same in R, G, B
    return Image.fromarray(np.clip(np.asarray(big, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------- resume


def rows_on_disk(output):
    total = 0
    for part in prediction_output.partial_dir(output).glob("rank*.rows"):
        total += sum(len(r) for _, r in prediction_output.read_frames(part))
    return total


def resume_part(args, work):
    folder = work / "jpeg_320"
    listing = work / "jpeg_320.txt"
    if not listing.exists():
        folder.mkdir(parents=True, exist_ok=True)
        rng, base = np.random.default_rng(1), views(photos(), 64)
        names = []
        for i in range(args.n_images):
            name = folder / f"{i:05d}.jpg"
            grainy(base[i % len(base)], (320, 240), rng).save(name, quality=90)
            names.append(str(name))
        listing.write_text("\n".join(names) + "\n")
    ckpt = checkpoint(work / "resnet18_224.pth", "resnet18", [f"class{i}" for i in range(10)], 224)
    common = ["--model_fn", ckpt, "--file_list", listing, "--n_images", "0", "--verbose", "0"]
    whole_s, _ = run(PREDICT + common + ["--output", work / "whole.csv"])
    out = work / "resumed.csv"
    for stale in (out, prediction_output.partial_dir(out)):
        if stale.is_dir():
            import shutil

            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    proc = subprocess.Popen(
        [str(c) for c in PREDICT + common + ["--output", out]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    started = time.perf_counter()
    while rows_on_disk(out) < args.n_images // 2 and proc.poll() is None:
        time.sleep(0.05)
    killed_s = time.perf_counter() - started
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = rows_on_disk(out)
    resumed_s, _ = run(PREDICT + common + ["--output", out, "--resume"])
    same, n, diff = agreement(work / "whole.csv", out)  # the same files in the same order, or it stops
    files = [r["file_dir"] for r in read_rows(out)]
    print(f"resume, {args.n_images} JPEGs 320x240, resnet18 at 224 px (random weights):")
    print(
        f"  uninterrupted run {whole_s:.1f} s; killed (SIGKILL) after {killed_s:.1f} s with {kept} rows on disk; "
        f"--resume {resumed_s:.1f} s = {resumed_s / whole_s:.2f} of the whole run (target <= 0.6)"
    )
    print(
        f"  each image once: {len(files) == len(set(files)) == args.n_images}; the same files in the same order "
        f"as the uninterrupted run, the same answer for {same}/{n}; largest probability difference {diff:.1e}"
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // 2)))
    two_s, _ = run(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", ROOT / "predict.py", *common, "--output", work / "two.csv"],
        env=env,
    )
    same, n, diff = agreement(work / "whole.csv", work / "two.csv")
    print(
        f"  torchrun, 2 processes on the CPU: {two_s:.1f} s; the same files in the same order as 1 process, the "
        f"same answer for {same}/{n}; largest probability difference {diff:.1e} (target 1e-5)"
    )


# ----------------------------------------------------------------------------- decode


def eval_model(ckpt_path):
    """(checkpoint, its model as built in eval mode, its Preprocess)."""
    ckpt = ml.load_checkpoint(ckpt_path)
    model, _ = ml.model_from_checkpoint(ckpt)
    return ckpt, model.eval(), dl.Preprocess.of(ckpt)


def plain_loop(ckpt_path, listing, out, batch_size=64):
    """The baseline, run as a whole process (python bench/scale_bench.py --plain_loop MODEL LIST OUT): full decode
    with Pillow, torchvision's eval transform, the model as built, a CSV row per image."""
    ckpt, model, pre = eval_model(ckpt_path)
    tf = pre.transform()
    files = Path(listing).read_text().split()
    with torch.inference_mode(), open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_dir", "top1_class", "confidence", "margin"])
        for i in range(0, len(files), batch_size):
            chunk = files[i : i + batch_size]
            probs = model(torch.stack([tf(dl.load_rgb(p)) for p in chunk])).softmax(1)
            (conf, second), (pred, _) = probs.topk(2)[0].T, probs.topk(2)[1].T
            for p, c, m, k in zip(chunk, conf.tolist(), (conf - second).tolist(), pred.tolist()):
                writer.writerow([p, ckpt["class_names"][k], f"{c:.6f}", f"{m:.6f}"])


def tensor_resize_answers(ckpt_path, files, batch_size=25):
    """The control of the agreement figure: each file's top class with the full decode resized by torchvision's
    tensor Resize (float, antialiased) instead of Pillow's (8-bit) that the plain loop uses, both bilinear."""
    import torchvision.transforms.functional as F

    ckpt, model, pre = eval_model(ckpt_path)
    answers = []
    with torch.inference_mode():
        for i in range(0, len(files), batch_size):
            tensors = [
                F.resize(F.pil_to_tensor(dl.load_rgb(p)).float() / 255, pre.resize_size, antialias=True)
                for p in files[i : i + batch_size]
            ]
            batch = torch.stack([F.normalize(F.center_crop(t, pre.input_size), pre.mean, pre.std) for t in tensors])
            answers += [ckpt["class_names"][k] for k in model(batch).argmax(1).tolist()]
    return dict(zip(files, answers))


def cpu_costs(ckpt_path, big, small, n=16):
    """Milliseconds of one core per image: decode + eval transform of a 12 MP JPEG in full and at the reduced scale
    predict.py uses, of its 300 px copy, and the model's forward as predict.py runs it (BatchNorm folded,
    channels_last, fp32; batches of n, one thread)."""
    _, model, pre = eval_model(ckpt_path)
    model = ml.optimize_for_inference(model, channels_last=True)
    tf = pre.transform()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def per_image(files, side=None):
        start = time.perf_counter()
        batch = torch.stack([tf(dl.load_rgb(p, side)) for p in files])
        return (time.perf_counter() - start) * 1000 / len(files), batch

    try:
        full, _ = per_image(big[:n])
        reduced, _ = per_image(big[:n], pre.draft_side())
        small_ms, batch = per_image(small[:n])
        batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            model(batch)  # warm-up
            start = time.perf_counter()
            for _ in range(3):
                model(batch)
            forward = (time.perf_counter() - start) * 1000 / (3 * len(batch))
    finally:
        torch.set_num_threads(threads)
    return full, reduced, small_ms, forward


def decode_part(args, work):
    big_dir, small_dir = work / "12mp", work / "300px"
    if len(list(big_dir.glob("*.jpg"))) != args.n_photos:
        big_dir.mkdir(parents=True, exist_ok=True)
        small_dir.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for i, view in enumerate(views(photos(), args.n_photos)):
            big = grainy(view, (4000, 3000), rng)
            big.save(big_dir / f"{i:03d}.jpg", quality=90)
            big.resize((400, 300), Image.BICUBIC).save(small_dir / f"{i:03d}.jpg", quality=90)
    if args.rate_model:  # the rates only: a torchvision model with random weights
        ckpt = checkpoint(
            work / f"{args.rate_model}_random.pth", args.rate_model, [f"class{i:03d}" for i in range(1000)], 224
        )
        label, tag = f"{args.rate_model} (random weights, 1000 classes)", f"{args.rate_model}_"
    else:
        state = efficientnet_lite.translate_state_dict(ml.load_pretrained_state(efficientnet_lite.NAME))
        ckpt = checkpoint(
            work / "lite0_imagenet.pth", efficientnet_lite.NAME, [f"imagenet{i:03d}" for i in range(1000)], 224, state
        )
        label, tag = "EfficientNet-Lite0 ImageNet", ""
    n, first = args.n_photos, args.n_photos // 3
    lists = {}
    for name, folder in (("300px", small_dir), ("12mp", big_dir)):
        files = sorted(str(p) for p in folder.glob("*.jpg"))
        for count in (first, n):
            lists[name, count] = work / f"{name}_{count}.txt"
            lists[name, count].write_text("\n".join(files[:count]) + "\n")
    size_mb = np.mean([os.path.getsize(p) for p in big_dir.glob("*.jpg")]) / 1e6
    seconds = {}
    for _ in range(2):  # in turns, best of two: the first also warms the page cache
        for (name, count), listing in lists.items():
            t, _ = run(
                PREDICT
                + [
                    "--model_fn",
                    ckpt,
                    "--file_list",
                    listing,
                    "--output",
                    work / f"{tag}{name}_{count}.csv",
                    "--n_images",
                    "0",
                    "--verbose",
                    "0",
                    "--batch_size",
                    "16",
                ]
            )
            seconds[name, count] = min(t, seconds.get((name, count), t))
    steady = {name: (n - first) / (seconds[name, n] - seconds[name, first]) for name in ("300px", "12mp")}
    big_files = lists["12mp", n].read_text().split()
    full_ms, reduced_ms, small_ms, forward_ms = cpu_costs(ckpt, big_files, lists["300px", n].read_text().split())
    print(
        f"decode, {n} JPEGs 4000x3000 q90 ({size_mb:.1f} MB each) and the same at 400x300, {label} at 224 px "
        "(resize 256), batches of 16:"
    )
    print(
        f"  predict.py steady rate (the images after the first {first}, from two list lengths): 300 px "
        f"{steady['300px']:.2f} img/s, 12 MP {steady['12mp']:.2f} img/s = {steady['12mp'] / steady['300px']:.2f} "
        "of it (target >= 0.5)"
    )
    print(
        f"  one core's work per image: a 12 MP JPEG decoded and resized in full {full_ms:.0f} ms, at the reduced "
        f"scale {reduced_ms:.0f} ms, its 300 px copy {small_ms:.1f} ms; the forward {forward_ms:.1f} ms. "
        "When both runs "
        f"keep every core busy, the 12 MP rate is ({small_ms:.1f} + {forward_ms:.1f}) / ({reduced_ms:.0f} + "
        f"{forward_ms:.1f}) = {(small_ms + forward_ms) / (reduced_ms + forward_ms):.2f} of the 300 px rate on this "
        f"CPU with this model, on any number of cores (with a full decode "
        f"{(small_ms + forward_ms) / (full_ms + forward_ms):.2f})"
    )
    if args.rate_model:
        return
    plain_s, _ = run([sys.executable, __file__, "--plain_loop", ckpt, lists["12mp", n], work / "plain.csv"])
    full = {r["file_dir"]: r for r in read_rows(work / "plain.csv")}
    ours = {r["file_dir"]: r["top1_class"] for r in read_rows(work / f"12mp_{n}.csv")}
    agree = sum(ours[f] == r["top1_class"] for f, r in full.items())
    clear = [f for f, r in full.items() if float(r["margin"]) >= 0.05]  # the top class leads by 5 points or more
    agree_clear = sum(ours[f] == full[f]["top1_class"] for f in clear)
    median = float(np.median([float(r["confidence"]) for r in full.values()]))
    other = tensor_resize_answers(ckpt, big_files)
    floor = sum(other[f] == r["top1_class"] for f, r in full.items())
    ties = sum(float(r["margin"]) < 0.01 for r in full.values())
    print(
        f"  top-1 agreement, 12 MP decoded at a reduced scale against a full decode: {agree}/{n} "
        f"({agree / n:.1%}, target >= 99%); {agree_clear}/{len(clear)} where the full decode's top class leads "
        f"by 0.05 or more (median top-1 probability of these images {median:.2f})"
    )
    print(
        f"  the set's own noise: the same full decode resized by torchvision's tensor Resize (antialiased, float) "
        f"instead of Pillow's agrees with Pillow's for {floor}/{n} ({floor / n:.1%}); {ties} images lead by "
        "less than 0.01"
    )
    ours_rate, plain_rate = n / seconds["12mp", n], n / plain_s
    print(
        f"  whole process on the {n} 12 MP images: predict.py {ours_rate:.2f} img/s ({seconds['12mp', n]:.1f} s) "
        f"against a plain loop's {plain_rate:.2f} img/s ({plain_s:.1f} s; full decode, eval transform, model as "
        f"built, a row per image) = {ours_rate / plain_rate:.2f}x (target >= 1.5x)"
    )


# ----------------------------------------------------------------------------- rss


def peak_rss_mb(cmd):
    """Peak resident memory of a whole process (its own, not the bench's), in MB."""
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.communicate()
    if status != 0:
        sys.exit(f"failed: {err.decode()[-2000:]}")
    return usage.ru_maxrss / 1024


def rss_part(args, work):
    folder = work / "tiny"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    files = [str(folder / f"{i:04d}.png") for i in range(args.rss_files)]
    for f in files:
        if not os.path.exists(f):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(f)
    ckpt = checkpoint(work / "squeezenet_32.pth", "squeezenet1_1", [f"class{i}" for i in range(10)], 32)
    peaks = {}
    for count in map(int, args.rss_counts.split(",")):
        listing = work / f"list_{count}.txt"
        listing.write_text("\n".join(files[i % len(files)] for i in range(count)) + "\n")
        start = time.perf_counter()
        peaks[count] = peak_rss_mb(
            PREDICT
            + [
                "--model_fn",
                ckpt,
                "--file_list",
                listing,
                "--output",
                work / f"rss_{count}.csv",
                "--n_images",
                "0",
                "--verbose",
                "0",
                "--batch_size",
                "256",
            ]
        )
        print(f"rss: {count} images: peak RSS {peaks[count]:.0f} MB ({time.perf_counter() - start:.0f} s)")
    counts = sorted(peaks)
    print(
        f"  peak RSS {counts[-1]} against {counts[0]} images: {peaks[counts[-1]] / peaks[counts[0]]:.2f}x "
        "(target <= 1.2x)"
    )


def main(args):
    if args.plain_loop:
        return plain_loop(*args.plain_loop)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_line()}")
    parts = {"resume": resume_part, "decode": decode_part, "rss": rss_part}
    for name in args.parts.split(","):
        parts[name](args, work)


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a killed run leaves no core file
    main(parse_args())
