"""The GPU check (bench/gpu_check.sh runs it; a script, not a test): on one GPU, in a few minutes, prints

1. the forward ceiling (img/s on ready tensors: fp32, channels_last with bf16/fp16 autocast) and a fine-tuning
   pass with --amp and channels_last as train.py runs it, against that ceiling;
2. predict.py's steady rate as a whole process (--amp; from two list lengths, so start-up cancels) against the
   ceiling;
3. 12-megapixel JPEG decoding: Pillow in full and in draft mode (what predict.py does) on one CPU core, against
   torchvision's decode_jpeg on the GPU (nvjpeg), each to a 224 px crop.

python bench/gpu_check.py                   # on the GPU
python bench/gpu_check.py --device cpu --quick   # the same steps on the CPU, small: that the script runs
"""

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scale_bench import checkpoint, cpu_line  # noqa: E402

import data_loader as dl  # noqa: E402
from bench import ceiling, finetune_rates  # noqa: E402
from cli import ArgumentParser, tune_allocator  # noqa: E402
from timed import run  # noqa: E402

SAMPLE = ROOT / "data" / "fashion_sample"


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (to try the script without a GPU)")
    p.add_argument("--model_name", default="resnet50")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="small counts everywhere (a smoke run)")
    return p.parse_args(argv)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_part(args, device):
    rates = ceiling(args.model_name, 224, args.batch_size, device)
    best_name, best = max(rates.items(), key=lambda kv: kv[1])
    print(
        f"1. forward ceiling, {args.model_name} at 224 px, batch {args.batch_size}: "
        + ", ".join(f"{k} {v:.0f}" for k, v in rates.items())
        + f" img/s; ceiling {best:.0f} ({best_name})"
    )
    n = 64 if args.quick else 512
    ft = finetune_rates(args.model_name, SAMPLE, 224, args.batch_size, n, device)
    print(
        f"   fine-tuning pass, {n} images, ours (--amp, channels_last) {ft['ours']:.0f} img/s = "
        f"{ft['ours'] / best:.2f} of the ceiling (a training step costs about 3 forwards: 0.33 is the bound); "
        f"plain fp32 NCHW loop {ft['plain']:.0f} img/s"
    )
    return best


def predict_part(args, device, best, work):
    ckpt = checkpoint(work / "model.pth", args.model_name, [f"c{i}" for i in range(10)], 224)
    files = [str(p) for p in sorted(SAMPLE.rglob("*.png"))]
    short, long = (256, 1024) if args.quick else (2000, 8000)
    seconds = {}
    for count in (short, long):
        listing = work / f"list_{count}.txt"
        listing.write_text("".join(f"{files[i % len(files)]}\n" for i in range(count)))
        flags = ["--amp"] if device.type == "cuda" else ["--gpu_id", "-1"]
        seconds[count], _ = run(
            [
                sys.executable,
                ROOT / "predict.py",
                "--model_fn",
                ckpt,
                "--file_list",
                listing,
                "--output",
                work / f"r{count}.csv",
                "--n_images",
                "0",
                "--verbose",
                "0",
                "--batch_size",
                args.batch_size,
                *flags,
            ]
        )
    steady = (long - short) / (seconds[long] - seconds[short])
    print(
        f"2. predict.py, {args.model_name} at 224 px, 28 px PNGs listed {short} and {long} times: steady rate "
        f"{steady:.0f} img/s = {steady / best:.2f} of the forward ceiling (whole runs {seconds[short]:.1f}s and "
        f"{seconds[long]:.1f}s)"
    )


def decode_part(args, device, work):
    from PIL import Image
    from torchvision.io import decode_jpeg
    from torchvision.transforms import v2

    n = 4 if args.quick else 24
    rng = np.random.default_rng(0)
    blobs = []
    for i, f in enumerate(sorted(SAMPLE.rglob("*.png"))[:n]):
        img = Image.open(f).convert("RGB").resize((4000, 3000), Image.BICUBIC)  # grain: JPEG has detail to code
        noisy = np.clip(np.asarray(img, dtype=np.float32) + rng.normal(0, 6, (3000, 4000, 1)), 0, 255)
        path = work / f"{i:03d}.jpg"
        Image.fromarray(noisy.astype(np.uint8)).save(path, quality=90)
        blobs.append(path.read_bytes())
    pre = dl.Preprocess(224, 256, dl.IMAGENET_MEAN, dl.IMAGENET_STD)
    tf = pre.transform()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rates = {}
    for name, side in (
        ("Pillow, full decode, 1 core", None),
        ("Pillow, draft mode (predict.py), 1 core", pre.draft_side()),
    ):
        start = time.perf_counter()
        for path in sorted(work.glob("*.jpg")):
            tf(dl.load_rgb(path, side))
        rates[name] = n / (time.perf_counter() - start)
    torch.set_num_threads(threads)
    gpu_tf = v2.Compose(
        [
            v2.Resize(256, antialias=True),
            v2.CenterCrop(224),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(dl.IMAGENET_MEAN, dl.IMAGENET_STD),
        ]
    )
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    for _ in range(2):  # the first pass warms nvjpeg up
        sync(device)
        start = time.perf_counter()
        images = decode_jpeg(data, device=device) if device.type == "cuda" else [decode_jpeg(d) for d in data]
        torch.stack([gpu_tf(img) for img in images])
        sync(device)
        rates[f"torchvision decode_jpeg on {device.type} (batch of {n}) + resize there"] = n / (
            time.perf_counter() - start
        )
    print(f"3. {n} JPEGs 4000x3000 q90 to a 224 px crop: " + "; ".join(f"{k} {v:.1f} img/s" for k, v in rates.items()))


def main(args):
    tune_allocator()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run bench/gpu_check.sh where a GPU is lent (or --device cpu to try it)")
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"machine: {cpu_line()}; device {device}{gpu}; {os.cpu_count()} CPUs")
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    best = training_part(args, device)
    predict_part(args, device, best, work)
    decode_part(args, device, work)
    print(f"(work files in {work})")


if __name__ == "__main__":
    main(parse_args())
