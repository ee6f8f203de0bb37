"""train.py --find_lr: the learning-rate range test (Smith 2017, "Cyclical Learning Rates"; fastai's lr_find).

With the run's own model, freezing, optimizer, loss and data, the learning rate grows exponentially from
START_LR to END_LR over at most MAX_STEPS mini-batches (one pass over the training images, repeated when
it is shorter), the loss is smoothed, and the test stops when the smoothed loss exceeds DIVERGE times its
lowest value. The initial weights and optimizer state are restored afterwards. With --freeze the steps
run on the feature cache (seconds); otherwise through the whole model with augmentation.

Three suggestions are computed from the smoothed curve (without its first tenth and its last 5 steps, as
fastai): `valley` (fastai's default: the longest descending stretch, taken two thirds along it),
`steepest` (the steepest descent per decade, along the clear descent before the curve diverges) and `minimum`
(the lowest loss divided by 10); none when the curve has no clear descent (a flat or noisy curve). bench/lr_bench.py
measures which one trains best; SUGGESTION is that one (steepest: within 1 point of the best of a 5-rate
grid on 6 of 6 runs over three sets, valley on 3 of 6; docs/explain.md)."""

import copy
import csv
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import model_loader
import trainer
from cli import CLIError
from data_loader import TrainSampler
from stages import HEAD
from utils import atomic_open, atomic_savefig, new_figure

START_LR, END_LR = 1e-7, 10.0
MAX_STEPS = 100  # mini-batches at most
MIN_BATCHES = 10  # fewer distinct batches in a pass than this: too little data to suggest anything
BETA = 0.98  # smoothing of the loss (exponential moving average, bias-corrected)
DIVERGE = 4.0  # stop once the smoothed loss is this many times its lowest value
SUGGESTION = "steepest"  # the rule printed as the suggested --lr: the best of the three in bench/lr_bench.py


@dataclass
class RangeTest:
    lrs: list = field(default_factory=list)  # the head's learning rate at each step
    losses: list = field(default_factory=list)  # the mini-batch's training loss
    smoothed: list = field(default_factory=list)
    stopped: str = ""  # why the test ended before MAX_STEPS ("" = it ran them all)
    suggestions: dict = field(default_factory=dict)  # rule -> learning rate
    seconds: float = 0.0


def lr_at(step, steps, start=START_LR, end=END_LR):
    return start * (end / start) ** (step / max(1, steps - 1))


def smooth(losses, beta=BETA):
    """Exponential moving average with bias correction (the first value is the first loss)."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def valley(losses):
    """fastai's rule: the longest run of steps along which the loss keeps falling (a longest decreasing
    subsequence ending at each step); the index two thirds of the way along it."""
    n = len(losses)
    longest = [1] * n
    start = end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and longest[i] < longest[j] + 1:
                longest[i] = longest[j] + 1
        if longest[i] > longest[end]:
            end = i
            start = end - longest[end]
    third = (end - start) / 3
    return max(0, start + int(third) + int(third / 2))


def steepest(lrs, losses):
    """The index where the loss falls fastest per unit of log learning rate."""
    slopes = [(losses[i + 1] - losses[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i])) for i in range(len(lrs) - 1)]
    return min(range(len(slopes)), key=slopes.__getitem__)


RISE = 1.2  # steepest looks only before the smoothed loss first rises this far above its lowest so far


def diverging_from(losses, rise=RISE):
    """The first index where the loss is `rise` times its lowest so far, once it has fallen below where it started
    (len(losses) when it never is): past it the test diverges, and a single low mini-batch loss among the
    exploding ones makes a steep, false fall. (Cross-entropy losses are positive: a lowest of 0 never diverges.)"""
    lowest = math.inf
    for i, loss in enumerate(losses):
        lowest = min(lowest, loss)
        if loss > rise * lowest > 0 and lowest < losses[0]:
            return i
    return len(losses)


MIN_FALL = 0.1  # a clear descent: the smoothed loss falls at least this share below its start before diverging


def descent(losses, min_fall=MIN_FALL):
    """(first, last): the stretch where the loss clearly falls, from the last point still within a tenth of the
    fall below the start (before it, ups and downs of a noisy start are no descent) to the lowest point before
    the divergence; None when that lowest point is not `min_fall` below the start (a flat or noisy curve)."""
    last = min(range(max(1, diverging_from(losses))), key=losses.__getitem__)
    fall = losses[0] - losses[last]
    if not (fall > 0 and fall >= min_fall * abs(losses[0])):  # (NaN: no descent either)
        return None
    first = max(i for i in range(last + 1) if losses[i] >= losses[0] - fall / 10)
    return first, last


def trimmed(lrs, smoothed):
    """The curve the rules read: without its first tenth and its last 5 steps (as fastai)."""
    lo, hi = len(lrs) // 10, len(lrs) - 5
    return lrs[lo:hi], smoothed[lo:hi]


def suggest(lrs, smoothed):
    """{rule: learning rate} from the curve without its first tenth and last 5 steps, each from before the loss
    diverged (steepest: only along its clear descent); {} when too short, or when it has no clear descent (see
    descent)."""
    lrs, losses = trimmed(lrs, smoothed)
    if len(lrs) < 3 or descent(losses) is None:
        return {}
    first, last = descent(losses)
    end = max(1, diverging_from(losses))  # past it a low mini-batch loss among exploding ones is no minimum
    return {
        "valley": lrs[valley(losses[:end])],
        "steepest": lrs[first + steepest(lrs[first : last + 1], losses[first : last + 1])],
        "minimum": lrs[min(range(end), key=losses.__getitem__)] / 10,
    }


def no_suggestion(test):
    """Why the curve gives no suggestion, in a line ("" when it gives one)."""
    lrs, losses = trimmed(test.lrs, test.smoothed)
    if len(lrs) < 3:
        return f"the loss diverged after {len(test.lrs)} steps ({test.stopped}), too soon to suggest a learning rate"
    if descent(losses) is None:
        end = max(1, diverging_from(losses))
        low = min(losses[:end])
        return (
            f"the smoothed loss shows no clear descent: from {losses[0]:.3g} its lowest is {low:.3g} (at --lr "
            f"{lrs[losses.index(low)]:.1e}), less than {MIN_FALL:.0%} lower, before it "
            + ("diverges" if end < len(losses) or test.stopped else "ends")
            + "; the curve is flat or too noisy to read (more images, or a larger --batch_size, may help)"
        )
    return ""


def range_test(fitter, batch_size):
    """Run the test with the Fitter's model, optimizer, loss and data (a trainer.Fitter as train.py builds
    it); returns a RangeTest, or None when a stop signal arrived. Weights (BatchNorm statistics too) and the
    optimizer's state are restored; its schedule is not, so the Fitter is not meant to train afterwards."""
    compute, model = fitter.compute, fitter.model
    start = time.perf_counter()
    weights = copy.deepcopy(model.state_dict())
    optimizer_state = copy.deepcopy(fitter.optimizer.state_dict())
    base_lr = fitter.optimizer.param_groups[0]["initial_lr"]
    steps = MAX_STEPS
    schedule = torch.optim.lr_scheduler.LambdaLR(fitter.optimizer, lambda step: lr_at(step, steps) / base_lr)
    test = RangeTest()
    try:
        first = first_steps(fitter, batch_size)
        if first is None:
            return None
        step_model, batches = first
        for step in range(steps):
            x, y = next(batches)
            test.lrs.append(fitter.optimizer.param_groups[0]["lr"])
            loss = one_step(fitter, step_model, x, y, schedule)
            test.losses.append(loss)
            test.smoothed = smooth(test.losses)
            if compute.stop_requested():
                return None
            if not math.isfinite(loss):
                test.stopped = "the loss is not a number"
                break
            if step > 0 and test.smoothed[-1] > DIVERGE * min(test.smoothed):
                test.stopped = f"the loss passed {DIVERGE:g}x its lowest"
                break
    finally:
        model.load_state_dict(weights)
        fitter.optimizer.load_state_dict(optimizer_state)
    test.suggestions = suggest(test.lrs, test.smoothed)
    test.seconds = time.perf_counter() - start
    return test


def save_plot(test, path):
    """Loss against learning rate (log axis): the steps' losses faint, the smoothed curve, the suggestions."""
    import matplotlib.pyplot as plt

    fig = new_figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(test.lrs, test.losses, color="0.75", linewidth=0.8, label="mini-batch loss")
    ax.plot(test.lrs, test.smoothed, color="tab:blue", label="smoothed")
    markers = {"valley": ("tab:red", "o"), "steepest": ("tab:green", "v"), "minimum": ("tab:purple", "s")}
    for rule, lr in test.suggestions.items():
        i = min(range(len(test.lrs)), key=lambda k: abs(math.log(test.lrs[k]) - math.log(lr)))
        color, marker = markers[rule]
        ax.plot(
            [lr],
            [test.smoothed[i]],
            marker=marker,
            color=color,
            markersize=9 if rule == SUGGESTION else 6,
            linestyle="none",
            label=f"{rule} {lr:.1e}" + (" (suggested)" if rule == SUGGESTION else ""),
        )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (--lr)")
    ax.set_ylabel("training loss")
    low, high = min(test.smoothed + test.losses), max(test.smoothed[: max(1, len(test.smoothed) // 2)])
    ax.set_ylim(low - 0.1 * abs(low), max(high, low) * 1.3 + 1e-3)  # the raw losses' lows stay in view
    ax.legend(fontsize=8)
    ax.set_title("learning-rate range test")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)


def write_csv(test, path):
    with atomic_open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "lr", "loss", "smoothed"])
        for i, (lr, loss, sm) in enumerate(zip(test.lrs, test.losses, test.smoothed)):
            writer.writerow([i, f"{lr:.6g}", f"{loss:.6f}", f"{sm:.6f}"])


def find_lr(fitter, run_dir, say):
    """The whole --find_lr: the test, lr_find.png and lr_find.csv in the run folder, the printed suggestion.
    Returns the RangeTest (None when stopped or when there is too little data)."""
    batch_size = fitter.loaders.train.batch_size
    start = time.perf_counter()
    if (
        fitter.plan.kind(0) == HEAD and not fitter.ensure_cache()
    ):  # the pass length counts readable images: the cache knows them
        return None
    if batches_per_pass(fitter) < MIN_BATCHES:
        say(
            f"--find_lr: {len(fitter.splits.train)} training images make {batches_per_pass(fitter)} batches of "
            f"{batch_size}; the range test needs {MIN_BATCHES} or more (more images, or a smaller "
            "--batch_size), so no learning rate is suggested"
        )
        return None
    test = range_test(fitter, batch_size)
    if test is None:
        return None
    test.seconds = time.perf_counter() - start  # with the feature cache's pass
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_csv(test, Path(run_dir) / "lr_find.csv")
    why = no_suggestion(test)
    if why and why.startswith("the loss diverged"):
        say(f"--find_lr: {why}; see {Path(run_dir) / 'lr_find.csv'}")
        return test
    save_plot(test, Path(run_dir) / "lr_find.png")
    if why:
        say(f"warning: --find_lr: no learning rate is suggested: {why}; see {Path(run_dir) / 'lr_find.png'}")
        return test
    mode = first_phase(fitter)
    others = ", ".join(f"{rule} {lr:.1e}" for rule, lr in test.suggestions.items() if rule != SUGGESTION)
    say(
        f"learning-rate range test ({mode}): {len(test.lrs)} steps from {test.lrs[0]:.0e} to {test.lrs[-1]:.1e}"
        + (f", stopped: {test.stopped}" if test.stopped else "")
        + f"; {test.seconds:.1f}s"
    )
    say(
        f"suggested --lr {test.suggestions[SUGGESTION]:.1e} ({SUGGESTION}; also {others}); "
        f"figure {Path(run_dir) / 'lr_find.png'}; the model was not trained or saved"
    )
    return test


def cached_batches(cache, labels, seed, batch_size, weights=None):
    """Endless (features, labels) batches from the feature cache: one seeded order per pass (weighted with
    --balanced_sampler), one cached view per image drawn per pass, as train_head_epoch."""
    sampler = TrainSampler(len(labels), seed, weights=weights)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        order = torch.tensor([i for i, _ in sampler], dtype=torch.long)
        order = order[cache.train_ok[order]]
        view = torch.randint(cache.train.shape[0], (len(order),), generator=torch.Generator().manual_seed(seed + epoch))
        for s in range(0, len(order), batch_size):
            yield cache.train[view[s : s + batch_size], order[s : s + batch_size]], labels[order[s : s + batch_size]]
        epoch += 1


def image_batches(loader):
    """Endless (images, labels) training batches (augmented), a new seeded order per pass."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        readable = 0
        for batch in loader:
            if batch.labels.numel():
                readable += 1
                yield batch.images, batch.labels
        if not readable:
            raise CLIError("--find_lr: none of the training images could be read")
        epoch += 1


# ----------------------------------------------------------------------------- the first epoch's steps, one at a time
# (what the range test runs instead of an epoch)


def first_steps(fitter, batch_size):
    """(module, endless (inputs, labels) batches) as the Fitter's first epoch trains: the head on cached features
    when it uses the cache (built here), else the model on augmented images, with the first epoch's parameters
    trainable; None when a stop signal arrived while the cache was built."""
    frozen = fitter.plan.backbone_frozen(0)
    model_loader.set_backbone_trainable(fitter.model, fitter.head, not frozen)
    if fitter.plan.kind(0) == HEAD:
        if not fitter.ensure_cache():
            return None
        return fitter.model.get_submodule(fitter.head).train(), cached_batches(
            fitter.cache, fitter.train_labels, fitter.config.seed, batch_size, fitter.loaders.train.sampler.weights
        )
    model_loader.set_train_mode(fitter.model, fitter.head, frozen, fitter.config.batchnorm)
    return fitter.model, image_batches(fitter.loaders.train)


def one_step(fitter, module, inputs, labels, schedule):
    """One training step of `module` with the Fitter's optimizer, loss and scaler under `schedule`; its loss."""
    meter = trainer.Meter(fitter.task)
    inputs, labels = fitter.compute.to_device(inputs, labels, train=True)
    trainer.train_step(
        module,
        inputs,
        labels,
        fitter.optimizer,
        schedule,
        fitter.scaler,
        fitter.criterion,
        fitter.compute,
        meter,
        whole=module is fitter.model and not fitter.plan.backbone_frozen(0),
    )
    return meter.loss / meter.count


def batches_per_pass(fitter):
    """Training batches in one pass over the readable images (the feature cache knows which are readable)."""
    n = int(fitter.cache.train_ok.sum()) if fitter.cache is not None else len(fitter.splits.train)
    return math.ceil(n / fitter.loaders.train.batch_size)


def first_phase(fitter):
    """What the first epoch trains, in words."""
    if fitter.cache is not None:
        return "head on cached features"
    return "head only, frozen backbone" if fitter.plan.backbone_frozen(0) else "whole model"
