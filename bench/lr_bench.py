"""Learning-rate finder benchmark (a script, not a test): does training with the --lr that `train.py --find_lr`
suggests reach the validation accuracy of the best of a grid of learning rates, and which rule suggests best?

  python bench/lr_bench.py                                    # 3 sets x frozen, fine-tuned; ~50 min on 2 CPUs
  python bench/lr_bench.py --sets fashion4 --modes frozen

Needs the Debian package dataset-fashion-mnist and `pip install elpv-dataset` (solar cells).

Sets (efficientnet_lite0 --use_pretrained; train/ split by train.py's seeded --valid_ratio):
  fashion4  trouser, sneaker, bag, ankle boot (28 px, seen at --input_size 96): 175 per class, valid_ratio 3/7
            (400 train, 300 valid); one of the two sets the rule was chosen on
  fashion6  the six other Fashion-MNIST classes (28 px, seen at 96): 120 per class, valid_ratio 0.4 (432 train,
            288 valid); run after the rule was chosen on the other two, to check it
  solar     monocrystalline solar cells (300 px, seen at 128), functional vs defective: 200 + 200, valid_ratio
            0.4 (240 train, 160 valid), --batch_size 16 (15 batches a pass); the other

For each set and mode (frozen: --freeze --n_epochs 10; fine-tuned: --n_epochs 5, the default
--backbone_lr_scale) it runs `train.py --find_lr` and reads lr_find.csv, then trains once per learning rate
of the grid 1e-4 ... 1e0 and once per rule's suggestion (rounded as printed), each with --seed 42 and 43, and
prints the mean of the best epoch's validation accuracy: the gap to the best of the grid is the target (at
most 1 point)."""

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

from ood_bench import save, solar_cells, write_fashion  # noqa: E402

import lr_finder  # noqa: E402
from cli import ArgumentParser, run_cli  # noqa: E402
from timed import run  # noqa: E402

FASHION4 = ["trouser", "sneaker", "bag", "ankle_boot"]
GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1e0)
SETS = {
    "fashion4": ["--input_size", "96", "--valid_ratio", str(3 / 7)],
    "fashion6": ["--input_size", "96", "--valid_ratio", "0.4"],
    "solar": ["--input_size", "128", "--valid_ratio", "0.4", "--batch_size", "16"],
}
MODES = {"frozen": ["--freeze", "--n_epochs", "10"], "finetuned": ["--n_epochs", "5"]}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument(
        "--work", default=None, help="folder for data, checkpoints and outputs (default: a new temporary one)"
    )
    p.add_argument("--sets", default="fashion4,solar,fashion6", help="comma-separated: fashion4, solar, fashion6")
    p.add_argument("--modes", default="frozen,finetuned", help="comma-separated: frozen, finetuned")
    p.add_argument(
        "--seeds",
        default="42,43",
        help="comma-separated --seed values of the training runs (the "
        "accuracies are their mean; the range test runs with the first)",
    )
    return p.parse_args(argv)


def build(name, root):
    if (root / "done").exists():
        return root
    if name == "fashion4":
        write_fashion(root / "train", "train", FASHION4, 175)
    elif name == "fashion6":
        others = [c for c in __import__("prepare").FASHION_CLASSES if c not in FASHION4]
        write_fashion(root / "train", "train", others, 120)
    else:
        cells = [c for c in solar_cells() if c[0] == "mono"]
        random.Random(0).shuffle(cells)
        for cls, keep in (("functional", lambda p: p == 0), ("defective", lambda p: p >= 1 / 3)):
            for i, (_, _, img) in enumerate([c for c in cells if keep(c[1])][:200]):
                save(img, root / "train" / cls, f"{cls}_{i:04d}")
    (root / "done").touch()
    return root


def valid_accuracy(stdout):
    m = re.search(r"best epoch \d+: valid loss \S+, valid accuracy ([\d.]+)", stdout)
    return float(m.group(1)) if m else float("nan")  # no best epoch: the loss was never finite


def main(args):
    work = Path(args.work or tempfile.mkdtemp(prefix="lr_bench_"))
    py = sys.executable
    summary = []
    for name in args.sets.split(","):
        data = build(name, work / name)
        for mode in args.modes.split(","):
            common = [
                py,
                ROOT / "train.py",
                "--data_dir",
                data,
                "--model_name",
                "efficientnet_lite0",
                "--use_pretrained",
                *SETS[name],
                *MODES[mode],
                "--verbose",
                "0",
            ]
            run_dir = work / f"find_{name}_{mode}"
            seeds = args.seeds.split(",")
            seconds, out = run(
                common + ["--find_lr", "--log_dir", run_dir, "--model_fn", work / "unused.pth", "--seed", seeds[0]]
            )
            if not (run_dir / "lr_find.csv").exists():
                sys.exit(f"{name} {mode}: no range test\n{out}")
            with open(run_dir / "lr_find.csv") as f:
                rows = list(csv.DictReader(f))
            rules = lr_finder.suggest([float(r["lr"]) for r in rows], [float(r["smoothed"]) for r in rows])
            rules = {rule: float(f"{lr:.1e}") for rule, lr in rules.items()}
            accuracy = {}
            for lr in sorted(set(GRID) | set(rules.values())):
                runs = []
                for seed in seeds:
                    _, out = run(
                        common
                        + [
                            "--lr",
                            f"{lr:g}",
                            "--seed",
                            seed,
                            "--log_dir",
                            work / f"run_{name}_{mode}_{lr:g}_{seed}",
                            "--model_fn",
                            work / f"{name}_{mode}_{lr:g}_{seed}.pth",
                        ]
                    )
                    runs.append(valid_accuracy(out))
                accuracy[lr] = sum(runs) / len(runs)
            best_lr = max(GRID, key=lambda lr: (accuracy[lr] == accuracy[lr], accuracy[lr]))
            print(
                f"\n{name} {mode}: range test {len(rows)} steps in {seconds:.0f}s (whole process); validation "
                f"accuracy of the best epoch, mean of --seed {', '.join(seeds)}"
            )
            print(
                "  grid: "
                + ", ".join(f"lr {lr:g} -> {accuracy[lr]:.4f}" for lr in GRID)
                + f"; best {accuracy[best_lr]:.4f} at {best_lr:g}"
            )
            for rule, lr in rules.items():
                gap = accuracy[best_lr] - accuracy[lr]
                print(
                    f"  {rule:8s} suggests {lr:.1e} -> {accuracy[lr]:.4f} ({100 * gap:+.1f} points below the "
                    f"grid's best){'  <- printed as the suggestion' if rule == lr_finder.SUGGESTION else ''}"
                )
                summary.append((rule, gap))
    print(
        "\nrules over all sets and modes: "
        + "; ".join(
            f"{rule}: worst gap {100 * max(g for r, g in summary if r == rule):.1f} points, within 1 point "
            f"{sum(g <= 0.01 for r, g in summary if r == rule)}/{sum(r == rule for r, _ in summary)}"
            for rule in ("valley", "steepest", "minimum")
            if any(r == rule for r, _ in summary)
        )
    )


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
