"""Near-duplicates and outliers of train.py --check_data on planted copies (a script, not a test): prints, with the
CPU, the recall of planted copies, the groups that are no planted copy, and where planted foreign images rank.

  python bench/near_dup_bench.py                       # two sets, ~5 minutes on 2 CPUs
  python bench/near_dup_bench.py --sets fashion --per_set 1000

Sets, each --per_set images in train/<class>/, and planted in test/<class>/ (so every found copy is a leak):
  elpv     monocrystalline solar cells (electroluminescence, 300 px): look-alikes, functional vs defective
  fashion  Fashion-MNIST tops (t-shirt, pullover, coat, shirt) at 112 px: distinct products
Planted: --copies "re-saved" copies (resized to 50-90%, JPEG quality 50-90), as many "re-cropped" ones (also cropped
by 3-8% and brightened or darkened by up to 15%), and --foreign images of the other set in train/ folders.
train.py --check_data runs as a user runs it (EfficientNet-Lite0, its ImageNet weights); its near_duplicates.csv
and outliers.csv are read back. A contact sheet of the groups that are no planted copy is saved for a look by eye.
"""

import csv
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from PIL import Image, ImageEnhance  # noqa: E402
from scale_bench import cpu_line  # noqa: E402

import data_loader as dl  # noqa: E402
from cli import ArgumentParser  # noqa: E402
from timed import run  # noqa: E402
from utils import save_image_grid  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--sets", nargs="+", choices=["elpv", "fashion"], default=["elpv", "fashion"])
    p.add_argument("--per_set", type=int, default=600)
    p.add_argument("--copies", type=int, default=20, help="re-saved copies planted, and as many re-cropped ones")
    p.add_argument("--foreign", type=int, default=10, help="images of the other set planted in train/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None)
    return p.parse_args(argv)


def source(name, n, work):
    """[(class, RGB image)] of a set."""
    if name == "elpv":
        from ood_bench import solar_cells

        cells = [c for c in solar_cells() if c[0] == "mono"]
        return [("defective" if p >= 2 / 3 else "functional", img.convert("RGB")) for _, p, img in cells[:n]]
    folder = work / f"fashion_src_{n}"
    if not folder.is_dir():
        run(
            [
                sys.executable,
                ROOT / "data" / "prepare.py",
                "fashion",
                "--out",
                folder,
                "--size",
                112,
                "--train_per_class",
                n // 4 + 1,
                "--test_per_class",
                0,
                "--classes",
                "tshirt_top,pullover,coat,shirt",
            ]
        )
    return [(f.parent.name, Image.open(f).convert("RGB")) for f in sorted((folder / "train").rglob("*.png"))][:n]


def planted_copy(image, cropped, rng):
    if cropped:
        w, h = image.size
        c = rng.uniform(0.03, 0.08)
        left, top = rng.uniform(0, c) * w, rng.uniform(0, c) * h
        image = image.crop((left, top, w - (c * w - left), h - (c * h - top)))
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.85, 1.15))
    f = rng.uniform(0.5, 0.9)
    return image.resize((max(8, round(image.width * f)), max(8, round(image.height * f))), Image.BICUBIC)


def build(name, other, args, work):
    """The set's folder and {copy path: original path}, [foreign paths]."""
    rng = random.Random(args.seed)
    root = work / name
    images = source(name, args.per_set, work)
    originals = []
    for i, (cls, img) in enumerate(images):
        path = root / "train" / cls / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        originals.append((cls, path, img))
    copies = {}
    for kind in ("resaved", "recropped"):
        for j in range(args.copies):
            cls, path, img = originals[rng.randrange(len(originals))]
            target = root / "test" / cls / f"{kind}_{j:02d}_of_{path.stem}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            planted_copy(img, kind == "recropped", rng).save(target, quality=rng.randint(50, 90))
            copies[str(target)] = str(path)
    foreign = []
    for j, (_, img) in enumerate(source(other, args.foreign, work)):
        cls = originals[j % len(originals)][0]
        path = root / "train" / cls / f"foreign_{j:02d}.png"
        img.resize(originals[0][2].size).save(path)
        foreign.append(str(path))
    return root, copies, foreign


def read(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def measure(name, args, work):
    root, copies, foreign = build(name, "fashion" if name == "elpv" else "elpv", args, work)
    out = work / f"{name}_check"
    cmd = [sys.executable, ROOT / "train.py", "--check_data", "--data_dir", root, "--model_name", "efficientnet_lite0"]
    done = subprocess.run(
        [str(c) for c in cmd + ["--use_pretrained", "--log_dir", out, "--verbose", "1"]], capture_output=True, text=True
    )  # status 1: the planted copies leak into test/, as meant
    printed = done.stdout
    if done.returncode not in (0, 1) or not (out / "near_duplicates.csv").exists():
        sys.exit(f"train.py --check_data failed: {done.stderr[-2000:]}")
    rows = read(out / "near_duplicates.csv")
    group_of = {r["file"]: r["group"] for r in rows}
    kinds = {r["group"]: r["kind"] for r in rows}
    found = {kind: 0 for kind in ("resaved", "recropped")}
    found_sure = dict(found)
    for copy, original in copies.items():
        if copy in group_of and group_of[copy] == group_of.get(original):
            kind = "resaved" if "/resaved_" in copy else "recropped"
            found[kind] += 1
            found_sure[kind] += kinds[group_of[copy]] != "look-alike"
    planted_groups = {group_of[c] for c in copies if c in group_of}
    other = sorted({g for g in kinds if g not in planted_groups}, key=int)
    n = sum(1 for _ in dl.list_images(root))
    line = next((ln for ln in printed.splitlines() if ln.startswith("near-duplicates:")), "")
    print(f"{name}: {n} images, {args.copies} re-saved and {args.copies} re-cropped copies planted in test/; {line}")
    for kind in ("resaved", "recropped"):
        print(
            f"  {kind}: found {found[kind]}/{args.copies} = {found[kind] / args.copies:.2f} (as copies, not "
            f"look-alikes: {found_sure[kind]})"
        )
    print(
        f"  groups that are no planted copy: {len(other)} ({', '.join(kinds[g] for g in other[:10])}"
        f"{' ...' if len(other) > 10 else ''}) = {1000 * len(other) / n:.1f} per 1,000 images"
    )
    if other:
        sheet = work / f"{name}_other_groups.png"
        shown = [
            (r["file"], f"group {r['group']} {r['kind']}\n{r['similarity']}") for r in rows if r["group"] in other[:8]
        ]
        save_image_grid([dl.load_rgb(f) for f, _ in shown], [t for _, t in shown], ["black"] * len(shown), sheet)
        print(f"  contact sheet of those groups: {sheet}")
    outliers = [r["file"] for r in read(out / "outliers.csv")]
    top = outliers[: max(1, round(0.02 * len(outliers)))]
    print(
        f"  outliers: {sum(f in top for f in foreign)}/{len(foreign)} planted foreign images in the top 2% "
        f"({len(top)} rows); their ranks {sorted(outliers.index(f) + 1 for f in foreign)}"
    )


def main(args):
    work = Path(args.work or tempfile.mkdtemp(prefix="near_dup_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {cpu_line()}")
    for name in args.sets:
        measure(name, args, work)
    print(f"(work files in {work})")


if __name__ == "__main__":
    main(parse_args())
