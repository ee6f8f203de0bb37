"""The mode-neutral math of evaluation, on tensors and lists: losses (NLL, BCE), temperature fitting, reliability
bins and ECE, ROC AUC and average precision, report rows, exact match, mAP and the best-F1 threshold. A leaf:
it imports no module of this project."""

import math

import torch
from torch import nn

N_BINS = 15  # equal-width confidence bins for ECE and the reliability diagram (Guo et al. 2017)
LOG_T_RANGE = (math.log(0.05), math.log(20.0))  # temperatures searched; the NLL is unimodal in log T
DEFAULT_THRESHOLD = 0.5  # a multi-label class without positive validation images keeps this decision threshold
REPORT_COLUMNS = ["class", "precision", "recall", "f1", "support", "roc_auc", "average_precision"]


# ----------------------------------------------------------------------------- losses


def nll(logits, labels, temperature=1.0):
    """Mean negative log-likelihood of softmax(logits / T) at the class indices `labels`, in float64."""
    return float(nn.functional.cross_entropy(logits.double() / temperature, labels.long()))


def bce(logits, labels, temperature=1.0):
    """Mean binary cross-entropy of sigmoid(logits / T) over every (image, class) pair, in float64."""
    return float(nn.functional.binary_cross_entropy_with_logits(logits.double() / temperature, labels.double()))


def fit_temperature(logits, labels, loss=nll):
    """The T minimising loss(logits, labels, T), the NLL of softmax(logits / T) by default: a grid over log T
    then golden-section search between the grid neighbours of the best point. NLL is convex in 1/T, so
    unimodal in log T (so is the binary cross-entropy, bce)."""
    logits = logits.double()
    lo, hi = LOG_T_RANGE
    grid = torch.linspace(lo, hi, 61, dtype=torch.float64)
    values = [loss(logits, labels, math.exp(g)) for g in grid.tolist()]
    best = min(range(len(values)), key=values.__getitem__)
    a, b = float(grid[max(best - 1, 0)]), float(grid[min(best + 1, len(grid) - 1)])
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = loss(logits, labels, math.exp(c)), loss(logits, labels, math.exp(d))
    for _ in range(40):  # the bracket shrinks to 0.618^40 of its width: ~1e-9 in log T
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = loss(logits, labels, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = loss(logits, labels, math.exp(d))
    return math.exp((a + b) / 2)


def mean_confidence(logits, temperature):
    """The mean over rows of the largest softmax(logits / T) probability."""
    return float((logits.double() / temperature).softmax(1).max(1).values.mean())


def limit_sharpening(logits, labels, temperature):
    """(T, (fitted T, limit) or None) for a fitted T below 1: the T, between it and 1, at which the mean confidence
    on these images equals (right + 1) / (n + 2), the accuracy one more right and one more wrong image would give
    (Laplace's rule of succession), when the fitted T would go above it; 1.0 when even T = 1 does. A few validation
    images, nearly all right, otherwise fit a T that makes every prediction certain."""
    right, n = int((logits.argmax(1) == labels).sum()), len(labels)
    limit = (right + 1) / (n + 2)
    if mean_confidence(logits, temperature) <= limit:
        return temperature, None
    if mean_confidence(logits, 1.0) >= limit:
        return 1.0, (temperature, limit)
    lo, hi = math.log(temperature), 0.0  # mean confidence falls as T grows: above the limit at lo, below at hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_confidence(logits, math.exp(mid)) > limit else (lo, mid)
    return math.exp(hi), (temperature, limit)


def temperature_in_range(t):
    """Whether a fitted T lies inside the searched range (else the loss had no minimum there)."""
    lo, hi = (math.exp(x) for x in LOG_T_RANGE)
    return lo * 1.01 < t < hi / 1.01


# ----------------------------------------------------------------------------- calibration error


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


# ----------------------------------------------------------------------------- ranking and the report


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


def report_row(name, hit, predicted, support, scores, positive):
    """One row of a report: precision, recall and F1 from the counts (0 when undefined, as scikit-learn's
    zero_division=0), support, and the ROC AUC and average precision of `scores` against `positive`."""
    precision = hit / predicted if predicted else 0.0
    recall = hit / support if support else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "class": name,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": support,
        "roc_auc": roc_auc(scores, positive),
        "average_precision": average_precision(scores, positive),
    }


def weighted_mean(values, weights):
    """Mean of the non-NaN values weighted by support; NaN when they weigh nothing."""
    known = values.notna()
    total = float(weights[known].sum())
    return float((values[known] * weights[known]).sum() / total) if total else math.nan


# ----------------------------------------------------------------------------- sets of labels


def exact_match(preds, labels):
    """Share of images whose predicted set of classes is exactly their labelled set."""
    return float((preds.bool() == labels.bool()).all(1).double().mean()) if len(labels) else 0.0


def mean_average_precision(probs, labels):
    """The mean over classes of average precision (classes without positives left out); NaN when none has any."""
    values = [average_precision(probs[:, c].tolist(), labels[:, c].bool().tolist()) for c in range(labels.shape[1])]
    known = [v for v in values if not math.isnan(v)]
    return sum(known) / len(known) if known else math.nan


def best_f1_threshold(probs, positive):
    """The decision threshold of one class that maximises F1 on (probs, positive): halfway between the lowest
    probability taken as positive and the next lower one (the highest such cut when several tie). A class
    without positives keeps DEFAULT_THRESHOLD. When the best cut takes every image (a class present in every
    one), nothing lower bounds it: the lowest probability, or DEFAULT_THRESHOLD if lower (a class never seen
    absent is predicted whenever it is plausible)."""
    probs, positive = probs.double(), positive.bool()
    n_pos = int(positive.sum())
    if not n_pos:
        return DEFAULT_THRESHOLD
    order = probs.argsort(descending=True)
    p, hits = probs[order], positive[order].double().cumsum(0)
    k = torch.arange(1, len(p) + 1, dtype=torch.float64)
    f1 = 2 * hits / (k + n_pos)  # 2TP / (2TP + FP + FN) with TP + FP = k, TP + FN = n_pos
    cut = torch.ones(len(p), dtype=torch.bool)  # a cut between ranks i and i+1 only where the probability drops
    cut[:-1] = p[:-1] > p[1:]
    f1 = torch.where(cut, f1, torch.full_like(f1, -1.0))
    i = int(f1.argmax())  # the first maximum: the highest threshold among ties
    return float((p[i] + p[i + 1]) / 2) if i + 1 < len(p) else min(float(p[i]), DEFAULT_THRESHOLD)
