"""Make ImageFolder data sets (DIR/train/<class>/*.png, DIR/test/<class>/*.png).

  python data/prepare.py fashion               # rebuild the shipped sample, data/fashion_sample
  python data/prepare.py fashion --out data/fashion_bench --size 224 --train_per_class 100 --test_per_class 30
  python data/prepare.py catdog --zip ~/Downloads/train.zip    # Kaggle dogs-vs-cats -> data/catdog
  python data/prepare.py hymenoptera           # ants/bees from the PyTorch tutorial (needs internet)
  python data/prepare.py pairs                 # two objects per image from the sample -> data/fashion_pairs

Fashion-MNIST comes from the Debian package dataset-fashion-mnist (MIT licence; apt-get install
dataset-fashion-mnist), read from /usr/share/datasets/fashion-mnist/*.gz in IDX format.
"""

import csv
import gzip
import random
import shutil
import struct
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from cli import ArgumentParser  # noqa: E402 (the repository root, for this script in data/)

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "tshirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
]
SAMPLE_CLASSES = ["trouser", "sneaker", "bag", "ankle_boot"]
HYMENOPTERA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def fresh_folders(folders, overwrite):
    """The class folders a command is about to fill must not hold files of an earlier run (a re-run with
    another split would leave images in both train/ and test/): refuse, or with --overwrite empty them."""
    used = [f for f in folders if f.is_dir() and any(f.iterdir())]
    if used and not overwrite:
        fail(
            f"{used[0]} already holds files (from an earlier run?); add --overwrite to replace "
            f"{', '.join(str(f) for f in used[:4])}{' ...' if len(used) > 4 else ''}"
        )
    for folder in used:
        shutil.rmtree(folder)


def count_files(folder):
    return sum(1 for p in Path(folder).rglob("*") if p.is_file())


def read_idx(path):
    """IDX files: magic (0, 0, dtype, ndim), then ndim big-endian sizes, then the data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return dims, data[4 + 4 * ndim :]


def fashion(args):
    from PIL import Image

    source = Path(args.source)
    if not (source / "train-images-idx3-ubyte.gz").is_file():
        fail(f"Fashion-MNIST not found in {source}; install it with: apt-get install dataset-fashion-mnist")
    classes = args.classes.split(",") if args.classes else SAMPLE_CLASSES
    unknown = [c for c in classes if c not in FASHION_CLASSES]
    if unknown:
        fail(f"unknown classes {unknown}; choose from {', '.join(FASHION_CLASSES)}")
    out = Path(args.out)
    fresh_folders([out / split / c for split in ("train", "test") for c in classes], args.overwrite)
    for split, prefix, per_class in (("train", "train", args.train_per_class), ("test", "t10k", args.test_per_class)):
        (n, rows, cols), pixels = read_idx(source / f"{prefix}-images-idx3-ubyte.gz")
        _, labels = read_idx(source / f"{prefix}-labels-idx1-ubyte.gz")
        taken = {c: 0 for c in classes}
        for i in range(n):  # the first images of each class, in file order: reproducible
            name = FASHION_CLASSES[labels[i]]
            if name not in taken or taken[name] >= per_class:
                continue
            img = Image.frombytes("L", (cols, rows), pixels[i * rows * cols : (i + 1) * rows * cols])
            if args.size != rows:
                img = img.resize((args.size, args.size), Image.BICUBIC)
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f"{prefix}_{i:05d}.png", optimize=True)
            taken[name] += 1
            if all(v >= per_class for v in taken.values()):
                break
        print(f"{out / split}: {taken}")


def catdog(args):
    """Kaggle dogs-vs-cats train.zip (train/cat.0.jpg, ...) -> out/train/<cat|dog>/ + a held-out out/test/."""
    zip_path = Path(args.zip)
    if not zip_path.is_file():
        fail(f"{zip_path} not found: download train.zip of Kaggle's dogs-vs-cats competition first")
    out = Path(args.out)
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile:
        fail(f"{zip_path} is not a zip file")
    with archive:
        names = sorted(n for n in archive.namelist() if n.lower().endswith((".jpg", ".jpeg", ".png")))
        by_class = {}
        for n in names:
            label = Path(n).name.split(".")[0].lower()
            if label in ("cat", "dog"):
                by_class.setdefault(label, []).append(n)
        if not by_class:
            fail(f"{zip_path} holds no cat.*.jpg / dog.*.jpg files")
        fresh_folders([out / split / label for split in ("train", "test") for label in by_class], args.overwrite)
        rng = random.Random(args.seed)
        for label, members in by_class.items():
            rng.shuffle(members)
            n_test = int(round(len(members) * args.test_ratio))
            for split, part in (("test", members[:n_test]), ("train", members[n_test:])):
                folder = out / split / label
                folder.mkdir(parents=True, exist_ok=True)
                for name in part:
                    with archive.open(name) as src, open(folder / Path(name).name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
            print(f"{label}: {count_files(out / 'train' / label)} train, {count_files(out / 'test' / label)} test")
    print(f"done: python train.py --data_dir {out} --use_pretrained --freeze")


def hymenoptera(args):
    """The PyTorch transfer-learning tutorial's ants/bees set: train/ and val/ (renamed valid/)."""
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        zip_path = Path(tmp) / "hymenoptera_data.zip"
        try:
            urllib.request.urlretrieve(HYMENOPTERA_URL, zip_path)
        except Exception as e:
            fail(f"could not download {HYMENOPTERA_URL} ({e}); this needs internet access")
        with zipfile.ZipFile(zip_path) as archive:
            archive.extractall(tmp)
        src = Path(tmp) / "hymenoptera_data"
        fresh_folders([out / "train", out / "valid"], args.overwrite)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src / "train", out / "train", dirs_exist_ok=True)
        shutil.copytree(src / "val", out / "valid", dirs_exist_ok=True)
    print(f"done: python train.py --data_dir {out} --use_pretrained --freeze")


def pairs(args):
    """Multi-label images from an ImageFolder of single objects (the shipped sample by default): two objects
    side by side on a black square canvas, labelled with both classes (one class when both are of the same
    class), and labels.csv (file, label, split) for train.py --labels_csv --multi_label. The train and valid
    images use disjoint halves of train/'s objects (--valid_share of them for valid), the test images test/'s."""
    from PIL import Image

    source, out = Path(args.source), Path(args.out)
    if not (source / "train").is_dir() or not (source / "test").is_dir():
        fail(f"{source} needs train/<class>/ and test/<class>/ folders of single objects")
    classes = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    fresh_folders([out / "images"], args.overwrite)
    rng = random.Random(args.seed)
    pools = {"train": {}, "valid": {}, "test": {}}
    for c in classes:
        files = sorted((source / "train" / c).glob("*.png"))
        rng.shuffle(files)
        n_valid = max(1, round(len(files) * args.valid_share))
        pools["valid"][c], pools["train"][c] = files[:n_valid], files[n_valid:]
        pools["test"][c] = sorted((source / "test" / c).glob("*.png"))
    (out / "images").mkdir(parents=True, exist_ok=True)
    side, rows = args.size, []
    for split, count in (("train", args.train), ("valid", args.valid), ("test", args.test)):
        for i in range(count):
            canvas = Image.new("L", (side, side))
            picked = [rng.choice(classes), rng.choice(classes)]
            for slot, c in enumerate(picked):
                obj = Image.open(rng.choice(pools[split][c])).convert("L")
                half = side // 2  # objects stay inside the center crop train.py takes of the canvas
                obj = (
                    obj.resize((half - side // 8, half - side // 8), Image.BICUBIC)
                    if obj.width > half - side // 8
                    else obj
                )
                x = slot * half + side // 16 + rng.randint(0, max(0, half - side // 16 - obj.width - side // 16))
                y = side // 16 + rng.randint(0, max(0, side - 2 * (side // 16) - obj.height))
                canvas.paste(obj, (x, y))
            name = f"images/{split}_{i:04d}.png"
            canvas.save(out / name, optimize=True)
            rows.append((name, " ".join(sorted(set(picked))), split))
    with open(out / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label", "split"])
        writer.writerows(rows)
    print(
        f"{out}: {args.train} train, {args.valid} valid, {args.test} test images of two objects ({', '.join(classes)})"
        f"; labels in {out / 'labels.csv'}"
    )
    print(
        f"done: python train.py --labels_csv {out / 'labels.csv'} --multi_label --model_name efficientnet_lite0 "
        "--use_pretrained --freeze --input_size 128 --n_epochs 20 --lr 0.01"
    )


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fashion", help="Fashion-MNIST from the Debian package")
    f.add_argument("--out", default=str(HERE / "fashion_sample"))
    f.add_argument(
        "--classes",
        default=None,
        help=f"comma-separated (default: {','.join(SAMPLE_CLASSES)}; all: {','.join(FASHION_CLASSES)})",
    )
    f.add_argument("--train_per_class", type=int, default=100)
    f.add_argument("--test_per_class", type=int, default=30)
    f.add_argument("--size", type=int, default=28, help="side in pixels (28 = original)")
    f.add_argument("--source", default=str(FASHION_DIR))
    f.add_argument("--overwrite", action="store_true", help="replace the class folders of an earlier run")
    c = sub.add_parser("catdog", help="Kaggle dogs-vs-cats train.zip")
    c.add_argument("--zip", required=True)
    c.add_argument("--out", default=str(HERE / "catdog"))
    c.add_argument("--test_ratio", type=float, default=0.1)
    c.add_argument("--seed", type=int, default=42)
    c.add_argument("--overwrite", action="store_true", help="replace the class folders of an earlier run")
    h = sub.add_parser("hymenoptera", help="ants/bees, downloaded")
    h.add_argument("--out", default=str(HERE / "hymenoptera"))
    h.add_argument("--overwrite", action="store_true", help="replace the folders of an earlier run")
    m = sub.add_parser("pairs", help="two objects per image, labelled with both classes (multi-label)")
    m.add_argument(
        "--source", default=str(HERE / "fashion_sample"), help="ImageFolder of single objects with train/ and test/"
    )
    m.add_argument("--out", default=str(HERE / "fashion_pairs"))
    m.add_argument("--train", type=int, default=480, help="training images")
    m.add_argument("--valid", type=int, default=120, help="validation images")
    m.add_argument("--test", type=int, default=200, help="test images")
    m.add_argument("--valid_share", type=float, default=0.2, help="share of train/'s objects kept for valid")
    m.add_argument("--size", type=int, default=64, help="canvas side in pixels")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--overwrite", action="store_true", help="replace the images of an earlier run")
    return p.parse_args(argv)


def main(args):
    {"fashion": fashion, "catdog": catdog, "hymenoptera": hymenoptera, "pairs": pairs}[args.command](args)


if __name__ == "__main__":
    main(parse_args())
