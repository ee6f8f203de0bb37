"""Labels from a CSV (a script, not a test): multi-label on two-object images, and a single-label CSV against the
folder layout of the same images.

  python bench/multilabel_bench.py                      # all parts, both sets, seeds 42 and 43; ~5 min on 2 CPUs
  python bench/multilabel_bench.py --parts multi --sets sample
  python bench/multilabel_bench.py --parts check        # the label check on 10% wrong labels, both sets

multi: `data/prepare.py pairs` images (two objects side by side on a 64 px canvas, labelled with both classes;
480 train, 120 valid, 200 test), trained with a frozen ImageNet backbone (efficientnet_lite0 --use_pretrained
--freeze --input_size 128, the flags below), and the test mAP and exact-match accuracy train.py prints, per seed.
  sample   from the shipped data/fashion_sample (trouser, sneaker, bag, ankle boot); the flags were chosen here
  heldout  from four other Fashion-MNIST classes (t-shirt, dress, coat, sandal; 100 train + 30 test objects each,
           from the Debian package dataset-fashion-mnist), run with the same flags after they were chosen
check: 10% of the train and valid images get one class added or removed (seeded), then train.py --check_data
--multi_label (same backbone): how many of those images are in the first 60 rows of label_issues.csv, and how many
of the flagged images are really wrong.
single: the shipped sample trained from its folders and from a CSV listing the same files (no split column: the
seeded split of the train rows), frozen and fine-tuned, same seed: the test accuracies must agree within 0.005."""

import csv
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "data"))

from cli import ArgumentParser, run_cli  # noqa: E402
from timed import run  # noqa: E402

HELDOUT = ["tshirt_top", "dress", "coat", "sandal"]
BACKBONE = ["--model_name", "efficientnet_lite0", "--use_pretrained", "--input_size", "128", "--verbose", "0"]
MULTI = ["--freeze", "--n_epochs", "20", "--lr", "0.01"]
SINGLE_MODES = {"frozen": ["--freeze", "--n_epochs", "10"], "finetuned": ["--n_epochs", "3"]}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument(
        "--work", default=None, help="folder for data, checkpoints and outputs (default: a new temporary one)"
    )
    p.add_argument("--parts", default="multi,check,single", help="comma-separated: multi, check, single")
    p.add_argument("--sets", default="sample,heldout", help="multi's sets, comma-separated: sample, heldout")
    p.add_argument("--seeds", default="42,43", help="comma-separated --seed values")
    return p.parse_args(argv)


def pairs_of(name, work):
    """labels.csv of the two-object images of a set (built once)."""
    out = work / f"pairs_{name}"
    if (out / "labels.csv").exists():
        return out / "labels.csv"
    source = ROOT / "data" / "fashion_sample"
    if name == "heldout":
        from ood_bench import write_fashion

        source = work / "heldout_objects"
        write_fashion(source / "train", "train", HELDOUT, 100)
        write_fashion(source / "test", "test", HELDOUT, 30)
    run([sys.executable, ROOT / "data" / "prepare.py", "pairs", "--source", source, "--out", out])
    return out / "labels.csv"


def train(work, name, flags):
    _, out = run(
        [
            sys.executable,
            ROOT / "train.py",
            *BACKBONE,
            *flags,
            "--model_fn",
            work / f"{name}.pth",
            "--log_dir",
            work / "runs" / name,
        ],
        cwd=work,
    )
    return out


def number(pattern, text):
    m = re.search(pattern, text)
    return float(m.group(1)) if m else float("nan")


def multi(work, sets, seeds):
    print(f"multi-label, frozen efficientnet_lite0 ({' '.join(MULTI)}): test mAP / exact match")
    for name in sets:
        labels = pairs_of(name, work)
        maps, exact = [], []
        for seed in seeds:
            out = train(work, f"multi_{name}_{seed}", ["--labels_csv", labels, "--multi_label", *MULTI, "--seed", seed])
            maps.append(number(r"test mAP ([\d.]+)", out))
            exact.append(number(r"exact match ([\d.]+), micro", out))
            print(f"  {name:8s} seed {seed}: mAP {maps[-1]:.4f}, exact match {exact[-1]:.4f}", flush=True)
        print(f"  {name:8s} mean   : mAP {sum(maps) / len(maps):.4f}, exact match {sum(exact) / len(exact):.4f}")


def check(work, sets, seed=0):
    import random

    print("label check (--check_data --multi_label), 10% of the train and valid images with one class added or removed")
    for name in sets:
        labels = pairs_of(name, work)
        with open(labels, newline="") as f:
            rows = list(csv.DictReader(f))
        classes = sorted({c for r in rows for c in r["label"].split()})
        rng = random.Random(seed)
        chosen = rng.sample(
            [i for i, r in enumerate(rows) if r["split"] != "test"],
            round(0.1 * sum(r["split"] != "test" for r in rows)),
        )
        for i in chosen:
            rows[i]["label"] = " ".join(sorted(set(rows[i]["label"].split()) ^ {rng.choice(classes)}))
        noisy = labels.with_name("noisy.csv")
        with open(noisy, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file", "label", "split"])
            writer.writeheader()
            writer.writerows(rows)
        wrong = {str(labels.parent / rows[i]["file"]) for i in chosen}
        train(work, f"check_{name}", ["--labels_csv", noisy, "--multi_label", "--check_data"])
        with open(work / "runs" / f"check_{name}" / "label_issues.csv", newline="") as f:
            ranked = list(csv.DictReader(f))
        flagged = [r["file"] in wrong for r in ranked if r["flagged"] == "1"]
        print(
            f"  {name:8s}: {sum(r['file'] in wrong for r in ranked[: len(wrong)])} of the {len(wrong)} wrong in the "
            f"first {len(wrong)} rows; flagged {len(flagged)}, of which {sum(flagged)} wrong",
            flush=True,
        )


def single(work, seeds):
    data = ROOT / "data" / "fashion_sample"
    table = work / "sample_labels.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label"])
        files = sorted((data / "train").rglob("*.png"), reverse=True)  # another order than the folders'
        writer.writerows((str(p.relative_to(data)), p.parent.name) for p in files)
    test_table = work / "sample_test.csv"
    with open(test_table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label"])
        writer.writerows((str(p.relative_to(data)), p.parent.name) for p in sorted((data / "test").rglob("*.png")))
    print("single-label: test accuracy from the folders / from a CSV of the same files")
    for mode, flags in SINGLE_MODES.items():
        for seed in seeds:
            acc = {}
            for source, given in (
                ("folders", ["--data_dir", data]),
                ("csv", ["--labels_csv", table, "--image_root", data]),
            ):
                name = f"single_{mode}_{source}_{seed}"
                train(work, name, [*given, *flags, "--seed", seed])
                _, out = run(
                    [
                        sys.executable,
                        ROOT / "predict.py",
                        "--model_fn",
                        work / f"{name}.pth",
                        "--labels_csv",
                        test_table,
                        "--image_root",
                        data,
                        "--output",
                        work / f"{name}.csv",
                        "--n_images",
                        "0",
                        "--verbose",
                        "0",
                    ],
                    cwd=work,
                )
                acc[source] = number(r"accuracy ([\d.]+) \(", out)
            gap = abs(acc["folders"] - acc["csv"])
            print(
                f"  {mode:9s} seed {seed}: folders {acc['folders']:.4f}, csv {acc['csv']:.4f}, difference {gap:.4f}"
                f" ({'within' if gap <= 0.005 else 'OVER'} 0.005)",
                flush=True,
            )


def main(args):
    work = Path(args.work or tempfile.mkdtemp(prefix="multilabel_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    seeds = args.seeds.split(",")
    parts = args.parts.split(",")
    if "multi" in parts:
        multi(work, args.sets.split(","), seeds)
    if "check" in parts:
        check(work, args.sets.split(","))
    if "single" in parts:
        single(work, seeds)
    print(f"work folder: {work}")


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
