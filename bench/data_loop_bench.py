"""The data loop's two measured targets (a script, not a test); prints its figures and the CPU.

  python bench/data_loop_bench.py                              # both parts; ~10 min on 2 CPUs
  python bench/data_loop_bench.py --parts scale --n 100000
  python bench/data_loop_bench.py --parts labelling --sets fashion_tops --seeds 0

labelling: the loop train, rank, label, retrain, simulated on real images with their true labels hidden. Each set of
bench/finetune_bench.py (built larger here: --per_class pool images per class, --test_per_class test images) goes
through EfficientNet-Lite0 with its ImageNet weights once (224 px, the eval view: the features predict.py's
--embeddings writes). Per seed: --start labelled images per class drawn at random; then --rounds rounds, each fitting
the linear head on the labelled images (L-BFGS, the probe's fit, one L2), scoring the rest and labelling --picks of
them: at random, by uncertainty alone, or as predict.py --rank_for_labelling picks (data_loop: the calibration's
uncertainty, k-center greedy over the POOL x picks most uncertain). Prints the test accuracy of the head fitted on the
final labelled set, per seed and on average.

scale: --n synthetic unit rows of similarity.PROJECTED dimensions (the spatial embedding --check_data searches),
with planted copies; similarity.neighbours' blocked exact search (the near-duplicate shortlist); time and the
process's peak RSS.
"""

import random
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from clean_estimate_bench import features_of  # noqa: E402
from finetune_bench import build_set  # noqa: E402
from scale_bench import cpu_line  # noqa: E402

import calibration  # noqa: E402
import data_loop  # noqa: E402
import probe  # noqa: E402
import similarity  # noqa: E402
from cli import ArgumentParser  # noqa: E402

STRATEGIES = ("random", "uncertainty", "rank_for_labelling")
L2 = 1e-2  # the head's penalty, the same for every strategy


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--parts", nargs="+", choices=["labelling", "scale"], default=["labelling", "scale"])
    p.add_argument("--sets", nargs="+", default=["fashion_tops", "solar_mono", "solar_poly"])
    p.add_argument("--per_class", type=int, default=250, help="pool images per class")
    p.add_argument("--test_per_class", type=int, default=80)
    p.add_argument("--start", type=int, default=10, help="labelled images per class at the start")
    p.add_argument("--picks", type=int, default=20, help="images labelled per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--imbalance",
        type=float,
        nargs="+",
        default=[1.0],
        help="pool imbalance ratios to simulate, each a run: the first class keeps 1/R of its pool images, the last "
        "all, those between a geometric share (defective is the first of the solar sets' classes); the test stays "
        "balanced",
    )
    p.add_argument("--data", default=str(ROOT / "data" / "data_loop_bench"), help="where the sets are built")
    p.add_argument("--n", type=int, default=100_000, help="rows of the scale part")
    return p.parse_args(argv)


def fit(x, y, n_classes):
    head = torch.nn.Linear(x.shape[1], n_classes)
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    with torch.enable_grad():
        probe.fit_head(head, x, y, torch.nn.functional.cross_entropy, L2)
    return head


def pick(strategy, head, x, unlabelled, n, rng):
    if strategy == "random":
        return rng.sample(unlabelled, n)
    with torch.no_grad():
        probs = torch.softmax(head(x[unlabelled]), 1)
    uncertainty = calibration.Calibration().uncertainty(probs)
    if strategy == "uncertainty":
        chosen = torch.argsort(uncertainty, descending=True)[:n].tolist()
    else:
        emb = torch.nn.functional.normalize(x[unlabelled], dim=1)
        chosen = similarity.k_center(emb, n, uncertainty, pool=data_loop.POOL)
    return [unlabelled[i] for i in chosen]


def imbalanced(pool, n_classes, ratio):
    """The pool with class c cut to 1/ratio ** ((n_classes - 1 - c) / (n_classes - 1)) of its images (its first
    ones by file name: the sets were written in their source's shuffled or arbitrary order)."""
    x, y = pool
    keep = []
    for c in range(n_classes):
        rows = (y == c).nonzero().flatten()
        keep += rows[: round(len(rows) / ratio ** ((n_classes - 1 - c) / max(n_classes - 1, 1)))].tolist()
    keep = torch.tensor(sorted(keep))
    return x[keep], y[keep]


def simulate(pool, test, n_classes, strategy, seed, args):
    (x, y), (tx, ty) = pool, test
    rng = random.Random(seed)
    labelled = [i for c in range(n_classes) for i in rng.sample((y == c).nonzero().flatten().tolist(), args.start)]
    for _ in range(args.rounds):
        head = fit(x[labelled], y[labelled], n_classes)
        chosen = set(labelled)
        labelled += pick(strategy, head, x, [i for i in range(len(y)) if i not in chosen], args.picks, rng)
    head = fit(x[labelled], y[labelled], n_classes)
    picked = y[labelled[n_classes * args.start :]]
    with torch.no_grad():
        return float((head(tx).argmax(1) == ty).float().mean()), float((picked == 0).float().mean())


def labelling(args):
    print(
        f"labelling: start {args.start} per class, {args.rounds} rounds of {args.picks} picks; test accuracy of "
        "the head fitted on the final labelled set\n"
    )
    print("| set | pool imbalance | pool / test images | seed | " + " | ".join(STRATEGIES) + " |")
    print("|---|---|---|---|" + "---|" * len(STRATEGIES))
    gains, rare = {}, {}
    for name in args.sets:
        root = build_set(name, Path(args.data) / name, args.per_class, args.test_per_class)
        (_, py, px), (_, ty, tx) = (features_of(root / split, 224) for split in ("train", "test"))
        test, n_classes = (tx, ty), int(py.max()) + 1
        for ratio in args.imbalance:
            pool = imbalanced((px, py), n_classes, ratio)
            if int(torch.bincount(pool[1]).min()) <= args.start:
                raise SystemExit(f"--imbalance {ratio:g} leaves {name}'s first class no more than --start images")
            ran = {s: [simulate(pool, test, n_classes, s, seed, args) for seed in args.seeds] for s in STRATEGIES}
            results = {s: [accuracy for accuracy, _ in v] for s, v in ran.items()}
            rare[name, ratio] = {s: sum(share for _, share in v) / len(v) for s, v in ran.items()}
            for k, seed in enumerate(args.seeds):
                cells = " | ".join(f"{results[s][k]:.4f}" for s in STRATEGIES)
                print(f"| {name} | {ratio:g} | {len(pool[1])} / {len(test[1])} | {seed} | {cells} |")
            means = {s: sum(v) / len(v) for s, v in results.items()}
            print(f"| {name} | {ratio:g} | | mean | " + " | ".join(f"{means[s]:.4f}" for s in STRATEGIES) + " |")
            gains[name, ratio] = 100 * (means["rank_for_labelling"] - means["random"])
    print()
    for (name, ratio), gain in gains.items():
        print(
            f"{name}, pool imbalance {ratio:g}: --rank_for_labelling's picks {gain:+.2f} points over random picks "
            "(mean over the seeds); picks of the first class: "
            + ", ".join(f"{s} {share:.0%}" for s, share in rare[name, ratio].items())
        )


def scale(args):
    torch.manual_seed(0)
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    emb = torch.nn.functional.normalize(torch.randn(args.n, similarity.PROJECTED), dim=1)
    copies = torch.randint(0, args.n, (args.n // 100,))  # 1% planted near-copies: a row plus a little noise
    emb[-len(copies) :] = torch.nn.functional.normalize(emb[copies] + 0.05 * torch.randn(len(copies), emb.shape[1]), 1)
    start = time.perf_counter()
    idx, sims = similarity.neighbours(emb, similarity.NEIGHBOURS)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    found = (idx[-len(copies) :, 0] == copies).float().mean()
    print(
        f"scale: {args.n} rows x {emb.shape[1]} dims, {similarity.NEIGHBOURS} nearest each, blocks of "
        f"{similarity.BLOCK} rows: {seconds:.1f} s, peak RSS {peak:.0f} MB (before the rows: {start_rss:.0f} MB; the "
        f"rows alone {emb.numel() * 4 / 2**20:.0f} MB); planted copies found first: {found:.1%}"
    )


def main(args):
    if any(r < 1 for r in args.imbalance):
        raise SystemExit("--imbalance: ratios of 1 (balanced) or more")
    print(cpu_line(), f"{torch.get_num_threads()} threads\n")
    if "labelling" in args.parts:
        labelling(args)
    if "scale" in args.parts:
        scale(args)


if __name__ == "__main__":
    main(parse_args())
