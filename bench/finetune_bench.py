"""Fine-tuning benchmark (a script, not a test): does the default fine-tune beat the frozen backbone, what
each part of the recipe does, what the linear probe costs, and how fast a fine-tuning epoch runs.

  python bench/finetune_bench.py                                  # 3 sets x 3 seeds x 3 modes; ~40 min on 2 CPUs
  python bench/finetune_bench.py --sets solar_mono --seeds 0 --modes default bn_train bn_reestimate
  python bench/finetune_bench.py --speed_only                     # the epoch speed, default vs fp32 NCHW

Needs: the Debian package dataset-fashion-mnist, and `pip install elpv-dataset` (solar-cell images,
Buerhop-Lutz et al. 2018; not needed by the tool itself).

Sets (images stored at their own size, seen at 224 px; --per_class training images per class, of which
train.py holds out 20% for validation, and --test_per_class test images):
  solar_mono   monocrystalline solar cells, functional vs defective (electroluminescence, 300 px)
  fashion_tops Fashion-MNIST's look-alike tops: t-shirt, pullover, coat, shirt (28 px product photos)
  solar_poly   polycrystalline solar cells, functional vs defective (the set nothing was tuned on)

Modes, each `train.py --model_name efficientnet_lite0 --use_pretrained --n_epochs --epochs` plus:
  frozen         --freeze (its SGD epochs, then the linear probe; the better by validation loss kept)
  frozen_sgd     --freeze --no_probe (the SGD epochs alone)
  probe          not a train.py run: the linear probe alone, fitted in this process on the same split and features
                 as train.py's (`--modes frozen_sgd probe frozen`: is the kept head ever worse than the better one?)
  average        not a train.py run: the mean of frozen_sgd's head and the probe (run after frozen_sgd, it reuses
                 that run's checkpoint), with the three heads' validation losses
  default        (nothing: the linear probe, then fine-tuning with the defaults)
  old            --no_probe --batchnorm train (the fine-tune before the probe: a new head, BatchNorm in
                 training mode)
  bn_train, bn_reestimate, decay, light, no_probe   one change from default each (--batchnorm train,
                 --batchnorm reestimate, --layer_decay 0.7, --augment light, --no_probe)
Each run is a process, as a user runs it; the figures are read from what it prints.
"""

import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "data"))

from cli import ArgumentParser, run_cli  # noqa: E402
from timed import run  # noqa: E402

MODES = {
    "frozen": ["--freeze"],
    "frozen_sgd": ["--freeze", "--no_probe"],
    "default": [],
    "old": ["--no_probe", "--batchnorm", "train"],
    "bn_train": ["--batchnorm", "train"],
    "bn_reestimate": ["--batchnorm", "reestimate"],
    "decay": ["--layer_decay", "0.7"],
    "light": ["--augment", "light"],
    "no_probe": ["--no_probe"],
}
SETS = ("solar_mono", "fashion_tops", "solar_poly")
TOPS = ["tshirt_top", "pullover", "coat", "shirt"]


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    p.add_argument("--modes", nargs="+", choices=[*MODES, "probe", "average"], default=["frozen", "old", "default"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--per_class", type=int, default=120, help="training images per class (20%% become validation)")
    p.add_argument("--test_per_class", type=int, default=80)
    p.add_argument("--data", default=str(ROOT / "data" / "finetune_bench"), help="where the sets are built")
    p.add_argument("--speed_only", action="store_true", help="only the epoch speed: default against fp32 NCHW")
    return p.parse_args(argv)


def save(img, folder, name):
    folder.mkdir(parents=True, exist_ok=True)
    img.save(folder / f"{name}.png")


def build_set(name, root, per_class, test_per_class):
    """root/{train,test}/<class>/*.png, built once (a 'done' file marks it)."""
    if (root / "done").exists():
        return root
    import random

    rng = random.Random(0)
    if name.startswith("solar"):
        from ood_bench import solar_cells

        kind = "mono" if name == "solar_mono" else "poly"
        cells = [c for c in solar_cells() if c[0] == kind]
        rng.shuffle(cells)
        for cls, keep in (("functional", lambda p: p == 0), ("defective", lambda p: p >= 2 / 3)):
            chosen = [c for c in cells if keep(c[1])][: per_class + test_per_class]
            for i, (_, _, img) in enumerate(chosen):
                save(img, root / ("test" if i < test_per_class else "train") / cls, f"{cls}_{i:04d}")
    else:
        from ood_bench import write_fashion

        write_fashion(root / "train", "train", TOPS, per_class)
        write_fashion(root / "test", "t10k", TOPS, test_per_class)
    (root / "done").touch()
    return root


def train(data, mode, seed, epochs, work, extra=()):
    """(wall seconds, stdout) of one train.py process."""
    out = Path(work) / f"{data.name}_{mode}_{seed}"
    cmd = [
        sys.executable,
        ROOT / "train.py",
        "--data_dir",
        data,
        "--model_name",
        "efficientnet_lite0",
        "--use_pretrained",
        "--n_epochs",
        epochs,
        "--seed",
        seed,
        "--model_fn",
        out / "m.pth",
        "--log_dir",
        out / "run",
        "--verbose",
        "1",
        "--ood_method",
        "none",
        *MODES.get(mode, []),
        *extra,
    ]
    return run(cmd)


def probe_only(data, seed, work):
    """The linear probe's test accuracy as train.py fits it (its seeded split, head init, eval-view features,
    probe.fit_probe through stages.probe_on_cache), in this process; (seconds, a stdout train.py would print)."""
    start = time.perf_counter()
    test = fitted_probe(data, seed, work)["test"]
    return time.perf_counter() - start, f"test accuracy {test(None):.4f} on {test.count} images"


def average_head(data, seed, work, epochs):
    """The average of the two heads --freeze compares (a linear head too: its logits are the mean of theirs): the
    SGD head of a `frozen_sgd` run (run here unless this seed's is already in `work`) and the probe; (seconds, a
    stdout with its test accuracy and all three heads' validation losses)."""
    import torch

    start = time.perf_counter()
    checkpoint = Path(work) / f"{data.name}_frozen_sgd_{seed}" / "m.pth"
    if not checkpoint.exists():
        train(data, "frozen_sgd", seed, epochs, work)
    fitted = fitted_probe(data, seed, work)
    prefix = fitted["head"] + "."
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    sgd = {k[len(prefix) :]: v for k, v in saved.items() if k.startswith(prefix)}
    average = {k: (v + sgd[k]) / 2 for k, v in fitted["probe"].items()}
    losses = {name: fitted["valid_loss"](weights) for name, weights in (("sgd", sgd), ("probe", fitted["probe"]))}
    losses["average"] = fitted["valid_loss"](average)
    text = ", ".join(f"{k} {v:.4f}" for k, v in losses.items())
    test = fitted["test"]
    return time.perf_counter() - start, f"test accuracy {test(average):.4f} on {test.count} images; valid loss {text}"


def fitted_probe(data, seed, work):
    """train.py's split, model and eval-view features for this seed, with the probe fitted on them (in this process):
    {"head": its name, "probe": its weights, "valid_loss": f(head weights), "test": f(head weights or None for the
    probe) -> test accuracy}."""
    import copy

    import torch

    import data_loader as dl
    import evaluation
    import features
    import model_loader as ml
    import stages
    import tasks
    from utils import Compute, DistInfo, seed_everything

    task, splits = tasks.SingleLabel(), dl.build_splits(data, 0.2, seed)
    seed_everything(seed)
    model, head = ml.build_model("efficientnet_lite0", len(splits.class_names), True, log=lambda *a: None)
    defaults = ml.model_defaults("efficientnet_lite0")
    loaders = dl.build_loaders(splits, 224, 256, defaults["mean"], defaults["std"], 32, 0, seed, task=task)
    compute = Compute(torch.device("cpu"), dist=DistInfo())
    skips = dl.SkipLog(splits.train, splits.class_names, print, task)
    cache = features.build_feature_cache(model, head, loaders, 1, 2048, Path(work) / "probe.bin", compute, skips)
    labels = [task.tensor(y for _, y in part) for part in (splits.train, splits.valid)]
    module = model.get_submodule(head)
    stages.probe_on_cache(module, cache, *labels, torch.nn.CrossEntropyLoss(), task, compute)
    fitted = copy.deepcopy(module.state_dict())
    valid_x, valid_y = cache.valid[0, cache.valid_ok].float(), labels[1][cache.valid_ok]

    def valid_loss(weights):
        module.load_state_dict(weights)
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(module(valid_x).float(), valid_y))

    def test(weights):
        module.load_state_dict(fitted if weights is None else weights)
        logits, y = evaluation.collect_logits(model.eval(), loaders.test, compute, "test")
        test.count = len(y)
        return float((logits.argmax(1) == y).float().mean())

    return {"head": head, "probe": fitted, "valid_loss": valid_loss, "test": test}


def figures(seconds, stdout):
    test = re.search(r"test accuracy ([\d.]+)", stdout)
    probe = re.search(
        r"linear probe \(L2 (\S+)\) .*\(times: feature cache ([\d.]+)s, probe ([\d.]+)s, SGD head ([\d.]+)s\)", stdout
    )
    rates = [float(r) for r in re.findall(r"([\d.]+) img/s", stdout)]
    kept = re.search(r"^(fine-tuning improved.*|kept .*)$|(valid loss sgd .*)$", stdout, re.M)
    return {
        "acc": float(test.group(1)) if test else float("nan"),
        "seconds": seconds,
        "probe_s": sum(float(probe.group(i)) for i in (2, 3, 4)) if probe else 0.0,
        "l2": probe.group(1) if probe else "",
        "rate": max(rates) if rates else float("nan"),
        "kept": (kept.group(1) or kept.group(2)) if kept else "",
    }


def mean_sd(values):
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def speed(data, work):
    """Images/s of fine-tuning epochs (train + valid) as the product runs them and in fp32 NCHW, in turns."""
    rows = []
    for label, extra in (
        ("default (bf16 where native, channels_last)", []),
        ("fp32 NCHW (--no_amp --no_channels_last)", ["--no_amp", "--no_channels_last"]),
    ) * 2:
        seconds, out = train(data, "default", 0, 2, work, extra)
        rows.append((label, max(float(r) for r in re.findall(r"([\d.]+) img/s", out)), seconds))
    print("\n| fine-tuning epoch | images/s (best epoch) | whole run, 2 epochs |\n|---|---|---|")
    for label, rate, seconds in rows:
        print(f"| {label} | {rate:.1f} | {seconds:.0f} s |")
    best = {label: max(r for lab, r, _ in rows if lab == label) for label, _, _ in rows}
    first, second = list(best.values())
    print(f"\nspeed-up of the default over fp32 NCHW (best of 2 each): {first / second:.2f}x")


def main(args):
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    flags = open("/proc/cpuinfo").read()
    print(
        f"CPU: {cpu}, AVX512-BF16: {'yes' if ' avx512_bf16' in flags else 'no'}; EfficientNet-Lite0, ImageNet "
        f"weights, 224 px, {args.epochs} epochs, seeds {args.seeds}"
    )
    root = Path(args.data)
    sets = {name: build_set(name, root / name, args.per_class, args.test_per_class) for name in args.sets}
    with tempfile.TemporaryDirectory() as work:
        if args.speed_only:
            return speed(sets[args.sets[0]], work)
        results = {}
        for name, data in sets.items():
            for seed in args.seeds:
                for mode in args.modes:
                    start = time.perf_counter()
                    if mode == "probe":
                        ran = probe_only(data, seed, work)
                    elif mode == "average":
                        ran = average_head(data, seed, work, args.epochs)
                    else:
                        ran = train(data, mode, seed, args.epochs, work)
                    results[name, mode, seed] = r = figures(*ran)
                    print(
                        f"{name} {mode} seed {seed}: test accuracy {r['acc']:.3f}, {r['seconds']:.0f} s"
                        + (f", probe {r['probe_s']:.1f} s (L2 {r['l2']})" if r["probe_s"] else "")
                        + (f"; {r['kept']}" if r["kept"] else "")
                        + f"  [{time.perf_counter() - start:.0f} s]",
                        flush=True,
                    )
    print("\ntest accuracy, mean ± sd over the seeds")
    print("\n| set | " + " | ".join(args.modes) + " |\n|---|" + "---|" * len(args.modes))
    for name in sets:
        cells = [mean_sd([results[name, m, s]["acc"] for s in args.seeds]) for m in args.modes]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nwhole train.py run (mean)")
    print("\n| set | " + " | ".join(args.modes) + " |\n|---|" + "---|" * len(args.modes))
    for name in sets:
        cells = [f"{statistics.mean(results[name, m, s]['seconds'] for s in args.seeds):.0f} s" for m in args.modes]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for mode, what in (("frozen", "--freeze"), ("average", "the average of the two heads")):
        if {mode, "frozen_sgd", "probe"} <= set(args.modes):
            short = [
                max(results[n, "frozen_sgd", s]["acc"], results[n, "probe", s]["acc"]) - results[n, mode, s]["acc"]
                for n in sets
                for s in args.seeds
            ]
            print(
                f"\n{what} against the better of its SGD head and the probe alone, {len(short)} runs: at most "
                f"{100 * max(short):.1f} points below it (mean {100 * statistics.mean(short):.2f}; within 0.5 point "
                f"in {sum(x <= 0.005 for x in short)})"
            )
    probed = [r for r in results.values() if r["probe_s"]]
    if probed:
        share = [r["probe_s"] / r["seconds"] for r in probed]
        print(
            f"probe stage (feature cache + fit) {statistics.mean(share):.1%} of the run on average, at most "
            f"{max(share):.1%}"
        )


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
