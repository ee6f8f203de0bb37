"""Label-check benchmark (a script, not a test): plants wrong labels in a real image set and prints how
many of them `train.py --check_data` puts at the top of label_issues.csv, against a plain baseline.

  python bench/label_bench.py                     # 4 Fashion-MNIST classes x 100 at 96 px, 10% flipped
  python bench/label_bench.py --size 224          # the issue's time comparison at 224 px
  python bench/label_bench.py --model_name efficientnet_lite0 --use_pretrained --size 224   # ImageNet features

What it does:
  1. builds a train/ folder of --per_class images per class of --classes from Fashion-MNIST, and moves a
     seeded --flip share of them into another (random) class's folder: the planted wrong labels;
  2. with --use_pretrained, takes the backbone's ImageNet weights (efficientnet_lite0's come with pip);
     without it or --weights, fine-tunes a donor backbone on OTHER Fashion-MNIST classes
     (--donor_classes), so that its frozen features mean something without ImageNet weights;
  3. runs `train.py --check_data --weights donor.pth` (or --use_pretrained) as a whole process and reads
     its label_issues.csv: precision among the first --top rows (share of them that are planted flips) and recall of
     the flips
     within the first 2 x --top rows, and the same for the `flagged` column;
  4. in this process, on the same backbone, for each of --seeds (other flips of the same images, so the
     features are taken once): the baseline (eval-view features, one 5-fold logistic regression with
     scikit-learn's default strength C = 1, ranked by self-confidence) against the check's own method,
     and against alternatives the check does not use (they did not win here): ranking by the normalized
     margin, averaging with a cosine k-nearest-neighbour vote, 10 fold draws, augmented views; and the
     mean over the seeds;
  5. times: one plain feature pass over the images against the whole check.
"""

import csv
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import data_loader as dl  # noqa: E402
import label_check as lc  # noqa: E402
import model_loader as ml  # noqa: E402
from cli import ArgumentParser, CLIError, run_cli, tune_allocator  # noqa: E402
from timed import run  # noqa: E402
from utils import Compute, DistInfo  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--work", default=None, help="folder for data, donor and outputs (default: a new temporary one)")
    p.add_argument("--model_name", default="resnet18")
    p.add_argument("--size", type=int, default=96, help="image side on disk and model input size")
    p.add_argument("--classes", default="pullover,coat,shirt,bag", help="classes of the checked set")
    p.add_argument(
        "--donor_classes",
        default="tshirt_top,trouser,dress,sandal,sneaker,ankle_boot",
        help="classes the donor backbone is fine-tuned on (none of --classes)",
    )
    p.add_argument("--per_class", type=int, default=100, help="training images per class of the checked set")
    p.add_argument("--flip", type=float, default=0.1, help="share of labels flipped to another class")
    p.add_argument("--seed", type=int, default=0, help="which images are flipped, and to what, for the train.py run")
    p.add_argument("--top", type=int, default=40, help="precision in the first N rows, recall in the first 2N")
    p.add_argument("--check_views", type=int, default=None, help="passed to train.py (default: its own)")
    p.add_argument("--extra_views", type=int, default=4, help="augmented views of an extra comparison row (0 = none)")
    p.add_argument("--neighbours", type=int, default=20, help="k of the k-nearest-neighbour comparison row")
    p.add_argument("--seeds", default="0,1,2,3,4", help="flip seeds of the in-process comparison (same features)")
    p.add_argument("--weights", default=None, help="backbone weights; default: a donor fine-tuned here")
    p.add_argument(
        "--use_pretrained",
        action="store_true",
        help="the backbone's ImageNet weights instead of a donor (efficientnet_lite0's need no download)",
    )
    p.add_argument("--donor_epochs", type=int, default=3)
    p.add_argument("--donor_per_class", type=int, default=100)
    return p.parse_args(argv)


def fashion(out, size, classes, per_class):
    run(
        [
            sys.executable,
            ROOT / "data" / "prepare.py",
            "fashion",
            "--out",
            out,
            "--size",
            size,
            "--train_per_class",
            per_class,
            "--test_per_class",
            0,
            "--classes",
            classes,
        ]
    )


def flipped_labels(files, share, seed):
    """Seeded wrong labels: {file index: the class folder it is moved to} for a share of the files."""
    classes = sorted({f.parent.name for f in files})
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(len(files)), round(share * len(files))))
    return {i: rng.choice([c for c in classes if c != files[i].parent.name]) for i in chosen}


def plant_flips(clean, flipped, share, seed):
    """Copy clean/train/<class>/* to flipped/train/, a seeded share of the files into another class's
    folder. Returns the set of paths (in flipped/) whose folder is the wrong class."""
    files = sorted(dl.list_images(clean / "train"))
    moved = flipped_labels(files, share, seed)
    wrong = set()
    for i, f in enumerate(files):
        dst = flipped / "train" / moved.get(i, f.parent.name) / f.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst)
        if i in moved:
            wrong.add(str(dst))
    return wrong


def scores(files, wrong, top, flagged):
    """precision in the first `top` rows, recall of the flips in the first 2 x top, flagged precision, recall."""
    caught = len(flagged & wrong)
    return (
        sum(f in wrong for f in files[:top]) / top,
        sum(f in wrong for f in files[: 2 * top]) / len(wrong),
        caught / max(1, len(flagged)),
        caught / len(wrong),
    )


def show(name, values):
    p, r, fp, fr = values
    print(f"   {name:66s} {p:6.3f} {r:6.3f}    {fp:5.3f} {fr:5.3f}")


def margin_scores(probs, labels):
    """Normalized margin: probability of the given label minus the largest other class's (lower = more
    suspicious; cleanlab's 'normalized_margin')."""
    index = torch.arange(len(labels))
    others = probs.clone()
    others[index, labels] = -1
    return probs[index, labels] - others.max(1).values


def knn_votes(features, labels, k, n_classes):
    """Leave-one-out cosine k-nearest-neighbour vote: for each row of features (n, dim), the share of its k
    most similar other rows (cosine similarity) that carry each label. Returns (n, n_classes)."""
    unit = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-2)  # below any cosine: an image is never its own neighbour
    neighbours = similarity.topk(k, dim=1).indices
    return torch.nn.functional.one_hot(labels[neighbours], n_classes).float().mean(1)


def ranked(files, labels, probs, class_names, score=None):
    """Files most suspicious first (by `score`, default the check's own order: self-confidence) and the
    set the check flags."""
    rows = lc.LabelIssues(files, labels, ["train"] * len(files), probs, class_names).table()
    flagged = {r["file"] for r in rows if r["flagged"]}
    if score is None:
        return [r["file"] for r in rows], flagged
    return [files[i] for i in sorted(range(len(files)), key=lambda i: (float(score[i]), files[i]))], flagged


def compare_steps(args, steps, samples, clean_files, class_names):
    """The ranking quality of each of `steps` over the flip seeds of --seeds, and their means."""
    top = args.top
    seeds = [int(x) for x in args.seeds.split(",")]
    print(
        f"\nranking quality, {len(seeds)} flip seeds ({','.join(map(str, seeds))}), "
        f"{round(args.flip * len(samples))} flips among {len(samples)} images each:"
    )
    header = f"precision@{top} recall@{2 * top}  flagged: precision recall"
    print(f"   {'':66s} {header}")
    files = [p for p, _ in samples]
    totals = {name: [] for name in steps}
    k = min(args.neighbours, len(samples) - 1)
    for seed in seeds:
        moved = flipped_labels(clean_files, args.flip, seed)
        labels = torch.tensor([class_names.index(moved.get(i, f.parent.name)) for i, f in enumerate(clean_files)])
        wrong_here = {files[i] for i in moved}
        fitted = {}  # the same fit serves the rows that only rank its probabilities differently
        for name, (feats, grid, repeats, rank) in steps.items():
            key = (id(feats), grid, repeats)
            if key not in fitted:
                fitted[key] = lc.cross_validated_probs(feats, labels, len(class_names), lc.FOLDS, 42, grid, repeats)
            probs, l2, _ = fitted[key]
            if rank == "knn":
                probs = (probs + knn_votes(feats[0], labels, k, len(class_names))) / 2
            score = margin_scores(probs, labels) if rank == "margin" else None
            ranking, flagged = ranked(files, labels, probs, class_names, score)
            values = scores(ranking, wrong_here, top, flagged)
            totals[name].append(values)
            show(f"seed {seed}: {name} [L2 {l2:g}]", values)
    print("   mean over the seeds:")
    for name, values in totals.items():
        show(name, [sum(v[j] for v in values) / len(values) for j in range(4)])


def prepare(args):
    """(work folder, the clean set, the set with planted flips, the flipped files, the backbone's weights file or
    None for ImageNet's): built once, the donor trained when no weights are given."""
    work = Path(args.work or tempfile.mkdtemp(prefix="label_bench_"))
    clean, flipped = work / "clean", work / "flipped"
    if not (clean / "train").is_dir():
        fashion(clean, args.size, args.classes, args.per_class)
    shutil.rmtree(flipped, ignore_errors=True)
    wrong = plant_flips(clean, flipped, args.flip, args.seed)
    weights = args.weights
    if weights is None and not args.use_pretrained:
        weights = work / "donor.pth"
        if not weights.is_file():
            fashion(work / "donor_data", args.size, args.donor_classes, args.donor_per_class)
            seconds, _ = run(
                [
                    sys.executable,
                    ROOT / "train.py",
                    "--data_dir",
                    work / "donor_data",
                    "--model_name",
                    args.model_name,
                    "--input_size",
                    args.size,
                    "--n_epochs",
                    args.donor_epochs,
                    "--model_fn",
                    weights,
                    "--log_dir",
                    work / "donor_run",
                    "--verbose",
                    0,
                ]
            )
            print(
                f"donor: {args.model_name} fine-tuned {args.donor_epochs} epochs on {args.donor_classes} "
                f"({args.donor_per_class} per class, {args.size} px) in {seconds:.0f}s"
            )
    return work, clean, flipped, wrong, weights


def main(args):
    if args.weights and args.use_pretrained:
        raise CLIError("give --weights or --use_pretrained, not both")
    tune_allocator()
    work, clean, flipped, wrong, weights = prepare(args)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"machine: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__} (a shared, noisy machine)")
    n = len(dl.list_images(flipped / "train"))
    print(
        f"data: {n} images of {args.classes} at {args.size} px, {len(wrong)} labels flipped (seed {args.seed}); "
        f"backbone {args.model_name} with {weights or 'its ImageNet weights'}"
    )

    # the check, as a user runs it
    backbone = ["--use_pretrained"] if weights is None else ["--weights", weights]
    cmd = [
        sys.executable,
        ROOT / "train.py",
        "--check_data",
        "--data_dir",
        flipped,
        "--model_name",
        args.model_name,
        *backbone,
        "--input_size",
        args.size,
        "--log_dir",
        work / "check",
        "--verbose",
        1,
    ]
    if args.check_views is not None:
        cmd += ["--check_views", args.check_views]
    check_s, out = run(cmd)
    with open(work / "check" / "label_issues.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    summary = [ln for ln in out.splitlines() if ln.startswith(("label check:", "flagged:"))]
    print("\n".join(f"   | {ln}" for ln in summary))
    top = args.top

    # the baseline and the steps between, in this process on the same backbone, over several flip seeds:
    # the features do not depend on the labels, so they are taken once from the clean folder
    clean_files = sorted(dl.list_images(clean / "train"))
    class_names = sorted({f.parent.name for f in clean_files})
    samples = [(str(f), class_names.index(f.parent.name)) for f in clean_files]
    model, head = ml.build_model(
        ml.resolve_model_name(args.model_name),
        len(class_names),
        pretrained=weights is None,
        weights_path=weights,
        log=lambda *a: None,
    )
    defaults = ml.model_defaults(ml.resolve_model_name(args.model_name))
    meta = {
        "input_size": args.size,
        "resize_size": dl.default_resize(args.size),
        "mean": defaults["mean"],
        "std": defaults["std"],
    }
    compute = Compute(torch.device("cpu"), None, ml.is_convolutional(model), False, DistInfo())
    skips = dl.SkipLog(samples, class_names, print)
    lc.backbone_features(model, head, samples[:32], 0, meta, 32, 0, 0, compute, skips, 2048, work / "f.bin")  # warm-up
    start = time.perf_counter()
    plain, _ = lc.backbone_features(model, head, samples, 0, meta, 32, 0, 0, compute, skips, 2048, work / "f.bin")
    plain_s = time.perf_counter() - start
    views = args.check_views or 0
    n_fit = round(len(samples) * (lc.FOLDS - 1) / lc.FOLDS)
    check = "eval view, L2 by out-of-fold log loss, folds x3 (the check's default)"
    # name: (features, L2 grid, fold draws, how probabilities become a ranking score; None = self-confidence)
    steps = {
        "baseline: eval view, 5-fold once, C=1 (L2 1/n), self-confidence": (plain, (1 / n_fit,), 1, None),
        check: (plain, lc.L2_GRID, lc.REPEATS, None),
        "the same, ranked by normalized margin (p_given - max other)": (plain, lc.L2_GRID, lc.REPEATS, "margin"),
        f"the same, averaged with a cosine {args.neighbours}-NN vote": (plain, lc.L2_GRID, lc.REPEATS, "knn"),
        "eval view, L2 by log loss, folds x10": (plain, lc.L2_GRID, 10, None),
    }
    if args.extra_views:
        many, _ = lc.backbone_features(
            model, head, samples, args.extra_views, meta, 32, 0, 42, compute, skips, 2048, work / "f.bin"
        )
        steps[f"eval + {args.extra_views} augmented views, L2 by log loss, folds x3"] = (
            many,
            lc.L2_GRID,
            lc.REPEATS,
            None,
        )
    compare_steps(args, steps, samples, clean_files, class_names)
    show(
        f"train.py --check_data (label_issues.csv, seed {args.seed})",
        scores([r["file"] for r in rows], wrong, top, {r["file"] for r in rows if r["flagged"] == "1"}),
    )
    print(
        f"\ntime: one plain feature pass over {len(samples)} images (eval view, in-process) {plain_s:.1f}s; "
        f"the whole check as a process (start-up, audit, {1 + views} views, fits, files) {check_s:.1f}s "
        f"= {check_s / plain_s:.1f}x"
    )
    print(f"(work files in {work}; command: {' '.join(map(str, cmd))})")


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
