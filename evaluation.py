"""How far to trust the predictions: temperature scaling (calibration), expected calibration error, the
reliability diagram, the per-class report, and the post-processing both scripts apply to a model's logits
(temperature, test-time flips, the 'unknown' threshold)."""
import math
from dataclasses import dataclass

import torch
from torch import nn

from data_loader import label_tensor
from utils import atomic_open, atomic_savefig, bar, new_figure

N_BINS = 15  # equal-width confidence bins for ECE and the reliability diagram (Guo et al. 2017)
LOG_T_RANGE = (math.log(0.05), math.log(20.0))  # temperatures searched; the NLL is unimodal in log T
UNKNOWN = -1  # the predicted index of a row below --threshold


# ----------------------------------------------------------------------------- logits -> decisions


def with_flips(images):
    """The batch followed by its horizontal mirror images, for one model call (test-time augmentation)."""
    return torch.cat([images, images.flip(-1)])


def probabilities(logits, temperature=1.0, views=1):
    """softmax(logits / T) in float32; with views > 1 the batch holds `views` stacked copies of the same
    images (see with_flips), and their probabilities are averaged."""
    probs = (logits.float() / float(temperature)).softmax(1)
    if views > 1:
        probs = probs.view(views, -1, probs.shape[1]).mean(0)
    return probs


def decide(probs, threshold=None):
    """Predicted class per row; UNKNOWN where the best probability is below `threshold` (None = never)."""
    confidence, pred = probs.max(1)
    if threshold is not None:
        pred = torch.where(confidence < threshold, torch.full_like(pred, UNKNOWN), pred)
    return pred


# ----------------------------------------------------------------------------- calibration


def nll(logits, labels, temperature=1.0):
    return float(nn.functional.cross_entropy(logits.double() / temperature, labels.long()))


def reliability_bins(confidence, correct, n_bins=N_BINS):
    """Per equal-width bin (lo, hi]: (count, accuracy, mean confidence); empty bins have count 0."""
    confidence, correct = confidence.double(), correct.double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    index = (torch.bucketize(confidence, edges, right=False) - 1).clamp(0, n_bins - 1)  # (lo, hi]; 0 -> bin 0
    count = torch.bincount(index, minlength=n_bins).double()
    accuracy = torch.bincount(index, correct, minlength=n_bins) / count.clamp(min=1)
    mean_confidence = torch.bincount(index, confidence, minlength=n_bins) / count.clamp(min=1)
    return count, accuracy, mean_confidence


def ece(confidence, correct, n_bins=N_BINS):
    """Expected calibration error: sum over bins of (share of rows) x |accuracy - mean confidence|."""
    if not len(confidence):
        return 0.0
    count, accuracy, mean_confidence = reliability_bins(confidence, correct, n_bins)
    return float((count / count.sum() * (accuracy - mean_confidence).abs()).sum())


def logits_ece(logits, labels, temperature=1.0):
    confidence, pred = probabilities(logits, temperature).max(1)
    return ece(confidence, pred == labels)


def fit_temperature(logits, labels, loss=nll):
    """The T minimising loss(logits, labels, T), the NLL of softmax(logits / T) by default: a grid over log T
    then golden-section search between the grid neighbours of the best point. NLL is convex in 1/T, so
    unimodal in log T (so is the binary cross-entropy of multilabel.bce)."""
    logits, nll = logits.double(), loss
    lo, hi = LOG_T_RANGE
    grid = torch.linspace(lo, hi, 61, dtype=torch.float64)
    values = [nll(logits, labels, math.exp(g)) for g in grid.tolist()]
    best = min(range(len(values)), key=values.__getitem__)
    a, b = float(grid[max(best - 1, 0)]), float(grid[min(best + 1, len(grid) - 1)])
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(logits, labels, math.exp(c)), nll(logits, labels, math.exp(d))
    for _ in range(40):  # the bracket shrinks to 0.618^40 of its width: ~1e-9 in log T
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(logits, labels, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(logits, labels, math.exp(d))
    return math.exp((a + b) / 2)


@dataclass
class Calibration:
    temperature: float  # 1.0 = none
    metrics: dict  # valid_nll_before/after, valid_ece_before/after, calibration_count
    unfitted: str = ""  # why no temperature could be fitted (then it stays 1.0)

    def probabilities(self, logits, views=1):
        return probabilities(logits, self.temperature, views)

    def checkpoint_entries(self):
        return {"temperature": self.temperature}

    def warnings(self):
        return []  # (multi-label's: thresholds that could not be fitted)

    def summary(self):
        m = self.metrics
        if self.unfitted:
            return (f"temperature stays 1.0: {self.unfitted} (validation NLL {m['valid_nll_before']:.4f}, ECE "
                    f"({N_BINS} bins) {m['valid_ece_before']:.4f} on {m['calibration_count']} validation images)")
        return (f"temperature {self.temperature:.3f} fitted on {m['calibration_count']} validation images: "
                f"validation NLL {m['valid_nll_before']:.4f} -> {m['valid_nll_after']:.4f}, "
                f"validation ECE ({N_BINS} bins) {m['valid_ece_before']:.4f} -> {m['valid_ece_after']:.4f}")


def calibrate(logits, labels, class_names=None):
    """Temperature scaling on validation logits; None when there are none (the temperature stays 1.0).
    Multi-label (a labels matrix): multilabel.calibrate, per-class temperatures and thresholds.
    A temperature is kept only when it lowers the validation NLL; else it stays 1.0, with the reason.
    When the NLL has no minimum inside the searched range the temperature stays 1.0, with the reason:
    with every validation image predicted right, the NLL keeps falling as T -> 0, and the 'fitted' T
    would make every prediction certain (a test image that is wrong then gets confidence 1.0)."""
    if labels.dim() == 2:
        import multilabel

        return multilabel.calibrate(logits, labels, class_names or [str(c) for c in range(labels.shape[1])])
    if not len(labels):
        return None
    temperature, unfitted = fit_temperature(logits, labels), ""
    lo, hi = (math.exp(x) for x in LOG_T_RANGE)
    if temperature < lo * 1.01:
        every = bool((logits.argmax(1) == labels).all())
        unfitted = (("every validation image is predicted right, so " if every else "")
                    + f"the validation NLL still falls at T = {lo:g} and no temperature can be fitted")
    elif temperature > hi / 1.01:
        unfitted = "the validation NLL falls as T grows without end (the model is no better than chance there)"
    elif not nll(logits, labels, temperature) < nll(logits, labels):  # calibration must not make it worse
        unfitted = (f"T = {temperature:.3f} would not lower the validation NLL (it gives "
                    f"{nll(logits, labels, temperature):.4f})")
    if unfitted:
        temperature = 1.0
    metrics = {"valid_nll_before": nll(logits, labels), "valid_nll_after": nll(logits, labels, temperature),
               "valid_ece_before": logits_ece(logits, labels), "valid_ece_after": logits_ece(logits, labels, temperature),
               "calibration_count": int(len(labels))}
    return Calibration(float(temperature), metrics, unfitted)


def confidence_correct(logits, labels, calibration=None):
    """(confidence, correct) pairs of the reliability diagram: the top class's calibrated probability and whether
    it is right; multi-label (a labels matrix): every (image, class) probability and whether the class is there."""
    if labels.dim() == 2:
        probs = calibration.probabilities(logits) if calibration is not None else logits.float().sigmoid()
        return probs.flatten(), labels.flatten().bool()
    confidence, pred = (calibration.probabilities(logits) if calibration is not None else probabilities(logits)).max(1)
    return confidence, pred == labels


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
    ax.bar(x, abs(conf - acc), bottom=torch.minimum(accuracy, mean_confidence)[filled].numpy(), width=width,
           fill=False, hatch="///", edgecolor="red", linewidth=1.2, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title=f"{name}: ECE {ece(confidence, correct, n_bins):.3f}")
    ax.legend(loc="upper left", fontsize=8)


def save_reliability_diagram(logits, labels, calibration, path, n_bins=N_BINS):
    """Accuracy against confidence per bin, before and after calibration, with the diagonal (multi-label: the
    share of (image, class) pairs where the class is there, against its probability)."""
    import matplotlib.pyplot as plt

    fig = new_figure(figsize=(9, 4.2))
    after = f"after (T = {calibration.temperature:.3f})" if hasattr(calibration, "temperature") else "after (T per class)"
    for i, (cal, name) in enumerate(((None, "before (T = 1)"), (calibration, after))):
        confidence, correct = confidence_correct(logits, labels, cal)
        draw_reliability(fig.add_subplot(1, 2, i + 1), confidence, correct, name, n_bins)
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
    labels = label_tensor(y for _, y in loader.dataset.samples)
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
    out = [head_module(features[idx[s:s + batch_size]].to(compute.device)).float().cpu()
           for s in range(0, len(idx), batch_size)]
    result = (torch.cat(out) if out else torch.zeros(0, 0)), labels[idx]
    return result + (idx,) if with_index else result


def loss_accuracy(logits, labels):
    """The metrics trainer.evaluate reports, from collected logits (multi-label: multilabel.loss_accuracy)."""
    if labels.dim() == 2:
        import multilabel

        return multilabel.loss_accuracy(logits, labels)
    if not len(labels):
        return {"loss": 0.0, "accuracy": 0.0, "count": 0}
    return {"loss": nll(logits, labels), "accuracy": float((logits.argmax(1) == labels).double().mean()),
            "count": int(len(labels))}


def test_results(logits, labels, calibration, class_names):
    """(metrics, per-class report or None) of the test images' logits, with the calibration fitted on the
    validation images (None: uncalibrated). Multi-label: accuracy is the exact match of the thresholded sets,
    and the metrics add map, micro_f1 and macro_f1 (multilabel.report). The loss (NLL; multi-label: BCE) and
    ece are those of the raw logits, loss_calibrated and ece_calibrated those under the calibration."""
    metrics = loss_accuracy(logits, labels)
    if not len(labels):
        return metrics, None
    metrics["ece"] = ece(*confidence_correct(logits, labels))
    if labels.dim() == 2:
        import multilabel

        calibration = calibration or multilabel.from_checkpoint({"class_names": class_names})
        probs = calibration.probabilities(logits)
        table, summary = multilabel.report(labels, multilabel.decide(probs, calibration.thresholds), probs, class_names)
        metrics.update(accuracy=summary["exact_match"], map=summary["mAP"], micro_f1=summary["micro_f1"],
                       macro_f1=summary["macro_f1"], ece_calibrated=ece(*confidence_correct(logits, labels, calibration)),
                       loss_calibrated=multilabel.bce(logits / torch.tensor(calibration.temperatures), labels))
        return metrics, table
    probs = calibration.probabilities(logits) if calibration is not None else probabilities(logits)
    metrics.update(ece_calibrated=ece(*confidence_correct(logits, labels, calibration)),
                   loss_calibrated=nll(logits, labels, calibration.temperature if calibration is not None else 1.0))
    return metrics, classification_report(labels, probs.argmax(1), probs, class_names)


# ----------------------------------------------------------------------------- the per-class report


def roc_auc(scores, positive):
    """Area under the ROC curve: the chance a positive outranks a negative, ties counting half
    (Mann-Whitney U from average ranks). NaN without both positives and negatives."""
    import pandas as pd

    scores, positive = pd.Series(scores, dtype="float64"), pd.Series(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return math.nan
    ranks = scores.rank(method="average")
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(scores, positive):
    """Sum over distinct score thresholds, highest first, of (recall gained) x (precision there):
    scikit-learn's average_precision_score. NaN without positives."""
    import pandas as pd

    frame = pd.DataFrame({"score": scores, "positive": pd.Series(positive, dtype=bool)})
    n_pos = int(frame.positive.sum())
    if not n_pos:
        return math.nan
    at = frame.groupby("score", sort=True).positive.agg(["sum", "count"]).iloc[::-1].cumsum()
    precision, recall = at["sum"] / at["count"], at["sum"] / n_pos
    return float((recall.diff().fillna(recall.iloc[0]) * precision).sum())


REPORT_COLUMNS = ["class", "precision", "recall", "f1", "support", "roc_auc", "average_precision"]


def report_row(name, hit, predicted, support, scores, positive):
    """One row of a report: precision, recall and F1 from the counts (0 when undefined, as scikit-learn's
    zero_division=0), support, and the ROC AUC and average precision of `scores` against `positive`."""
    precision = hit / predicted if predicted else 0.0
    recall = hit / support if support else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"class": name, "precision": precision, "recall": recall, "f1": f1, "support": support,
            "roc_auc": roc_auc(scores, positive), "average_precision": average_precision(scores, positive)}


def classification_report(labels, preds, probs, class_names):
    """A pandas DataFrame in scikit-learn's layout: one row per class, then 'macro avg' (plain mean) and
    'weighted avg' (by support). preds may hold UNKNOWN (below --threshold): such rows count as wrong for
    recall and are left out of precision. roc_auc and average_precision are one-vs-rest from probs.
    A class never predicted has precision 0 (as scikit-learn's zero_division=0)."""
    import numpy as np
    import pandas as pd

    labels, preds = np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64).reshape(len(labels), len(class_names))
    rows = [report_row(name, int(((preds == c) & (labels == c)).sum()), int((preds == c).sum()),
                       int((labels == c).sum()), probs[:, c], labels == c) for c, name in enumerate(class_names)]
    table = pd.DataFrame(rows, columns=REPORT_COLUMNS)
    metrics = REPORT_COLUMNS[1:4] + REPORT_COLUMNS[5:]
    total = int(table.support.sum())
    macro = {"class": "macro avg", **table[metrics].mean().to_dict(), "support": total}  # NaN (one-class) skipped
    weighted = {"class": "weighted avg", **{m: weighted_mean(table[m], table.support) for m in metrics},
                "support": total}
    return pd.concat([table, pd.DataFrame([macro, weighted], columns=REPORT_COLUMNS)], ignore_index=True)


def weighted_mean(values, weights):
    """Mean of the non-NaN values weighted by support; NaN when they weigh nothing."""
    known = values.notna()
    total = float(weights[known].sum())
    return float((values[known] * weights[known]).sum() / total) if total else math.nan


def format_report(table):
    """The report as a printed table (4 decimals, NaN shown as '-')."""
    return table.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-")


def write_report(table, path):
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        table.to_csv(f, index=False, float_format="%.6f")
