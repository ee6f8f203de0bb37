"""The label check's clean-set estimate (a script, not a test): does planting wrong labels raise "a clean set of N
images would get about K flags"? Real ImageNet features (EfficientNet-Lite0, its pip package's weights) of
Fashion-MNIST images, labels planted wrong at a few seeds; prints the flags, the estimate from the plain
out-of-fold probabilities (expected_flags, before #33) and from the tempered ones (clean_set_flags, now).

  python bench/clean_estimate_bench.py                    # two sets x (0, 8, 24 wrong), 4 seeds; a few minutes
  python bench/clean_estimate_bench.py --wrong 0 8 --seeds 0 1

Needs the Debian package dataset-fashion-mnist (data/prepare.py reads it).
"""

import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import data_loader as dl  # noqa: E402
import label_check as lc  # noqa: E402
import model_loader as ml  # noqa: E402
from cli import ArgumentParser  # noqa: E402
from features import capture_head_input  # noqa: E402

SETS = {"easy": "trouser,sneaker,bag,ankle_boot", "look-alike": "pullover,coat,shirt,bag"}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    p.add_argument("--per_class", type=int, default=120)
    p.add_argument("--size", type=int, default=64, help="image side on disk and model input")
    p.add_argument("--wrong", nargs="+", type=int, default=[0, 8, 24], help="labels planted wrong")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--work", default=None, help="folder for the images (default: a new temporary one)")
    return p.parse_args(argv)


@torch.inference_mode()
def features_of(folder, size):
    """(class names, labels, (n, 1280) eval-view features) of the class folders in `folder`."""
    names, samples = dl.scan_class_folders(folder)
    model, head = ml.build_model("efficientnet_lite0", len(names), True, None, log=lambda *a: None)
    tf = dl.build_transforms(size, dl.default_resize(size), dl.IMAGENET_MEAN, dl.IMAGENET_STD, False)
    x = torch.stack([tf(dl.load_rgb(f)) for f, _ in samples])
    with capture_head_input(model.eval(), head) as taken:
        for i in range(0, len(x), 64):
            model(x[i : i + 64])
    return names, torch.tensor([y for _, y in samples]), torch.cat(taken)


def row(features, labels, n_classes):
    """(flags, the plain estimate, the tempered one, the share taken for noise) of one label set."""
    k, _ = lc.choose_folds(labels, [str(c) for c in range(n_classes)])
    probs, _, _ = lc.cross_validated_probs(features, labels, n_classes, k, 0)
    flags = int(lc.confident_learning_flags(probs, labels, n_classes)[0].sum())
    estimate, noise = lc.clean_set_flags([probs], [labels], 0)
    return flags, lc.expected_flags([probs], 0), estimate, noise


def main(args):
    work = Path(args.work or tempfile.mkdtemp(prefix="clean_estimate_"))
    print(
        f"{'set':11s} {'wrong':>5s} {'seed':>4s} {'flags':>5s} {'plain estimate':>15s} {'tempered':>9s} {'noise':>6s}"
    )
    for name in args.sets:
        folder = work / name
        if not (folder / "train").is_dir():
            subprocess.run(
                [
                    sys.executable,
                    ROOT / "data" / "prepare.py",
                    "fashion",
                    "--out",
                    folder,
                    "--size",
                    str(args.size),
                    "--train_per_class",
                    str(args.per_class),
                    "--test_per_class",
                    "0",
                    "--classes",
                    SETS[name],
                ],
                check=True,
                capture_output=True,
            )
        names, labels, features = features_of(folder / "train", args.size)
        features = features[None]  # the label check's (views, n, dim): the eval view alone
        for n_wrong in args.wrong:
            for seed in args.seeds if n_wrong else [None]:
                planted = labels.clone()
                if n_wrong:
                    rng = random.Random(seed)
                    for i in rng.sample(range(len(planted)), n_wrong):
                        planted[i] = rng.choice([c for c in range(len(names)) if c != labels[i]])
                flags, plain, tempered, noise = row(features, planted, len(names))
                shown = "-" if seed is None else seed
                print(
                    f"{name:11s} {n_wrong:5d} {shown:>4} {flags:5d} {plain:15.2f} {tempered:9.2f} {noise:6.1%}",
                    flush=True,
                )
    print(f"({len(labels)} images per set, {args.size} px, EfficientNet-Lite0 ImageNet features; work in {work})")


if __name__ == "__main__":
    main(parse_args())
