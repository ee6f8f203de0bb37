"""Measure the README's "Getting better accuracy" advice on the shipped sample (data/fashion_sample:
4 Fashion-MNIST classes, 100 train + 30 test images each, 28 px), ResNet-18, on this machine's CPU.

The pretrained rows need a backbone that has seen similar images. ImageNet weights cannot be downloaded
here, so a stand-in "pretrained" backbone is trained first on six OTHER Fashion-MNIST classes (t-shirt,
pullover, dress, coat, sandal, shirt; 100 images each), from the Debian package dataset-fashion-mnist.

  python bench/advice.py              # about 10 minutes on a quiet 2-core CPU

--weights FILE uses a backbone of your own instead of the stand-in; --data_dir, --input_size and --epochs
run the same table on other data, at another size, or shorter.
"""

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cli import ArgumentParser  # noqa: E402
from timed import run  # noqa: E402

SAMPLE = ROOT / "data" / "fashion_sample"
DONOR_CLASSES = "tshirt_top,pullover,dress,coat,sandal,shirt"
SIZE = 32  # px: the sample's images are 28 px, and 32 px keeps the whole table to minutes on a CPU
RUNS = [  # (name, flags): every run trains ResNet-18 on the shipped sample at SIZE px, early stop after 5 epochs
    ("from scratch, 5 epochs", ["--n_epochs", "5"]),
    ("from scratch, 20 epochs", ["--n_epochs", "20"]),
    ("--freeze on a random backbone, 20 epochs", ["--n_epochs", "20", "--freeze"]),
    ("pretrained, --freeze, 20 epochs", ["--n_epochs", "20", "--freeze", "PRETRAINED"]),
    ("pretrained, --unfreeze_after 2, 20 epochs", ["--n_epochs", "20", "--unfreeze_after", "2", "PRETRAINED"]),
    ("pretrained, fine-tune all, 20 epochs", ["--n_epochs", "20", "PRETRAINED"]),
    (
        "pretrained, fine-tune all, --label_smoothing 0.1",
        ["--n_epochs", "20", "--label_smoothing", "0.1", "PRETRAINED"],
    ),
    ("pretrained, fine-tune all, --patience 0 (no early stop)", ["--n_epochs", "20", "--patience", "0", "PRETRAINED"]),
]


def main(args):
    work = Path(args.work or tempfile.mkdtemp(prefix="advice_"))
    donor_data, donor = work / "donor_data", Path(args.weights or work / "donor.pth")
    if not donor.exists():
        run(
            [
                sys.executable,
                ROOT / "data" / "prepare.py",
                "fashion",
                "--out",
                donor_data,
                "--classes",
                DONOR_CLASSES,
                "--overwrite",
            ]
        )
        run(
            [
                sys.executable,
                ROOT / "train.py",
                "--data_dir",
                donor_data,
                "--model_name",
                "resnet18",
                "--input_size",
                args.input_size,
                "--n_epochs",
                "10",
                "--model_fn",
                donor,
                "--log_dir",
                work / "donor_run",
                "--verbose",
                "0",
                "--gpu_id",
                "-1",
            ]
        )
    print(f"{'run':52s} {'test acc':>8s} {'best epoch':>10s} {'epochs run':>10s} {'seconds':>8s}")
    for name, flags in RUNS:
        if args.only and not any(o in name for o in args.only):
            continue
        flags = [f for f in flags if f != "PRETRAINED"] + (["--weights", donor] if "PRETRAINED" in flags else [])
        if args.epochs:
            flags[flags.index("--n_epochs") + 1] = str(args.epochs)
        tag = re.sub(r"\W+", "_", name)[:40]
        seconds, out = run(
            [
                sys.executable,
                ROOT / "train.py",
                "--data_dir",
                args.data_dir,
                "--model_name",
                "resnet18",
                "--input_size",
                args.input_size,
                "--model_fn",
                work / f"{tag}.pth",
                "--log_dir",
                work / tag,
                "--verbose",
                "1",
                "--gpu_id",
                "-1",
                *flags,
            ]
        )
        test = re.search(r"test accuracy ([\d.]+)", out).group(1)
        found = re.search(r"best epoch (\d+)|best: the (linear probe|SGD head)", out)
        best = found.group(1) or ("probe" if found.group(2) == "linear probe" else "sgd")  # the head stage's
        epochs = len(re.findall(r"^epoch \d+/", out, re.M))
        print(f"{name:52s} {test:>8s} {best:>10s} {epochs:>10d} {seconds:8.0f}", flush=True)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--work", default=None, help="folder for the runs (default: a new temporary folder)")
    p.add_argument("--only", nargs="*", default=None, help="run only the rows whose name contains one of these")
    p.add_argument("--data_dir", default=str(SAMPLE), help="the data set every row trains on")
    p.add_argument("--weights", default=None, help="the pretrained backbone (default: the stand-in trained here)")
    p.add_argument("--input_size", type=int, default=SIZE)
    p.add_argument("--epochs", type=int, default=None, help="cap every row at this many epochs (default: each row's)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
