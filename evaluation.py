"""Passes over the images and what is drawn or written from them: collecting a model's logits (or any rows)
over a loader in dataset order, assembled over torchrun's processes; the classifier's logits on cached
features; the reliability diagram; the per-class report's printed and CSV forms. The math is metrics.py's, and
what differs between one label and several is the task's (tasks.py)."""

import torch

from metrics import N_BINS, ece, reliability_bins
from utils import atomic_open, atomic_savefig, bar, new_figure


def draw_reliability(ax, confidence, correct, name, n_bins=N_BINS):
    """One panel: per filled bin, the accuracy as a solid bar and the gap to the mean confidence as a hatched
    outline between the two (above the accuracy when over-confident, over its top when under-confident, where
    the accuracy bar still shows through), with the diagonal."""
    width = 1 / n_bins
    centers = (torch.arange(n_bins, dtype=torch.float64) + 0.5) * width
    count, accuracy, mean_confidence = reliability_bins(confidence, correct, n_bins)
    filled = count > 0
    x, acc, conf = centers[filled].numpy(), accuracy[filled].numpy(), mean_confidence[filled].numpy()
    ax.bar(x, acc, width=width, color="tab:blue", edgecolor="black", label="accuracy")
    ax.bar(
        x,
        abs(conf - acc),
        bottom=torch.minimum(accuracy, mean_confidence)[filled].numpy(),
        width=width,
        fill=False,
        hatch="///",
        edgecolor="red",
        linewidth=1.2,
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="confidence",
        ylabel="accuracy",
        title=f"{name}: ECE {ece(confidence, correct, n_bins):.3f}",
    )
    ax.legend(loc="upper left", fontsize=8)


def save_reliability_diagram(logits, labels, calibration, path, task, n_bins=N_BINS):
    """Accuracy against confidence per bin, before and after calibration, with the diagonal (multi-label: the
    share of (image, class) pairs where the class is there, against its probability)."""
    import matplotlib.pyplot as plt

    fig = new_figure(figsize=(9, 4.2))
    before = task.uncalibrated(logits.shape[1])
    for i, (cal, name) in enumerate(((before, "before (T = 1)"), (calibration, f"after ({calibration.name()})"))):
        draw_reliability(fig.add_subplot(1, 2, i + 1), *cal.confidence_correct(logits, labels), name, n_bins)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- collecting logits


def collect_logits(model, loader, compute, desc="logits", with_index=False):
    """(logits, labels) of every readable image of the loader, in dataset order (see collect_rows)."""
    model.eval()
    return collect_rows(model, loader, compute, desc, with_index=with_index)


@torch.inference_mode()
def collect_rows(forward, loader, compute, desc, stoppable=False, with_index=False):
    """(forward(images) rows, labels) of every readable image of the loader, in dataset order (with_index:
    and their indices in the dataset, a third tensor). Under
    torchrun each rank runs its shard and a sum over ranks assembles the whole set (each row comes from
    one rank), so every rank ends with the same tensors. `stoppable`: None when a stop signal arrives
    (polled between batches in a single process; ranks hold different numbers of batches)."""
    n = len(loader.dataset)
    rows, seen = None, torch.zeros(n)
    dist = compute.dist
    for batch in bar(loader, compute, desc):
        if batch.labels.numel():
            with compute.autocast():
                out = forward(compute.to_device(batch.images)).float().cpu()
            if rows is None:
                rows = torch.zeros(n, out.shape[1])
            rows[batch.indices] = out
            seen[batch.indices] = 1
        if stoppable and not (dist is not None and dist.enabled) and compute.stop_requested():
            return None
    if dist is not None and dist.enabled:
        width = torch.tensor([0 if rows is None else rows.shape[1]], device=compute.device)
        torch.distributed.all_reduce(width, torch.distributed.ReduceOp.MAX)
        rows = torch.zeros(n, int(width)) if rows is None else rows
        both = torch.cat([rows, seen[:, None]], 1).to(compute.device)
        torch.distributed.all_reduce(both)
        rows, seen = both[:, :-1].cpu(), both[:, -1].cpu()
        rows = rows / seen.clamp(min=1)[:, None]  # each row once; an unsharded loader would count it per rank
    labels = loader.dataset.task.tensor(y for _, y in loader.dataset.samples)
    keep = seen > 0
    if rows is None:
        rows, keep = torch.zeros(0, 0), torch.zeros(n, dtype=torch.bool)
    out = (rows[keep] if len(rows) else rows), labels[keep]
    return out + (torch.nonzero(keep).flatten(),) if with_index else out


@torch.inference_mode()
def head_logits(head_module, features, ok, labels, batch_size, compute, with_index=False):
    """(logits, labels) of the classifier on cached features (rows where ok; with_index: and those rows'
    indices, a third tensor)."""
    head_module.eval()
    idx = torch.nonzero(ok).flatten()
    out = [
        head_module(features[idx[s : s + batch_size]].to(compute.device)).float().cpu()
        for s in range(0, len(idx), batch_size)
    ]
    result = (torch.cat(out) if out else torch.zeros(0, 0)), labels[idx]
    return result + (idx,) if with_index else result


def format_report(table):
    """The report as a printed table (4 decimals, NaN shown as '-')."""
    return table.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-")


def write_report(table, path):
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        table.to_csv(f, index=False, float_format="%.6f")
