"""The training loop: one epoch, evaluation, head epochs on the feature cache (features.py), and the fit loop
with early stopping, best/last checkpoints and exact resume. Which stages a run has, their schedules and the
head stage's choice are stages.py's; what the run writes as it goes is run_log.py's."""

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import evaluation
import model_loader
from data_loader import SkipLog, TrainSampler
from features import build_feature_cache
from run_log import RunFiles, added_metrics, epoch_line, epoch_row, log_epoch, write_metrics_csv
from stages import HEAD, WHOLE, EpochClock, HeadStage, StagePlan, elapsed, pace
from utils import all_reduce_sum, bar, cpu_has_fast_bf16, seed_everything

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


def train_one_epoch(model, loader, optimizer, scheduler, scaler, criterion, compute, skips, desc="train", whole=False):
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


def train_head_epoch(
    head_module, cache, labels, sampler, batch_size, optimizer, scheduler, scaler, criterion, compute, epoch, task
):
    """One epoch of the classifier on cached features; same sampler order and batch size as the image loop.
    Each image uses one of its cached views, drawn per epoch."""
    head_module.train()
    meter = Meter(task)
    order = torch.tensor([i for i, _ in sampler], dtype=torch.long)
    views = cache.train.shape[0]
    g = torch.Generator().manual_seed(sampler.seed * 7919 + epoch)
    view_of = torch.randint(views, (len(order),), generator=g)
    for start in range(0, len(order), batch_size):
        idx, view = order[start : start + batch_size], view_of[start : start + batch_size]
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
    transfer_note: str = ""  # fine-tuning against the head it started from, the head kept, or why it was skipped
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
    probe: bool = (
        False  # the linear probe (probe.py) on the cached features: against --freeze's epochs, or LP-FT's start
    )
    batchnorm: str = "train"  # fine-tuning's BatchNorm policy (model_loader.BATCHNORM_POLICIES)
    layer_decay: float = 1.0  # each backbone block's rate = the block above's * this (1.0 = one backbone rate)
    flags: dict = field(default_factory=dict)  # the run's flags, as the checkpoint and TensorBoard record them


def cache_identity(meta, splits, config):
    """What the feature cache depends on, kept in the resumable checkpoint (a resume with other data says so)."""
    return {
        "model_name": meta["model_name"],
        "input_size": meta["input_size"],
        "n_train": len(splits.train),
        "n_valid": len(splits.valid),
        "views": int(config.cache_views),
        "seed": int(config.seed),
    }


class Fitter:
    """Runs the epochs as its StagePlan (stages.py) says: the head alone (on the feature cache when it can), the
    head stage (the probe against the SGD head), every layer. Owns the optimizer, schedule and DDP wrapper; what
    the run writes goes through its RunFiles (files)."""

    def __init__(self, model, head, splits, loaders, compute, config, meta, model_fn, last_fn, run_dir, log, task=None):
        self.model, self.head, self.splits, self.loaders = model, head, splits, loaders
        self.compute, self.config, self.meta, self.log = compute, config, meta, log
        self.task = task or loaders.train.dataset.task
        self.run_dir, self.dist = Path(run_dir), compute.dist
        self.files = RunFiles(model_fn, last_fn, run_dir, config.save_interval, compute.dist.is_main)
        # the head on cached features walks all images in every process, one global batch per step
        self.global_batch = loaders.train.batch_size * compute.dist.world_size
        self.plan = StagePlan.make(
            config, model, head, meta, compute.device, len(splits.train), len(loaders.train), self.global_batch, log
        )
        self.optimizer, self.scheduler = self.plan.optimizer(model, head)
        self.scaler = compute.grad_scaler()
        self.criterion = self.task.criterion(config.class_weights, config.label_smoothing).to(compute.device)
        self.train_labels = self.task.tensor(y for _, y in splits.train)
        self.valid_labels = self.task.tensor(y for _, y in splits.valid)
        self.cache, self.cache_built = None, 0.0  # cache_built: seconds spent building it in the current epoch
        self.skips = SkipLog(splits.train, splits.class_names, log, self.task)
        self.state = TrainState()
        self.best_state = None  # weights of the best epoch, kept on every rank for the final test
        self.clock = EpochClock()
        self.note = ""  # the head stage's choice (--freeze) or why fine-tuning was skipped, for the summary
        self._ddp = self._ddp_frozen = None

    # -- checkpoints

    def restore(self, ckpt):
        """Continue from a resumable checkpoint (see last_checkpoint)."""
        self.model.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(**ckpt["train_state"])
        self.skips.restore(self.state.skipped)
        torch.set_rng_state(ckpt["rng"]["torch"])
        if self.plan.cache and ckpt.get("feature_cache") != cache_identity(self.meta, self.splits, self.config):
            self.log("feature cache: data or settings differ from the interrupted run's")

    def save_checkpoints(self, improved, force=False):
        """At an epoch's end: the best checkpoint when it improved, and the resumable last one (RunFiles.keep)."""
        if not self.dist.is_main:
            return
        weights = self.best_state if improved else None  # this epoch's weights, already copied by fit()
        self.state.skipped = dict(self.skips.seen)
        best = best_checkpoint(self, self.state.best_metrics, weights) if improved else None
        self.files.keep(best, last_checkpoint(self, weights), force)

    # -- epochs

    def forward_model(self, frozen):
        """The model to call in training: DDP-wrapped under torchrun, re-wrapped when the trainable set changes."""
        if not self.dist.enabled:
            return self.model
        if self._ddp is None or self._ddp_frozen != frozen:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.compute.device.index] if self.compute.device.type == "cuda" else None
            self._ddp, self._ddp_frozen = DDP(self.model, device_ids=ids), frozen
        return self._ddp

    def ensure_cache(self):
        """The feature cache of the frozen epochs, built once (its time in cache_built); False when stopped."""
        if self.cache is None:
            self.cache = build_feature_cache(
                self.model,
                self.head,
                self.loaders,
                self.config.cache_views,
                self.config.cache_memory_mb,
                self.run_dir / f"feature_cache.rank{self.dist.rank}.bin",
                self.compute,
                self.skips,
                self.log,
            )
            if self.cache is None:
                return False
            self.cache_built = self.cache.seconds
        return True

    def run_epoch(self, epoch):
        """Train one epoch and validate; returns (train_metrics, valid_metrics) or None when stopped."""
        kind = self.plan.kind(epoch)
        seed_everything(self.config.seed + epoch)  # dropout etc.; augmentation is seeded per image by the sampler
        self.loaders.train.sampler.set_epoch(epoch)
        model_loader.set_backbone_trainable(self.model, self.head, kind == WHOLE)
        if kind == HEAD:
            return (
                cached_head_epoch(self, epoch, self.optimizer, self.scheduler, self.scaler)
                if self.ensure_cache()
                else None
            )
        if kind == WHOLE:
            self.cache = None  # fine-tuning changes the backbone: cached features are stale
        model_loader.set_train_mode(self.model, self.head, kind != WHOLE, self.config.batchnorm)
        train = train_one_epoch(
            self.forward_model(kind != WHOLE),
            self.loaders.train,
            self.optimizer,
            self.scheduler,
            self.scaler,
            self.criterion,
            self.compute,
            self.skips,
            desc=f"epoch {epoch + 1}/{self.config.n_epochs}",
            whole=kind == WHOLE,
        )
        return None if train is None else (train, evaluate(self.model, self.loaders.valid, self.compute, self.skips))

    def end_epoch(self, epoch, train, valid, seconds):
        """The epoch's row in the history, the best so far, its line, metrics.csv and TensorBoard. True when the
        validation loss improved."""
        state, kind = self.state, self.plan.kind(epoch)
        state.epoch = epoch + 1
        row = epoch_row(state.epoch, train, valid, self.optimizer.param_groups[0]["lr"], seconds)
        state.history.append(row)
        self.clock.add(kind, seconds)
        improved = valid["loss"] < state.best_loss
        if improved:
            state.best_epoch, state.bad_epochs = state.epoch, 0
            state.best_metrics = {
                "valid_loss": valid["loss"],
                "valid_accuracy": valid["accuracy"],
                "train_loss": train["loss"],
                "train_accuracy": train["accuracy"],
                "best_epoch": state.epoch,
                **added_metrics(valid),
            }
            self.best_state = model_loader.weights_copy(self.model)
        else:
            state.bad_epochs += 1
        if self.dist.is_main:
            log_epoch(self.files.open_writer(state.epoch), row)
            write_metrics_csv(state.history, self.run_dir / "metrics.csv")
            left = self.clock.left([self.plan.kind(e) for e in range(state.epoch, self.config.n_epochs)])
            self.log(epoch_line(row, self.config.n_epochs, f"{pace(kind, train, valid, seconds)}, {left}", improved))
        return improved

    # -- the fit

    def fit(self):
        """The stages in order; a stop signal ends the run at the last finished epoch (or stage)."""
        state, plan = self.state, self.plan
        if plan.probe and not state.probe and state.epoch == 0 and not HeadStage(self, cached_head_epoch).run():
            self.files.write_pending()
            return self.finish(True, False)
        skipped = plan.nothing_to_gain(state.best_metrics) if plan.probe and state.epoch == 0 else ""
        if skipped:  # said in the run's summary
            self.note = skipped
            return self.finish(False, False)
        interrupted, stopped_early = self.epochs()
        if (
            not interrupted
            and plan.frozen_run
            and plan.compares_heads
            and not state.probe
            and state.best_metrics
            and bool(self.cache.valid_ok.any())
        ):  # no readable validation image: nothing to compare on
            interrupted = not HeadStage(self, cached_head_epoch).run()
        return self.finish(interrupted, stopped_early)

    def epochs(self):
        """The epochs from where the state is; (interrupted, stopped early)."""
        config, state = self.config, self.state
        for epoch in bar(range(state.epoch, config.n_epochs), self.compute, "epochs"):
            start, self.cache_built = time.perf_counter(), 0.0
            result = self.run_epoch(epoch)
            if result is None:  # stopped mid-epoch: the end of the last finished epoch is what counts
                self.files.write_pending()
                return True, False
            improved = self.end_epoch(epoch, *result, elapsed(start) - self.cache_built)  # the cache: its own line
            stopped_early = bool(config.patience and state.bad_epochs >= config.patience)
            interrupted = not stopped_early and self.compute.stop_requested()
            self.save_checkpoints(improved, force=stopped_early or interrupted or state.epoch == config.n_epochs)
            if stopped_early:
                self.log(
                    f"early stop: no better validation loss for {config.patience} epochs (best epoch "
                    f"{state.best_epoch})"
                )
            if stopped_early or interrupted:
                return interrupted, stopped_early
        return False, False

    def finish(self, interrupted, stopped_early):
        """The fit's result; what the best model gets after training is train.py's (finish_run)."""
        note = f"feature cache {self.cache.seconds:.1f}s" if self.cache is not None else ""
        return FitResult(
            self.state,
            interrupted,
            stopped_early,
            {},
            self.skips.per_class(),
            note,
            self.note or self.plan.transfer_note(self.state),
        )

    # -- the best model, after the epochs

    def load_best(self):
        """The best epoch's weights into the model (rank 0's file, to every rank, when resumed after it)."""
        if self.best_state is None:
            self.best_state = self.files.best_weights(self.dist)
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)


def cached_head_epoch(fitter, epoch, optimizer, scheduler, scaler):
    """One epoch of the fitter's head on its cached features (every rank: all of them) with this optimizer,
    schedule and scaler, and its validation; (train metrics, valid metrics), or None when stopped."""
    head_module, sampler = fitter.model.get_submodule(fitter.head), fitter.loaders.train.sampler
    whole = TrainSampler(sampler.n, sampler.seed, 0, 1, sampler.weights)
    whole.set_epoch(epoch)
    train = train_head_epoch(
        head_module,
        fitter.cache,
        fitter.train_labels,
        whole,
        fitter.global_batch,
        optimizer,
        scheduler,
        scaler,
        fitter.criterion,
        fitter.compute,
        epoch,
        fitter.task,
    )
    if train is None:
        return None
    return train, evaluate_head(
        head_module,
        fitter.cache.valid,
        fitter.cache.valid_ok,
        fitter.valid_labels,
        fitter.loaders.valid.batch_size,
        fitter.compute,
        fitter.task,
    )


def validation_logits(fitter):
    """(logits, labels, dataset indices) of the fitter's model on the validation images: on the cached features
    when the cache still holds them, else one pass over the images."""
    if fitter.cache is not None:
        return evaluation.head_logits(
            fitter.model.get_submodule(fitter.head),
            fitter.cache.valid[0],
            fitter.cache.valid_ok,
            fitter.valid_labels,
            fitter.loaders.valid.batch_size,
            fitter.compute,
            with_index=True,
        )
    return evaluation.collect_logits(fitter.model, fitter.loaders.valid, fitter.compute, "calibrate", with_index=True)


def best_checkpoint(fitter, metrics, weights=None):
    """The best checkpoint's dict (model_loader.make_checkpoint) of the fitter's run; `weights` or the model's."""
    meta = fitter.meta
    return model_loader.make_checkpoint(
        fitter.model,
        meta["model_name"],
        fitter.splits.class_names,
        meta["input_size"],
        meta["resize_size"],
        meta["mean"],
        meta["std"],
        fitter.state.epoch,
        metrics,
        fitter.config.flags,
        weights,
        fitter.task.checkpoint_entries(),
    )


def last_checkpoint(fitter, weights=None):
    """The resumable _last.pth: the best checkpoint's keys, the optimizer, schedule, scaler, state and RNG."""
    ckpt = best_checkpoint(fitter, fitter.state.best_metrics, weights)
    ckpt.update(
        {
            "resumable": LAST_FORMAT,
            "optimizer": copy.deepcopy(fitter.optimizer.state_dict()),  # a snapshot: Adam's moments change in place
            "scheduler": fitter.scheduler.state_dict(),
            "scaler": fitter.scaler.state_dict(),
            "train_state": model_loader.plain(asdict(fitter.state)),
            "rng": {"torch": torch.get_rng_state(), "seed": int(fitter.config.seed)},
            "feature_cache": cache_identity(fitter.meta, fitter.splits, fitter.config),
            "run_dir": str(fitter.run_dir),
        }
    )
    return ckpt
