"""What a run writes as it goes and at its end, on the main process: the best and the resumable last checkpoint
(RunFiles), metrics.csv and TensorBoard's scalars (one row per epoch), the hyperparameters with the best figures,
and the grid of validation predictions."""

import csv
import math
import time
from pathlib import Path

import torch

import model_loader
from data_loader import Preprocess, load_rgb
from utils import atomic_open, atomic_torch_save, image_grid_figure

BASE_METRICS = ("loss", "accuracy", "count")  # every evaluation's; a task may add more (multi-label: map)
TAGS = {"valid_map": "Validation/mAP"}  # TensorBoard's name of an added validation metric, else Validation/<name>


def added_metrics(valid):
    """The validation metrics the task adds to loss and accuracy (tasks.py epoch_extras), as valid_<name>."""
    return {f"valid_{k}": v for k, v in valid.items() if k not in BASE_METRICS}


def added_columns(row):
    return [k for k in row if k.startswith("valid_") and k[6:] not in BASE_METRICS]


def epoch_row(epoch, train, valid, lr, seconds):
    """One epoch's line of the history (metrics.csv, TensorBoard), with the validation metrics the task adds."""
    row = {
        "epoch": epoch,
        "train_loss": train["loss"],
        "train_accuracy": train["accuracy"],
        "valid_loss": valid["loss"],
        "valid_accuracy": valid["accuracy"],
        "lr": lr,
        "seconds": round(seconds, 3),
        "valid_count": valid["count"],
    }
    return {**row, **added_metrics(valid)}


def epoch_line(row, n_epochs, pace, improved):
    """The epoch's log line: its losses and accuracies, rate, seconds and time left (`pace`), and *best."""
    return (
        f"epoch {row['epoch']}/{n_epochs}  train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}  "
        f"valid loss {row['valid_loss']:.4f} acc {row['valid_accuracy']:.4f}  lr {row['lr']:.2e}  "
        f"{row['seconds']:.1f}s, {pace}{'  *best' if improved else ''}"
    )


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
        best = [
            model_loader.safe_load(self.model_fn)["state_dict"] if self.is_main and self.model_fn.exists() else None
        ]
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


def log_summary(fitter, calibration, test_metrics):
    """TensorBoard: the best model's validation predictions' grid, and the run's flags with its best and test
    figures."""
    writer = fitter.files.open_writer(fitter.state.epoch)
    if writer is None:  # not rank 0
        return
    figure = prediction_grid(
        fitter.model,
        fitter.splits.valid,
        fitter.splits.class_names,
        fitter.meta,
        fitter.compute,
        fitter.task,
        calibration=calibration,
    )
    if figure is not None:
        writer.add_figure("Validation/Predictions", figure, fitter.state.epoch)
    metrics = {f"hparam/{k}": float(v) for k, v in fitter.state.best_metrics.items()}
    metrics.update({f"hparam/test_{k}": float(test_metrics[k]) for k in ("accuracy", "map") if k in test_metrics})
    fitted = calibration or fitter.task.uncalibrated(len(fitter.splits.class_names))
    metrics.update({f"hparam/{k}": float(v) for k, v in fitted.hparams().items()})
    metrics.update({f"hparam/{k}": float(v) for k, v in (calibration.metrics if calibration else {}).items()})
    log_hparams(writer, {k: v for k, v in fitter.config.flags.items() if v is not None}, metrics, fitter.state.epoch)
