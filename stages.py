"""How a run trains, stage by stage, decided once from its settings and its model (the Fitter asks; it derives
none of this itself):

- head epochs: the new head alone on the frozen backbone, on the feature cache when the classifier is the
  model's last layer (features.head_takes_features), else through the backbone (all epochs with --freeze, the
  first --unfreeze_after ones otherwise);
- the head stage of a pretrained fine-tune (LP-FT's first stage, Kumar et al. 2022) and the end of a --freeze
  run: the L-BFGS linear probe (probe.py) and the SGD head epochs, fitted on the same cached features, and the
  better of the two by validation loss kept, so that neither mode ever starts from, or ends with, the worse
  head (on hidden sets neither always won: docs/finetune.md);
- fine-tuning every layer, skipped with a reason when the head already gets every validation image right;
- the learning-rate schedule of each stage (linear warm-up and cosine decay, restarted per stage; a fitted
  head fine-tunes at the backbone's rate), the BatchNorm policy and the precision of fine-tuning steps;
- the time left, from epochs of the same kind (an epoch on cached features takes milliseconds, a fine-tuning
  epoch minutes).
"""

import copy
import math
import time
from dataclasses import dataclass, field
from functools import partial

import torch

import model_loader
import probe
from features import head_takes_features
from run_log import added_metrics
from utils import seed_everything

HEAD, FROZEN, WHOLE = "head", "frozen", "whole"  # an epoch of: the head on cached features; the head through the
# frozen backbone; every layer


# ----------------------------------------------------------------------------- the learning-rate schedule


def lr_factor(step, phases, warmup_fraction, schedule):
    """Linear warm-up then cosine decay (to 1%), restarted at each phase (head-only, then fine-tune)."""
    for start, length in reversed(phases):  # noqa: B007 - the phase found is the loop's result
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


# ----------------------------------------------------------------------------- the plan


@dataclass
class StagePlan:
    """The stages of one run (see the module's docstring), from FitConfig and what the model allows."""

    config: object  # trainer.FitConfig
    frozen_epochs: int  # the first epochs train the head alone (all of them with --freeze)
    probe: bool  # LP-FT: the head stage (probe and SGD head) before the first fine-tuning epoch
    cache: bool  # head epochs and the head stage run on cached backbone features
    cached_steps: int  # optimizer steps of an epoch on cached features (one global batch a step)
    image_steps: int  # optimizer steps of an epoch over the images (this process's batches)

    @classmethod
    def make(cls, config, model, head, meta, device, n_train, image_steps, global_batch, log):
        """The plan for this model; says in the log when the probe or the cache cannot apply (a classifier that
        is not the model's last layer, such as SqueezeNet's)."""
        frozen_epochs = min(config.frozen_epochs, config.n_epochs)
        features_ok = head_takes_features(model, head, meta["input_size"], device)
        lp_ft = config.probe and not frozen_epochs and features_ok
        if config.probe and not lp_ft and not frozen_epochs:
            log(
                f"linear probe: not available for {meta['model_name']} (its classifier is not the last layer); "
                "fine-tuning from the new head"
            )
        cache = features_ok and (config.feature_cache and frozen_epochs > 0 or lp_ft)
        if config.feature_cache and frozen_epochs and not cache:
            log(
                f"feature cache: not available for {meta['model_name']} (its classifier is not the last layer); "
                "training through the frozen backbone"
            )
        return cls(config, frozen_epochs, lp_ft, cache, math.ceil(n_train / global_batch), max(1, image_steps))

    @property
    def frozen_run(self):
        """--freeze: every epoch trains the head alone."""
        return self.frozen_epochs >= self.config.n_epochs

    @property
    def compares_heads(self):
        """Whether the run ends (--freeze) or starts (LP-FT) with the probe against the SGD head epochs."""
        return self.cache and self.config.probe and (self.probe or self.frozen_run)

    def backbone_frozen(self, epoch):
        return epoch < self.frozen_epochs

    def kind(self, epoch):
        if not self.backbone_frozen(epoch):
            return WHOLE
        return HEAD if self.cache else FROZEN

    def describe(self, model):
        """How this run trains, in words."""
        config = self.config
        if self.frozen_run:
            return "frozen backbone, head only" + (
                " (SGD epochs, then the linear probe; the better kept)" if self.compares_heads else ""
            )
        first = (
            "linear probe and SGD head on cached features (the better kept), then "
            if self.probe
            else f"head only for {self.frozen_epochs} epochs, then "
            if self.frozen_epochs
            else ""
        )
        how = [f"BatchNorm {config.batchnorm}"] if model_loader.batchnorm_layers(model) else []
        how += [f"layer decay {config.layer_decay:g}"] if config.layer_decay != 1.0 else []
        return f"{first}fine-tune all" + (f" ({', '.join(how)})" if how else "")

    def optimizer(self, model, head, head_only=None):
        """(AdamW, LambdaLR) for the run: the head's group (and the backbone's, unless the run or `head_only`
        trains the head alone); one warm-up and decay per stage; a head fitted before fine-tuning (the probe, or
        head epochs) fine-tunes at the backbone's top rate. head_only=True: the head stage's own SGD epochs, built
        exactly as a --freeze run's."""
        config = self.config
        head_only = self.frozen_run if head_only is None else head_only
        groups = model_loader.param_groups(
            model, head, config.lr, config.backbone_lr_scale, config.weight_decay, config.layer_decay
        )
        if head_only:
            groups = groups[:1]
        optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        head_steps = self.cached_steps if self.cache else self.image_steps
        frozen = config.n_epochs if head_only else self.frozen_epochs
        head_end = frozen * max(1, head_steps)  # the head stage's last step
        phases = [(0, head_end)] if frozen else []
        if frozen < config.n_epochs:
            phases.append((head_end, (config.n_epochs - frozen) * self.image_steps))
        schedule = partial(lr_factor, phases=phases, warmup_fraction=config.warmup, schedule=config.lr_schedule)
        settled = head_end if not head_only and (self.probe or frozen) else math.inf
        head_schedule = partial(
            settled_head_factor, schedule=schedule, settled_from=settled, scale=config.backbone_lr_scale
        )
        lambdas = [head_schedule] + [schedule] * (len(groups) - 1)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)

    def nothing_to_gain(self, start):
        """The reason to skip fine-tuning, or "": the head on the frozen backbone already gets every validation
        image right (the default fine-tune then cost 17x a --freeze run for a lower test accuracy, 0.9875 against
        1.000), so validation could show no gain."""
        if not self.probe or start.get("valid_count", 0) == 0 or start["valid_accuracy"] < 1.0:
            return ""
        return (
            f"fine-tuning skipped: the head on the frozen backbone already gets all {start['valid_count']} "
            f"validation images right (loss {start['valid_loss']:.4f}), so fine-tuning could show no gain there "
            "(--no_probe fine-tunes anyway)"
        )

    def transfer_note(self, state):
        """One line: did fine-tuning beat the head fitted on the frozen backbone (the head stage's, or the best
        head-only epoch), by validation loss? Empty when the run had no such stage or did not fine-tune."""
        if self.probe and state.probe:
            before, what = state.probe["valid_loss"], HEAD_NAMES[state.probe.get("kept", "probe")]
        elif 0 < self.frozen_epochs < state.epoch:
            rows = state.history[: self.frozen_epochs]
            best = min(rows, key=lambda r: r["valid_loss"])
            before, what = best["valid_loss"], f"head-only epoch {best['epoch']}"
        else:
            return ""
        tuned = [r["valid_loss"] for r in state.history if r["epoch"] > self.frozen_epochs]
        if not tuned:
            return ""
        if state.best_epoch > self.frozen_epochs:
            return (
                f"fine-tuning improved validation loss {before:.4f} -> {state.best_loss:.4f} (epoch {state.best_epoch})"
            )
        return (
            f"kept {what}: fine-tuning did not beat its validation loss {before:.4f} (best fine-tuned epoch: "
            f"{min(tuned):.4f})"
        )


HEAD_NAMES = {"probe": "the linear probe", "sgd": "the SGD head"}


# ----------------------------------------------------------------------------- the head stage


@dataclass
class HeadChoice:
    """The head stage's outcome: which head was kept and both candidates' figures (TrainState.probe holds it)."""

    kept: str  # "probe" or "sgd"
    metrics: dict  # the kept head's best_metrics (valid_loss, valid_accuracy, train_loss, valid_count, ...)
    probe: object  # probe.ProbeResult
    sgd: dict  # the SGD head's best epoch: {"epoch", "valid": metrics, "train_loss"}; empty when it had none
    seconds: dict = field(default_factory=dict)  # "probe", "sgd"

    def record(self):
        """What TrainState.probe keeps (plain types, so the resumable checkpoint loads with weights_only)."""
        sgd_loss = self.sgd["valid"]["loss"] if self.sgd else None
        return {
            "kept": self.kept,
            "l2": self.probe.l2,
            "valid_loss": self.metrics["valid_loss"],
            "valid_accuracy": self.metrics["valid_accuracy"],
            "probe_valid_loss": self.probe.valid["loss"],
            "sgd_valid_loss": sgd_loss,
            "sgd_epoch": self.sgd.get("epoch", 0),
            "seconds": round(sum(self.seconds.values()), 3),
        }

    def summary(self):
        """'kept the linear probe: validation loss 0.2100 against the SGD head's 0.2500 (epoch 14)'."""
        probe_loss, sgd = self.probe.valid["loss"], self.sgd
        if not sgd:
            return f"kept the linear probe (validation loss {probe_loss:.4f}): no SGD head epoch finished"
        sgd_text = f"{sgd['valid']['loss']:.4f} (epoch {sgd['epoch']})"
        if self.kept == "probe":
            return f"kept the linear probe: validation loss {probe_loss:.4f} against the SGD head's {sgd_text}"
        return f"kept the SGD head: validation loss {sgd_text} against the linear probe's {probe_loss:.4f}"

    def line(self, cache_seconds):
        """The log line: both heads' validation figures, which was kept, and where the time went."""
        p = self.probe
        probe_text = (
            f"linear probe (L2 {p.l2:g}) valid loss {p.valid['loss']:.4f} acc {p.valid.get('accuracy', math.nan):.4f}"
        )
        if self.sgd:
            s = self.sgd
            sgd_text = (
                f"SGD head (best of {s['epochs']} epochs: {s['epoch']}) valid loss {s['valid']['loss']:.4f} "
                f"acc {s['valid']['accuracy']:.4f}"
            )
        else:
            sgd_text = "SGD head: no epoch finished"
        return (
            f"head on cached features: {probe_text}; {sgd_text}; kept {HEAD_NAMES[self.kept]} (times: feature "
            f"cache {cache_seconds:.1f}s, probe {self.seconds.get('probe', 0):.1f}s, SGD head "
            f"{self.seconds.get('sgd', 0):.1f}s)"
        )


def probe_on_cache(head_module, cache, train_labels, valid_labels, criterion, task, compute):
    """The L-BFGS probe fitted on the cached features (probe.fit_probe; the head changed in place), or None when
    stopped."""
    ok, views = cache.train_ok, cache.train.shape[0]
    train_x = cache.train[:, ok].reshape(-1, cache.train.shape[2]).to(compute.device)
    train_y = train_labels[ok].repeat(views, *[1] * (train_labels.dim() - 1)).to(compute.device)
    valid_x = cache.valid[0, cache.valid_ok].to(compute.device)
    valid_y = valid_labels[cache.valid_ok].to(compute.device)
    return probe.fit_probe(
        head_module, train_x, train_y, valid_x, valid_y, criterion, task, stop=compute.stop_requested
    )


def choose_head(probe_result, sgd, added):
    """HeadChoice of the probe against the SGD head's best epoch (sgd: {} when none finished): the lower
    validation loss wins; a tie keeps the probe. `added`: the task's extra validation metrics of a metrics dict."""
    if sgd and sgd["valid"]["loss"] < probe_result.valid["loss"]:
        kept, valid, train_loss = "sgd", sgd["valid"], sgd["train_loss"]
    else:
        kept, valid, train_loss = "probe", probe_result.valid, probe_result.train_loss
    metrics = {
        "valid_loss": valid["loss"],
        "valid_accuracy": valid.get("accuracy", math.nan),
        "train_loss": train_loss,
        "valid_count": valid.get("count", 0),
        "best_epoch": 0,
        **added(valid),
    }
    return HeadChoice(kept, metrics, probe_result, sgd)


def head_weights(head_module):
    return copy.deepcopy(head_module.state_dict())


class HeadStage:
    """The head stage of a Fitter (trainer.py): the probe and the SGD head on the cached features, the better kept
    (choose_head); before fine-tuning (LP-FT, from the new head; both checkpoints then written, so a stop later
    resumes after it), or after a --freeze run's epochs (against their best)."""

    def __init__(self, fitter, head_epoch):
        self.fitter, self.epoch_fn = fitter, head_epoch  # epoch_fn: trainer.cached_head_epoch
        self.head_module = fitter.model.get_submodule(fitter.head)
        self.lp_ft = fitter.plan.probe

    def run(self):
        """True when done; False when a stop signal arrived (nothing of the stage kept)."""
        fitter, state = self.fitter, self.fitter.state
        if self.lp_ft and fitter.config.batchnorm == "reestimate" and not self.reestimate_batchnorm():
            return False
        if not fitter.ensure_cache():
            return False
        start = time.perf_counter()
        initial = head_weights(self.head_module)
        sgd = self.sgd_head(initial, self.epoch_fn) if self.lp_ft else self.best_epoch()
        if self.lp_ft:
            self.head_module.load_state_dict(initial)
        sgd_seconds, start = elapsed(start), time.perf_counter()
        fitted = probe_on_cache(
            self.head_module,
            fitter.cache,
            fitter.train_labels,
            fitter.valid_labels,
            fitter.criterion,
            fitter.task,
            fitter.compute,
        )
        if fitted is None:
            return False
        choice = choose_head(fitted, sgd, added_metrics)
        choice.seconds = {"sgd": sgd_seconds, "probe": elapsed(start)}
        if choice.kept == "sgd" and self.lp_ft:
            self.head_module.load_state_dict(sgd["weights"])
        replaced = self.lp_ft or choice.kept == "probe"  # else the best SGD epoch stays the best, as it was
        if replaced:
            state.best_epoch, state.bad_epochs = 0, 0
            state.best_metrics = choice.metrics
            fitter.best_state = model_loader.weights_copy(fitter.model)
        state.probe = choice.record()
        fitter.log(choice.line(fitter.cache.seconds))
        if not self.lp_ft:
            fitter.note = choice.summary()
        fitter.save_checkpoints(improved=replaced, force=True)
        return True

    def best_epoch(self):
        """A --freeze run's SGD candidate: its best epoch (the weights are the Fitter's best_state)."""
        state = self.fitter.state
        best = state.best_metrics
        return {
            "epoch": state.best_epoch,
            "epochs": state.epoch,
            "train_loss": best.get("train_loss"),
            "valid": {"loss": best["valid_loss"], "accuracy": best["valid_accuracy"], "count": 0},
        }

    def sgd_head(self, initial, head_epoch):
        """LP-FT's SGD candidate: the head trained from `initial` on the cached features exactly as --freeze trains
        it (its optimizer, schedule and patience), silently; {"epoch", "epochs", "valid", "train_loss", "weights"}
        of its best epoch ({} when stopped before one finished)."""
        fitter, best, bad = self.fitter, {}, 0
        self.head_module.load_state_dict(initial)
        optimizer, scheduler = fitter.plan.optimizer(fitter.model, fitter.head, head_only=True)
        scaler = fitter.compute.grad_scaler()
        for epoch in range(fitter.config.n_epochs):
            seed_everything(fitter.config.seed + epoch)  # as the Fitter seeds each epoch
            result = head_epoch(fitter, epoch, optimizer, scheduler, scaler)
            if result is None:
                return {}
            train, valid = result
            if not best or valid["loss"] < best["valid"]["loss"]:
                best, bad = (
                    {
                        "epoch": epoch + 1,
                        "valid": valid,
                        "train_loss": train["loss"],
                        "weights": head_weights(self.head_module),
                    },
                    0,
                )
            else:
                bad += 1
            best["epochs"] = epoch + 1
            if fitter.config.patience and bad >= fitter.config.patience:
                break
        return best

    def reestimate_batchnorm(self):
        """BatchNorm statistics measured on the training images (eval view) before the probe; under torchrun each
        rank measures its share and the averages are averaged."""
        fitter = self.fitter
        compute, dist = fitter.compute, fitter.dist
        batches = (compute.to_device(b.images) for b in fitter.loaders.train_eval if b.labels.numel())
        with torch.inference_mode(False):
            done = model_loader.reestimate_batchnorm(fitter.model, batches, compute.stop_requested)
        if done and dist.enabled:
            for m in model_loader.batchnorm_layers(fitter.model):
                for t in (m.running_mean, m.running_var):
                    torch.distributed.all_reduce(t)
                    t /= dist.world_size
        if done:
            fitter.log("BatchNorm: statistics re-estimated on the training images")
        return done


# ----------------------------------------------------------------------------- the time left


class EpochClock:
    """Each epoch's seconds by kind, and the time left from epochs of the same kind: the first epoch on cached
    features, which also built the cache (its own line says how long), took minutes where the next ones took
    milliseconds, and gave estimates like '22:10 left' for 19 s."""

    def __init__(self):
        self.seconds = {}  # kind -> [seconds of its epochs]

    def add(self, kind, seconds):
        self.seconds.setdefault(kind, []).append(seconds)

    def left(self, kinds):
        """'M:SS left' for epochs of these kinds, from the mean of each kind timed so far; epochs of a kind not
        timed yet are named instead ('+ 10 fine-tuning epochs not timed yet')."""
        known = sum(sum(self.seconds[k]) / len(self.seconds[k]) for k in kinds if k in self.seconds)
        untimed = [k for k in kinds if k not in self.seconds]
        left = round(known)
        text = f"{left // 60}:{left % 60:02d} left"
        if untimed:
            text += f" + {len(untimed)} {KIND_WORDS[untimed[0]]} epoch{'s' if len(untimed) > 1 else ''} not timed yet"
        return text


KIND_WORDS = {HEAD: "head", FROZEN: "head", WHOLE: "fine-tuning"}


def pace(kind, train, valid, seconds):
    """The epoch's rate, saying what it counts: cached feature vectors (a head epoch on the cache runs no image
    through the backbone) or images (trained and validated, all processes)."""
    rate = (train["count"] + valid["count"]) / max(seconds, 1e-9)
    return f"{rate:.0f} cached features/s" if kind == HEAD else f"{rate:.1f} img/s"


def elapsed(start):
    return time.perf_counter() - start
