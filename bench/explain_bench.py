"""Grad-CAM benchmark (a script, not a test): does predict.py --explain point at the object, and what does it
cost?

  python bench/explain_bench.py                       # frozen and fine-tuned; ~10 min on 2 CPUs
  python bench/explain_bench.py --modes frozen

Needs the Debian package dataset-fashion-mnist.

The set: composites. A Fashion-MNIST object (trouser, sneaker, bag, ankle boot), scaled from 28 to 84 px,
pasted at a seeded random place inside one seeded random quadrant of a plain black 224 x 224 canvas; 125
training and 50 test images per class (train.py's seeded split keeps a fifth of train/ for validation).

For each mode (frozen: --freeze, 10 epochs; fine-tuned: all layers, 5 epochs) it
  1. runs `train.py --model_name efficientnet_lite0 --use_pretrained --input_size 224 --resize_size 224`
     (no center-crop margin: the model sees the whole canvas);
  2. runs `predict.py --explain` on the test images and reads heatmaps.npz and result.csv;
  3. prints the pointing game: the share of correctly classified test images whose map peaks inside the
     object's box (the tight box of its pixels; also inside its 84 px square, and in its quadrant);
  4. (first mode only) the cost: predict.py on the same images with and without --explain, in turns, best of
     --repeats: the prediction loop's time (predict.py's own 'predicted N images in Xs') and the whole process.
"""

import csv
import random
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "data"))

from ood_bench import fashion_images  # noqa: E402

from cli import ArgumentParser, run_cli  # noqa: E402
from timed import run  # noqa: E402

CLASSES = ["trouser", "sneaker", "bag", "ankle_boot"]
CANVAS, OBJECT = 224, 84
MODES = {"frozen": ["--freeze", "--n_epochs", "10"], "finetuned": ["--n_epochs", "5"]}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument(
        "--work", default=None, help="folder for data, checkpoints and outputs (default: a new temporary one)"
    )
    p.add_argument("--modes", default="frozen,finetuned", help="comma-separated: frozen, finetuned")
    p.add_argument("--per_class", type=int, default=125, help="training images per class (test: 50)")
    p.add_argument("--repeats", type=int, default=2, help="timing rounds (best of)")
    return p.parse_args(argv)


def composite(obj, rng):
    """(RGB canvas, tight box, square box): obj scaled to OBJECT px inside a random quadrant."""
    from PIL import Image

    obj = obj.resize((OBJECT, OBJECT), Image.BILINEAR)
    qx, qy = rng.randrange(2), rng.randrange(2)
    half = CANVAS // 2
    x = qx * half + rng.randint(4, half - OBJECT - 4)
    y = qy * half + rng.randint(4, half - OBJECT - 4)
    canvas = Image.new("L", (CANVAS, CANVAS), 0)
    canvas.paste(obj, (x, y))
    left, top, right, bottom = obj.point(lambda v: 255 if v > 20 else 0).getbbox()
    return canvas.convert("RGB"), (x + left, y + top, x + right, y + bottom), (x, y, x + OBJECT, y + OBJECT)


def build(root, per_class):
    """root/{train,test}/<class>/*.png and root/boxes.csv (file, tight box, square box)."""
    if (root / "boxes.csv").exists():
        return read_boxes(root / "boxes.csv")
    rng = random.Random(0)
    rows = []
    for split, source, n in (("train", "train", per_class), ("test", "t10k", 50)):
        taken = dict.fromkeys(CLASSES, 0)
        for i, (name, img) in enumerate(fashion_images(source)):
            if name in taken and taken[name] < n:
                canvas, tight, square = composite(img, rng)
                path = root / split / name / f"{split}_{i:05d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                canvas.save(path)
                rows.append([str(path), *tight, *square])
                taken[name] += 1
    with open(root / "boxes.csv", "w", newline="") as f:
        csv.writer(f).writerows([["file", "x0", "y0", "x1", "y1", "sx0", "sy0", "sx1", "sy1"]] + rows)
    return read_boxes(root / "boxes.csv")


def read_boxes(path):
    with open(path) as f:
        return {
            r["file"]: [int(r[k]) for k in ("x0", "y0", "x1", "y1", "sx0", "sy0", "sx1", "sy1")]
            for r in csv.DictReader(f)
        }


def read_rows(path):
    with open(path, encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def pointing_game(result_csv, npz, boxes):
    """(correct images, peak in the tight box, in the square, in the quadrant)."""
    import numpy as np

    maps = np.load(npz)
    n = tight = square = quadrant = 0
    for row in read_rows(result_csv):
        if row["predict"] != row["label"]:
            continue
        heat = maps[row["file_dir"]]
        y, x = np.unravel_index(int(heat.argmax()), heat.shape)
        b = boxes[row["file_dir"]]
        n += 1
        tight += b[0] <= x < b[2] and b[1] <= y < b[3]
        square += b[4] <= x < b[6] and b[5] <= y < b[7]
        half = CANVAS // 2
        quadrant += (x >= half) == (b[4] >= half) and (y >= half) == (b[5] >= half)
    return n, tight, square, quadrant


def loop_seconds(stdout):
    return float(re.search(r"predicted \d+ images in ([\d.]+)s", stdout).group(1))


def main(args):
    work = Path(args.work or tempfile.mkdtemp(prefix="explain_bench_"))
    data = work / "composites"
    boxes = build(data, args.per_class)
    py = sys.executable
    print(
        f"composites: {len(CLASSES)} classes x {args.per_class} train (a fifth kept for validation) / 50 test, "
        f"{CANVAS} px canvas, {OBJECT} px object; work folder {work}"
    )
    for i, mode in enumerate(args.modes.split(",")):
        ckpt, run_dir = work / f"{mode}.pth", work / f"run_{mode}"
        seconds, out = run(
            [
                py,
                ROOT / "train.py",
                "--data_dir",
                data,
                "--model_name",
                "efficientnet_lite0",
                "--use_pretrained",
                "--input_size",
                "224",
                "--resize_size",
                "224",
                *MODES[mode],
                "--model_fn",
                ckpt,
                "--log_dir",
                run_dir,
                "--verbose",
                "0",
            ]
        )
        test_acc = re.search(r"test accuracy ([\d.]+)", out).group(1)
        cams = work / f"cams_{mode}"
        _, out = run(
            [
                py,
                ROOT / "predict.py",
                "--model_fn",
                ckpt,
                "--data_dir",
                data / "test",
                "--output",
                work / f"explain_{mode}.csv",
                "--explain",
                cams,
                "--plot",
                work / f"plot_{mode}.png",
            ]
        )
        n, tight, square, quadrant = pointing_game(work / f"explain_{mode}.csv", cams / "heatmaps.npz", boxes)
        print(
            f"{mode}: trained in {seconds:.0f}s, test accuracy {test_acc}; pointing game on {n} correctly "
            f"classified test images: peak in the object's tight box {tight / n:.1%} ({tight}/{n}), in its "
            f"{OBJECT} px square {square / n:.1%}, in its quadrant {quadrant / n:.1%}"
        )
        if i == 0:
            timing(py, ckpt, data / "test", work, args.repeats)


def timing(py, ckpt, folder, work, repeats):
    best = {}
    for _ in range(repeats):
        for name, extra in (("plain", []), ("explain", ["--explain", work / "cams_timing"])):
            wall, out = run(
                [
                    py,
                    ROOT / "predict.py",
                    "--model_fn",
                    ckpt,
                    "--data_dir",
                    folder,
                    "--output",
                    work / f"timing_{name}.csv",
                    "--n_images",
                    "0",
                    "--verbose",
                    "0",
                    *extra,
                ]
            )
            loop = loop_seconds(out)
            old = best.get(name, (float("inf"), float("inf")))
            best[name] = (min(old[0], loop), min(old[1], wall))
    n = len(read_rows(work / "timing_plain.csv"))
    (pl, pw), (el, ew) = best["plain"], best["explain"]
    print(
        f"cost on {n} images of {CANVAS} px (best of {repeats}): prediction loop {pl:.2f}s plain, {el:.2f}s with "
        f"--explain ({el / pl:.2f}x; {1000 * (el - pl) / n:.1f} ms more per image); whole process {pw:.1f}s "
        f"against {ew:.1f}s ({ew / pw:.2f}x)"
    )


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
