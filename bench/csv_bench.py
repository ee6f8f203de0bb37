"""How long --labels_csv takes to read a large table (a script, not a test).

  python bench/csv_bench.py                 # 100,000 rows; writes 100,000 small files first (~20 s)
  python bench/csv_bench.py --multi_label   # the same files, two classes per row (--multi_label)

It writes N empty .png files (the CSV reader checks that each file exists; it does not decode them: that is
the DataLoader's work, and --check_data's) in 10 class folders and a CSV naming them (file, label, split:
80% train, 10% valid, 10% test), then times data_loader.build_splits on it, as train.py calls it: reading,
checking every file exists, ordering, and the stratified split when there is no split column (measured both
ways), best of --repeats."""

import csv
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data_loader  # noqa: E402
import tasks  # noqa: E402
from cli import ArgumentParser, run_cli  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", default=None, help="folder for the files (default: a new temporary one)")
    p.add_argument("--multi_label", action="store_true", help="label cells of two classes, read with --multi_label")
    return p.parse_args(argv)


def main(args):
    work = Path(args.work or tempfile.mkdtemp(prefix="csv_bench_"))
    rows = []
    for i in range(args.rows):
        name = f"class_{i % 10}/img_{i:06d}.png"
        label = f"class_{i % 10}" + (f" class_{(i // 10 + 1) % 10}" if args.multi_label else "")
        rows.append((name, label, "train" if i // 10 % 10 < 8 else "valid" if i // 10 % 10 == 8 else "test"))
    for c in range(10):
        (work / f"class_{c}").mkdir(parents=True, exist_ok=True)
    for name, _, _ in rows:
        (work / name).touch()
    for with_split in (True, False):
        path = work / ("with_split.csv" if with_split else "no_split.csv")
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "label", "split"] if with_split else ["file", "label"])
            writer.writerows(r if with_split else r[:2] for r in rows)
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            splits = data_loader.build_splits(None, 0.2, 42, path, None, task=tasks.for_run(args.multi_label))
            best = min(best, time.perf_counter() - start)
        print(
            f"{args.rows} rows{' of two labels' if args.multi_label else ''}, {'with' if with_split else 'without'} "
            f"a split column: {best:.2f}s (best of "
            f"{args.repeats}); {len(splits.train)} train / {len(splits.valid)} valid / {len(splits.test)} test"
        )


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
