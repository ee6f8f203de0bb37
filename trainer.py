"""The training loop: one epoch, evaluation, head epochs on the feature cache (features.py), the fit loop
with early stopping, best/last checkpoints, TensorBoard and metrics.csv logging, and exact resume."""
import copy
import csv
import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch

import evaluation
import model_loader
from cli import CLIError
from data_loader import Preprocess, SkipLog, TrainSampler, load_rgb
from features import build_feature_cache, head_takes_features
import probe
from utils import (all_reduce_sum, atomic_open, atomic_torch_save, bar, cpu_has_fast_bf16, image_grid_figure,
                   seed_everything)

LAST_FORMAT = 1  # version of the resumable _last.pth layout


def train_channels_last(device, channels_last):
    """channels_last for training steps too, except on CPUs without AVX512-BF16/AMX: there oneDNN's
    channels_last convolution backward ran 30% slower than NCHW (11.0 s against 8.5 s per two ResNet-34 steps,
    profiled on an AVX2 EPYC), more than its faster forward gains, while forward-only passes gain 1.2-1.3x. The
    weights stay NCHW then; a channels_last input still takes the fast forward path. On an AVX512-BF16 EPYC
    channels_last training steps were faster in fp32 and bf16 alike (bench/finetune_bench.py)."""
    return channels_last and (device.type != "cpu" or cpu_has_fast_bf16())


class Meter:
    """Loss and accuracy sums, summed over processes once at the end. The task says what is correct (the top
    class, or the exact set at probability 0.5) and whether an evaluation keeps the logits for a ranking
    metric (multi-label: the mean average precision, "map")."""

    def __init__(self, task, keep_logits=False):
        self.task = task
        self.loss = self.correct = self.count = 0.0
        self.keep_logits = keep_logits and task.keeps_logits()
        self.kept = []  # (logits, labels) per batch

    def update(self, loss, logits, labels):
        n = len(labels)
        self.loss += float(loss) * n
        self.correct += self.task.correct(logits, labels)
        if self.keep_logits:
            self.kept.append((logits.float().cpu(), labels.cpu()))
        self.count += n

    def result(self, dist=None, device=None):
        loss, correct, count = self.loss, self.correct, self.count
        kept = [self.kept]
        if dist is not None and dist.enabled:
            loss, correct, count = all_reduce_sum([loss, correct, count], dist, device)
            if self.keep_logits:  # every rank has the same task, so every rank takes part
                kept = [None] * dist.world_size
                torch.distributed.all_gather_object(kept, self.kept)
        count = int(round(count))
        out = {"loss": loss / max(count, 1), "accuracy": correct / max(count, 1), "count": count}
        pairs = [pair for part in kept for pair in part]
        if pairs:
            out.update(self.task.epoch_extras(pairs))
        return out


# ----------------------------------------------------------------------------- epochs


def train_step(model, images, labels, optimizer, scheduler, scaler, criterion, compute, meter, whole=False):
    """Forward, backward, optimizer and schedule step for one batch (the same for images and features); `whole`
    when the backbone trains too (fine-tuning's precision, Compute.autocast)."""
    with compute.autocast(train=whole):
        logits = model(images)
        loss = criterion(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    meter.update(loss.detach(), logits.detach(), labels)


def train_one_epoch(model, loader, optimizer, scheduler, scaler, criterion, compute, skips, desc="train",
                    whole=False):
    """One pass over the loader. Returns metrics, or None when a stop signal arrived (epoch abandoned)."""
    meter = Meter(loader.dataset.task)
    for batch in bar(loader, compute, desc):
        skips.add(batch.bad)
        if batch.labels.numel():
            images, labels = compute.to_device(batch.images, batch.labels, train=True)
            train_step(model, images, labels, optimizer, scheduler, scaler, criterion, compute, meter, whole)
        if compute.stop_requested():
            return None
    return meter.result(compute.dist, compute.device)


def eval_step(model, inputs, labels, compute, meter):
    """The task's plain loss (no class weights or smoothing), so validation losses compare across runs."""
    with compute.autocast():
        logits = model(inputs).float()
    meter.update(meter.task.eval_loss(logits, labels), logits, labels)


@torch.inference_mode()
def evaluate(model, loader, compute, skips=None, desc="valid"):
    """Loss and accuracy over the whole loader, each image once over all processes."""
    model.eval()
    meter = Meter(loader.dataset.task, keep_logits=True)
    for batch in bar(loader, compute, desc):
        if skips is not None:
            skips.add(batch.bad, loader.dataset.samples)
        if batch.labels.numel():
            eval_step(model, *compute.to_device(batch.images, batch.labels), compute, meter)
    return meter.result(compute.dist, compute.device)


# ----------------------------------------------------------------------------- head epochs on cached features


def train_head_epoch(head_module, cache, labels, sampler, batch_size, optimizer, scheduler, scaler, criterion,
                     compute, epoch, task):
    """One epoch of the classifier on cached features; same sampler order and batch size as the image loop.
    Each image uses one of its cached views, drawn per epoch."""
    head_module.train()
    meter = Meter(task)
    order = torch.tensor([i for i, _ in sampler], dtype=torch.long)
    views = cache.train.shape[0]
    g = torch.Generator().manual_seed(sampler.seed * 7919 + epoch)
    view_of = torch.randint(views, (len(order),), generator=g)
    for start in range(0, len(order), batch_size):
        idx, view = order[start:start + batch_size], view_of[start:start + batch_size]
        keep = cache.train_ok[idx]
        idx, view = idx[keep], view[keep]
        if not len(idx):
            continue
        x = cache.train[view, idx].to(compute.device)
        y = labels[idx].to(compute.device)
        train_step(head_module, x, y, optimizer, scheduler, scaler, criterion, compute, meter)
        if compute.stop_requested():
            return None
    return meter.result()


def evaluate_head(head_module, features, ok, labels, batch_size, compute, task):
    """Loss and accuracy of the classifier on the cached eval-view features."""
    return task.metrics(*evaluation.head_logits(head_module, features[0], ok, labels, batch_size, compute))


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
            yield cache.train[view[s:s + batch_size], order[s:s + batch_size]], labels[order[s:s + batch_size]]
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


# ----------------------------------------------------------------------------- schedule


def lr_factor(step, phases, warmup_fraction, schedule):
    """Linear warm-up then cosine decay (to 1%), restarted at each phase (head-only, then fine-tune)."""
    for start, length in reversed(phases):
        if step >= start:
            break
    t = step - start
    warmup = max(1, int(round(length * warmup_fraction)))
    if t < warmup:
        return (t + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (t - warmup) / max(1, length - warmup))
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))


def settled_head_factor(step, schedule, settled_from, scale):
    """The head's factor: the schedule's, times `scale` (the backbone's rate relative to the head's) from step
    `settled_from` on, so that fine-tuning never throws a fitted head back to its own high rate."""
    return schedule(step) * (scale if step >= settled_from else 1.0)


# ----------------------------------------------------------------------------- logging


BASE_METRICS = ("loss", "accuracy", "count")  # every evaluation's; a task may add more (multi-label: map)
TAGS = {"valid_map": "Validation/mAP"}  # TensorBoard's name of an added validation metric, else Validation/<name>


def added_metrics(valid):
    """The validation metrics the task adds to loss and accuracy (tasks.py epoch_extras), as valid_<name>."""
    return {f"valid_{k}": v for k, v in valid.items() if k not in BASE_METRICS}


def added_columns(row):
    return [k for k in row if k.startswith("valid_") and k[6:] not in BASE_METRICS]


def epoch_row(epoch, train, valid, lr, seconds):
    """One epoch's line of the history (metrics.csv, TensorBoard), with the validation metrics the task adds."""
    row = {"epoch": epoch, "train_loss": train["loss"], "train_accuracy": train["accuracy"],
           "valid_loss": valid["loss"], "valid_accuracy": valid["accuracy"], "lr": lr, "seconds": round(seconds, 3),
           "valid_count": valid["count"]}
    return {**row, **added_metrics(valid)}


def pace(train, valid, seconds, epochs_left):
    """'N img/s, M:SS left': the epoch's images (trained and validated, all processes) per second, and the
    remaining epochs at this epoch's pace."""
    rate = (train["count"] + valid["count"]) / max(seconds, 1e-9)
    left = round(seconds * epochs_left)
    return f"{rate:.1f} img/s, {left // 60}:{left % 60:02d} left"


def write_metrics_csv(history, path):
    """metrics.csv rewritten whole each epoch from the history (a resumed run never duplicates a row)."""
    columns = ["epoch", "train_loss", "train_accuracy", "valid_loss", "valid_accuracy", "lr", "seconds"]
    columns[5:5] = added_columns(history[0]) if history else []
    with atomic_open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


def log_epoch(writer, row):
    step = row["epoch"]
    writer.add_scalar("Train/Loss", row["train_loss"], step)
    writer.add_scalar("Train/Accuracy", row["train_accuracy"], step)
    writer.add_scalar("Validation/Loss", row["valid_loss"], step)
    writer.add_scalar("Validation/Accuracy", row["valid_accuracy"], step)
    for k in added_columns(row):
        writer.add_scalar(TAGS.get(k, f"Validation/{k[6:]}"), row[k], step)
    writer.add_scalar("Train/LR", row["lr"], step)
    writer.flush()


def log_hparams(writer, hparams, metrics, step):
    """Hyperparameters with the best metrics, in the run's own event file (no extra sub-run), at the last
    epoch's step: an event at step 0 after the epochs' would make TensorBoard's steps go backwards."""
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
    for summary in hparams_summary(hparams, metrics):
        writer.file_writer.add_summary(summary, step)
    for k, v in metrics.items():
        writer.add_scalar(k, v, step)
    writer.flush()


def spread_over_classes(samples, n):
    """Up to n samples taken in turn from each class (the first of each class, then the second, ...), so a
    list sorted by class still shows every class."""
    by_class = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    queues = [by_class[c] for c in sorted(by_class)]
    picked = []
    for i in range(max(map(len, queues), default=0)):
        picked += [q[i] for q in queues if i < len(q)]
    return picked[:n]


@torch.inference_mode()
def prediction_grid(model, samples, class_names, meta, compute, task, n=16, calibration=None):
    """A figure of n validation images spread over the classes, titled with the prediction and its calibrated
    probability; wrong ones in red with the true class (multi-label: the predicted set, and the true one)."""
    calibration = calibration or task.uncalibrated(len(class_names))  # none fitted: T 1 (and 0.5 per class)
    preprocess = Preprocess.of(meta)
    show, tf = preprocess.display(), preprocess.transform()
    images, titles, colors = [], [], []
    model.eval()
    for path, label in spread_over_classes(samples, n):
        try:
            img = load_rgb(path)
        except Exception:
            continue
        with compute.autocast():
            logits = model(compute.to_device(tf(img)[None])).float().cpu()
        title, right = task.grid_title(calibration.probabilities(logits)[0], label, class_names, calibration)
        images.append(show(img))
        titles.append(title)
        colors.append("black" if right else "red")
    return image_grid_figure(images, titles, colors, ncols=4, fontsize=12) if images else None


# ----------------------------------------------------------------------------- fit


@dataclass
class TrainState:
    """Everything the resumable checkpoint restores besides model, optimizer, scheduler and scaler."""
    epoch: int = 0  # completed epochs
    best_epoch: int = 0
    best_metrics: dict = field(default_factory=dict)
    bad_epochs: int = 0  # epochs since the best validation loss (early stopping)
    history: list = field(default_factory=list)  # one dict per completed epoch (metrics.csv rows)
    skipped: dict = field(default_factory=dict)  # unreadable files seen so far: path -> label
    probe: dict = field(default_factory=dict)  # the linear probe's outcome (l2, valid_loss, ...), once it ran

    @property
    def best_loss(self):
        return self.best_metrics.get("valid_loss", math.inf)


@dataclass
class FitResult:
    state: TrainState
    interrupted: bool
    stopped_early: bool
    test_metrics: dict
    skipped_per_class: dict
    cache_note: str
    transfer_note: str = ""  # whether fine-tuning beat the head fitted on the frozen backbone (Fitter.transfer_note)
    calibration: object = None  # the task's calibration (tasks.py), None when there were no validation logits
    test_report: object = None  # pandas DataFrame (the task's per-class report) of the test split


@dataclass(frozen=True)
class FitConfig:
    """What the fit loop needs, built by train.py from its flags (nothing below the scripts reads them)."""
    n_epochs: int  # epochs in all (a resumed run counts those already done)
    frozen_epochs: int  # the first epochs train the head alone: all of them with --freeze, else --unfreeze_after
    lr: float  # the head's learning rate (--lr, times the processes with --scale_lr)
    backbone_lr_scale: float  # backbone rate = lr * this (1.0 for a backbone from random init)
    weight_decay: float = 0.01
    warmup: float = 0.05  # share of each phase's steps spent warming up
    lr_schedule: str = "cosine"  # or "constant", after the warm-up
    label_smoothing: float = 0.0
    patience: int = 5  # epochs without a better validation loss before stopping; 0 = never
    seed: int = 42
    feature_cache: bool = True  # frozen epochs train the head on cached backbone features when they can
    cache_views: int = 1
    cache_memory_mb: int = 2048
    save_interval: float = 30  # seconds between checkpoint writes when epochs are shorter
    class_weights: tuple = None  # the loss's per-class weights (--class_weights auto), None = plain
    probe: bool = False  # LP-FT: fit the head on the frozen backbone's cached features first (probe.py)
    batchnorm: str = "train"  # fine-tuning's BatchNorm policy (model_loader.BATCHNORM_POLICIES)
    layer_decay: float = 1.0  # each backbone block's rate = the block above's * this (1.0 = one backbone rate)
    flags: dict = field(default_factory=dict)  # the run's flags, as the checkpoint and TensorBoard record them


class RunFiles:
    """What a run writes as it goes, on rank 0 only: the best checkpoint (model_fn), the resumable last one
    (last_fn) and the TensorBoard event file. An epoch's checkpoints are kept in memory until the last write is
    --save_interval seconds old: head epochs on cached features take milliseconds and a checkpoint write a
    tenth of a second or more, so writing both every epoch would cost more than the training."""

    def __init__(self, model_fn, last_fn, run_dir, save_interval, is_main):
        self.model_fn, self.last_fn, self.run_dir = Path(model_fn), Path(last_fn), Path(run_dir)
        self.save_interval, self.is_main = save_interval, is_main
        self._pending = {}  # checkpoints not written yet: path -> dict
        self._saved_at = -math.inf
        self.writer = None

    def keep(self, best, last, force=False):
        """An epoch's end: the best checkpoint when it improved (else None) and the last one, written now when
        the last write is save_interval seconds old or `force`."""
        if not self.is_main:
            return
        if best is not None:
            self._pending[self.model_fn] = best
        self._pending[self.last_fn] = last
        if force or time.perf_counter() - self._saved_at >= self.save_interval:
            self.write_pending()

    def write_pending(self):
        """Write what keep() held back: the best first, then the last (as resume expects)."""
        if not self.is_main:
            return
        for path in (self.model_fn, self.last_fn):
            if path in self._pending:
                atomic_torch_save(self._pending.pop(path), path)
        self._saved_at = time.perf_counter()

    def best_weights(self, dist):
        """The best checkpoint's weights, read by rank 0 and sent to every rank (other machines may not see its
        disk); None when there is no file."""
        best = [model_loader.safe_load(self.model_fn)["state_dict"] if self.is_main and self.model_fn.exists() else None]
        if dist.enabled:
            torch.distributed.broadcast_object_list(best, src=0)
        return best[0]

    def add_to_best(self, entries, metrics):
        """The best checkpoint once more, with what was fitted after training (the calibration's entries and
        metrics, the out-of-distribution reference)."""
        if not self.is_main or not (entries or metrics):
            return
        ckpt = model_loader.safe_load(self.model_fn)
        ckpt.update(entries)
        ckpt["metrics"].update(metrics)
        atomic_torch_save(ckpt, self.model_fn)

    def open_writer(self, epoch):
        """The run's TensorBoard writer (opened once; purge_step hides events a killed run logged after its last
        checkpoint)."""
        if self.writer is None and self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir), purge_step=epoch + 1 if epoch else None)
        return self.writer

    def close_writer(self):
        if self.writer is not None:
            self.writer.close()


class Fitter:
    """Runs the epochs: the head alone (on the feature cache when it can), then every layer. Owns the optimizer,
    schedule and DDP wrapper; what the run writes goes through its RunFiles (files)."""

    def __init__(self, model, head, splits, loaders, compute, config, meta, model_fn, last_fn, run_dir, log,
                 task=None):
        self.model, self.head, self.splits, self.loaders = model, head, splits, loaders
        self.compute, self.config, self.meta, self.log = compute, config, meta, log
        self.task = task or loaders.train.dataset.task
        self.run_dir = Path(run_dir)
        self.files = RunFiles(model_fn, last_fn, run_dir, config.save_interval, compute.dist.is_main)
        self.dist = compute.dist
        self.frozen_epochs = min(config.frozen_epochs, config.n_epochs)
        features_ok = head_takes_features(model, head, meta["input_size"], compute.device)
        self.probe = config.probe and not self.frozen_epochs and features_ok
        if config.probe and not self.probe and not self.frozen_epochs:
            log(f"linear probe: not available for {meta['model_name']} (its classifier is not the last layer); "
                "fine-tuning from the new head")
        self.cache_possible = features_ok and (config.feature_cache and self.frozen_epochs > 0 or self.probe)
        if config.feature_cache and self.frozen_epochs and not self.cache_possible:
            log(f"feature cache: not available for {meta['model_name']} (its classifier is not the last layer); "
                "training through the frozen backbone")
        # the head on cached features walks all images in every process, one global batch per step
        self.global_batch = loaders.train.batch_size * compute.dist.world_size
        cached_steps = math.ceil(len(splits.train) / self.global_batch)
        frozen_steps = max(1, cached_steps if self.cache_possible else len(loaders.train))
        steps = max(1, len(loaders.train))
        groups = model_loader.param_groups(model, head, config.lr, config.backbone_lr_scale, config.weight_decay,
                                           config.layer_decay)
        if self.frozen_epochs >= config.n_epochs:  # --freeze: the optimizer gets the head's parameters only
            groups = groups[:1]
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        phases = [(0, self.frozen_epochs * frozen_steps)]
        if self.frozen_epochs < config.n_epochs:
            start = self.frozen_epochs * frozen_steps
            phases = ([phases[0]] if self.frozen_epochs else []) + [
                (start, (config.n_epochs - self.frozen_epochs) * steps)]
        schedule = partial(lr_factor, phases=phases, warmup_fraction=config.warmup, schedule=config.lr_schedule)
        # a head already fitted (the probe, or head-only epochs) fine-tunes at the backbone's top rate
        settled = self.frozen_epochs * frozen_steps if (self.probe or self.frozen_epochs) else math.inf
        head_schedule = partial(settled_head_factor, schedule=schedule, settled_from=settled,
                                scale=config.backbone_lr_scale)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, [head_schedule] + [schedule] * (len(groups) - 1))
        self.scaler = torch.amp.GradScaler(compute.device.type,
                                           enabled=(compute.train_amp_dtype or compute.amp_dtype) == torch.float16)
        self.criterion = self.task.criterion(config.class_weights, config.label_smoothing).to(compute.device)
        self.train_labels = self.task.tensor(y for _, y in splits.train)
        self.valid_labels = self.task.tensor(y for _, y in splits.valid)
        self.cache = None
        self.skips = SkipLog(splits.train, splits.class_names, log, self.task)
        self.state = TrainState()
        self.best_state = None  # weights of the best epoch, kept on every rank for the final test
        self._ddp = None
        self._ddp_frozen = None

    # -- checkpoints

    def best_checkpoint(self, metrics, weights=None):
        return model_loader.make_checkpoint(
            self.model, self.meta["model_name"], self.splits.class_names, self.meta["input_size"],
            self.meta["resize_size"], self.meta["mean"], self.meta["std"], self.state.epoch, metrics, self.config.flags,
            weights, self.task.checkpoint_entries())

    def last_checkpoint(self, weights=None):
        ckpt = self.best_checkpoint(self.state.best_metrics, weights)
        ckpt.update({
            "resumable": LAST_FORMAT,
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),  # a snapshot: Adam's moments change in place
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "train_state": model_loader.plain(asdict(self.state)),
            "rng": {"torch": torch.get_rng_state(), "seed": int(self.config.seed)},
            "feature_cache": self.cache_identity(),
            "run_dir": str(self.run_dir),
        })
        return ckpt

    def cache_identity(self):
        return {"model_name": self.meta["model_name"], "input_size": self.meta["input_size"],
                "n_train": len(self.splits.train), "n_valid": len(self.splits.valid),
                "views": int(self.config.cache_views), "seed": int(self.config.seed)}

    def restore(self, ckpt):
        """Continue from a resumable checkpoint (see last_checkpoint)."""
        self.model.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(**ckpt["train_state"])
        self.skips.restore(self.state.skipped)
        torch.set_rng_state(ckpt["rng"]["torch"])
        if self.cache_possible and ckpt.get("feature_cache") != self.cache_identity():
            self.log("feature cache: data or settings differ from the interrupted run's")

    def save_checkpoints(self, improved, force=False):
        """At an epoch's end: the best checkpoint when it improved, and the resumable last one (RunFiles.keep)."""
        if not self.dist.is_main:
            return
        weights = self.best_state if improved else None  # this epoch's weights, already copied by fit()
        self.state.skipped = dict(self.skips.seen)
        best = self.best_checkpoint(self.state.best_metrics, weights) if improved else None
        self.files.keep(best, self.last_checkpoint(weights), force)

    # -- phases

    def mode(self):
        """How this run trains, in words."""
        config = self.config
        if self.frozen_epochs >= config.n_epochs:
            return "frozen backbone, head only"
        first = ("linear probe on cached features, then " if self.probe else
                 f"head only for {self.frozen_epochs} epochs, then " if self.frozen_epochs else "")
        how = [f"BatchNorm {config.batchnorm}"] if model_loader.batchnorm_layers(self.model) else []
        how += [f"layer decay {config.layer_decay:g}"] if config.layer_decay != 1.0 else []
        return f"{first}fine-tune all" + (f" ({', '.join(how)})" if how else "")

    def backbone_frozen(self, epoch):
        return epoch < self.frozen_epochs

    def forward_model(self, frozen):
        """The model to call in training: DDP-wrapped under torchrun (re-wrapped when the set of trainable
        parameters changes at unfreezing), else the model itself."""
        if not self.dist.enabled:
            return self.model
        if self._ddp is None or self._ddp_frozen != frozen:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.compute.device.index] if self.compute.device.type == "cuda" else None
            self._ddp, self._ddp_frozen = DDP(self.model, device_ids=ids), frozen
        return self._ddp

    def use_cache(self, epoch):
        return self.cache_possible and self.backbone_frozen(epoch)

    def ensure_cache(self):
        """The feature cache of the frozen epochs, built once; False when stopped meanwhile."""
        if self.cache is None:
            self.cache = build_feature_cache(self.model, self.head, self.loaders, self.config.cache_views,
                                             self.config.cache_memory_mb,
                                             self.run_dir / f"feature_cache.rank{self.dist.rank}.bin",
                                             self.compute, self.skips)
        return self.cache is not None

    def run_epoch(self, epoch):
        """Train one epoch and validate; returns (train_metrics, valid_metrics) or None when stopped."""
        config, compute = self.config, self.compute
        seed_everything(config.seed + epoch)  # dropout etc.; augmentation is seeded per image by the sampler
        sampler = self.loaders.train.sampler
        sampler.set_epoch(epoch)
        frozen = self.backbone_frozen(epoch)
        model_loader.set_backbone_trainable(self.model, self.head, not frozen)
        if self.use_cache(epoch):
            new = self.cache is None
            if not self.ensure_cache():
                return None
            if new:
                self.log(f"feature cache: {self.cache.train.shape[0]} view(s) x {len(self.train_labels)} train + "
                         f"{len(self.valid_labels)} valid images, dim {self.cache.train.shape[2]}, in "
                         f"{self.cache.seconds:.1f}s ({self.cache.location})")
            head_module = self.model.get_submodule(self.head)
            whole = TrainSampler(sampler.n, sampler.seed, 0, 1, sampler.weights)  # every rank: all features
            whole.set_epoch(epoch)
            train = train_head_epoch(head_module, self.cache, self.train_labels, whole, self.global_batch,
                                     self.optimizer, self.scheduler, self.scaler, self.criterion, compute, epoch,
                                     self.task)
            if train is None:
                return None
            valid = evaluate_head(head_module, self.cache.valid, self.cache.valid_ok, self.valid_labels,
                                  self.loaders.valid.batch_size, compute, self.task)
            return train, valid
        if not frozen:
            self.cache = None  # fine-tuning changes the backbone: cached features are stale
        model_loader.set_train_mode(self.model, self.head, frozen, config.batchnorm)
        train = train_one_epoch(self.forward_model(frozen), self.loaders.train, self.optimizer, self.scheduler,
                                self.scaler, self.criterion, compute, self.skips,
                                desc=f"epoch {epoch + 1}/{config.n_epochs}", whole=not frozen)
        if train is None:
            return None
        return train, evaluate(self.model, self.loaders.valid, compute, self.skips)

    # -- the linear probe (LP-FT's first stage)

    def fit_probe(self):
        """BatchNorm statistics re-estimated when the policy says so, the feature cache built, and the head fitted
        on it (probe.py); the probe becomes the best so far and both checkpoints are written, so a fine-tune
        stopped later resumes after it. False when a stop signal arrived."""
        state, compute = self.state, self.compute
        start = time.perf_counter()
        if self.config.batchnorm == "reestimate" and not self.reestimate_batchnorm():
            return False
        if not self.ensure_cache():
            return False
        head_module = self.model.get_submodule(self.head)
        ok, views = self.cache.train_ok, self.cache.train.shape[0]
        train_x = self.cache.train[:, ok].reshape(-1, self.cache.train.shape[2]).to(compute.device)
        train_y = self.train_labels[ok].repeat(views, *[1] * (self.train_labels.dim() - 1)).to(compute.device)
        valid_x = self.cache.valid[0, self.cache.valid_ok].to(compute.device)
        valid_y = self.valid_labels[self.cache.valid_ok].to(compute.device)
        fitted = probe.fit_probe(head_module, train_x, train_y, valid_x, valid_y, self.criterion, self.task,
                                 stop=compute.stop_requested)
        if fitted is None:
            return False
        valid = fitted.valid
        state.probe = {"l2": fitted.l2, "valid_loss": valid["loss"], "valid_accuracy": valid["accuracy"],
                       "seconds": round(time.perf_counter() - start, 3)}
        state.best_epoch, state.bad_epochs = 0, 0
        state.best_metrics = {"valid_loss": valid["loss"], "valid_accuracy": valid["accuracy"],
                              "train_loss": fitted.train_loss, "best_epoch": 0, **added_metrics(valid)}
        self.best_state = model_loader.weights_copy(self.model)
        self.log(f"linear probe: L2 {fitted.l2:g} chosen on validation (loss {valid['loss']:.4f}, accuracy "
                 f"{valid['accuracy']:.4f}), fitted in {fitted.seconds:.1f}s on the features of "
                 f"{int(ok.sum())} training images ({self.cache.seconds:.1f}s); now fine-tuning every layer")
        self.save_checkpoints(improved=True, force=True)
        return True

    def reestimate_batchnorm(self):
        """BatchNorm statistics measured on the training images (eval view) before the probe; under torchrun each
        rank measures its share and the averages are averaged."""
        compute = self.compute
        batches = (compute.to_device(b.images) for b in self.loaders.train_eval if b.labels.numel())
        with torch.inference_mode(False):
            done = model_loader.reestimate_batchnorm(self.model, batches, compute.stop_requested)
        if done and self.dist.enabled:
            for m in model_loader.batchnorm_layers(self.model):
                for t in (m.running_mean, m.running_var):
                    torch.distributed.all_reduce(t)
                    t /= self.dist.world_size
        if done:
            self.log("BatchNorm: statistics re-estimated on the training images")
        return done

    def transfer_note(self):
        """One line: did fine-tuning beat the head fitted on the frozen backbone (the probe, or the best head-only
        epoch), by validation loss? Empty when the run had no such stage or did not fine-tune yet."""
        state = self.state
        if self.probe and state.probe:
            before, what = state.probe["valid_loss"], "the linear probe"
        elif 0 < self.frozen_epochs < state.epoch:
            rows = state.history[:self.frozen_epochs]
            best = min(rows, key=lambda r: r["valid_loss"])
            before, what = best["valid_loss"], f"head-only epoch {best['epoch']}"
        else:
            return ""
        tuned = [r["valid_loss"] for r in state.history if r["epoch"] > self.frozen_epochs]
        if not tuned:
            return ""
        if state.best_epoch > self.frozen_epochs:
            return f"fine-tuning improved validation loss {before:.4f} -> {state.best_loss:.4f} (epoch {state.best_epoch})"
        return (f"kept {what}: fine-tuning did not beat its validation loss {before:.4f} (best fine-tuned epoch: "
                f"{min(tuned):.4f})")

    def fit(self):
        config, state = self.config, self.state
        interrupted = stopped_early = False
        if self.probe and not state.probe and state.epoch == 0 and not self.fit_probe():
            self.files.write_pending()
            return self.finish(True, False)
        for epoch in bar(range(state.epoch, config.n_epochs), self.compute, "epochs"):
            start = time.perf_counter()
            result = self.run_epoch(epoch)
            if result is None:  # stopped mid-epoch: the end of the last finished epoch is what counts
                self.files.write_pending()
                interrupted = True
                break
            train, valid = result
            state.epoch = epoch + 1
            row = epoch_row(state.epoch, train, valid, self.optimizer.param_groups[0]["lr"], time.perf_counter() - start)
            state.history.append(row)
            improved = valid["loss"] < state.best_loss
            if improved:
                state.best_epoch, state.bad_epochs = state.epoch, 0
                state.best_metrics = {"valid_loss": valid["loss"], "valid_accuracy": valid["accuracy"],
                                      "train_loss": train["loss"], "train_accuracy": train["accuracy"],
                                      "best_epoch": state.epoch, **added_metrics(valid)}
                self.best_state = model_loader.weights_copy(self.model)
            else:
                state.bad_epochs += 1
            if self.dist.is_main:
                log_epoch(self.files.open_writer(state.epoch), row)
                write_metrics_csv(state.history, self.run_dir / "metrics.csv")
                self.log(f"epoch {state.epoch}/{config.n_epochs}  train loss {train['loss']:.4f} acc {train['accuracy']:.4f}"
                         f"  valid loss {valid['loss']:.4f} acc {valid['accuracy']:.4f}  lr {row['lr']:.2e}"
                         f"  {row['seconds']:.1f}s, {pace(train, valid, row['seconds'], config.n_epochs - state.epoch)}"
                         f"{'  *best' if improved else ''}")
            stopped_early = bool(config.patience and state.bad_epochs >= config.patience)
            interrupted = not stopped_early and self.compute.stop_requested()
            self.save_checkpoints(improved, force=stopped_early or interrupted or state.epoch == config.n_epochs)
            if stopped_early:
                self.log(f"early stop: no better validation loss for {config.patience} epochs (best epoch {state.best_epoch})")
                break
            if interrupted:
                break
        return self.finish(interrupted, stopped_early)

    def finish(self, interrupted, stopped_early):
        """The fit's result; what the best model gets after training is train.py's (finish_run)."""
        note = f"feature cache {self.cache.seconds:.1f}s" if self.cache is not None else ""
        return FitResult(self.state, interrupted, stopped_early, {}, self.skips.per_class(), note,
                         self.transfer_note())

    # -- the best model, after the epochs

    def load_best(self):
        """The best epoch's weights into the model (rank 0's file, to every rank, when resumed after it)."""
        if self.best_state is None:
            self.best_state = self.files.best_weights(self.dist)
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)

    def validation_logits(self):
        """(logits, labels, dataset indices) of the model on the validation images: on the cached features when
        the cache still holds them, else one pass over the images."""
        if self.cache is not None:
            return evaluation.head_logits(self.model.get_submodule(self.head), self.cache.valid[0],
                                          self.cache.valid_ok, self.valid_labels, self.loaders.valid.batch_size,
                                          self.compute, with_index=True)
        return evaluation.collect_logits(self.model, self.loaders.valid, self.compute, "calibrate", with_index=True)


# ----------------------------------------------------------------------------- a finished run's summary


def log_summary(fitter, calibration, test_metrics):
    """TensorBoard: the best model's validation predictions' grid, and the run's flags with its best and test
    figures."""
    writer = fitter.files.open_writer(fitter.state.epoch)
    if writer is None:  # not rank 0
        return
    figure = prediction_grid(fitter.model, fitter.splits.valid, fitter.splits.class_names, fitter.meta,
                             fitter.compute, fitter.task, calibration=calibration)
    if figure is not None:
        writer.add_figure("Validation/Predictions", figure, fitter.state.epoch)
    metrics = {f"hparam/{k}": float(v) for k, v in fitter.state.best_metrics.items()}
    metrics.update({f"hparam/test_{k}": float(test_metrics[k]) for k in ("accuracy", "map") if k in test_metrics})
    fitted = calibration or fitter.task.uncalibrated(len(fitter.splits.class_names))
    metrics.update({f"hparam/{k}": float(v) for k, v in fitted.hparams().items()})
    metrics.update({f"hparam/{k}": float(v) for k, v in (calibration.metrics if calibration else {}).items()})
    log_hparams(writer, {k: v for k, v in fitter.config.flags.items() if v is not None}, metrics, fitter.state.epoch)


# ----------------------------------------------------------------------------- the first epoch's steps, one at a time
# (what the learning-rate range test, lr_finder.py, runs instead of an epoch)


def first_steps(fitter, batch_size):
    """(module, endless (inputs, labels) batches) as the Fitter's first epoch trains: the head on cached features
    when it uses the cache (built here), else the model on augmented images, with the first epoch's parameters
    trainable; None when a stop signal arrived while the cache was built."""
    frozen = fitter.backbone_frozen(0)
    model_loader.set_backbone_trainable(fitter.model, fitter.head, not frozen)
    if fitter.use_cache(0):
        if not fitter.ensure_cache():
            return None
        return fitter.model.get_submodule(fitter.head).train(), cached_batches(
            fitter.cache, fitter.train_labels, fitter.config.seed, batch_size, fitter.loaders.train.sampler.weights)
    model_loader.set_train_mode(fitter.model, fitter.head, frozen, fitter.config.batchnorm)
    return fitter.model, image_batches(fitter.loaders.train)


def step(fitter, module, inputs, labels, schedule):
    """One training step of `module` with the Fitter's optimizer, loss and scaler under `schedule`; its loss."""
    meter = Meter(fitter.task)
    inputs, labels = fitter.compute.to_device(inputs, labels, train=True)
    train_step(module, inputs, labels, fitter.optimizer, schedule, fitter.scaler, fitter.criterion, fitter.compute,
               meter, whole=module is fitter.model and not fitter.backbone_frozen(0))
    return meter.loss / meter.count


def batches_per_pass(fitter):
    """Training batches in one pass over the readable images (the feature cache knows which are readable)."""
    n = int(fitter.cache.train_ok.sum()) if fitter.cache is not None else len(fitter.splits.train)
    return math.ceil(n / fitter.loaders.train.batch_size)


def first_phase(fitter):
    """What the first epoch trains, in words."""
    if fitter.cache is not None:
        return "head on cached features"
    return "head only, frozen backbone" if fitter.backbone_frozen(0) else "whole model"
