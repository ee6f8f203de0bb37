"""Several labels per image: train.py --labels_csv FILE --multi_label.

The CSV's label column holds every class an image shows, separated by --label_delim (default a space); an
empty label is an image showing none of them. A sample's label is then a multi-hot tuple (1 where the class
is present), and a batch's labels a float (N, classes) matrix; that shape is what tells the loops apart.
The model gives one logit per class, read as an independent sigmoid probability and trained with
BCEWithLogitsLoss. After training each class gets its own temperature (the BCE-minimising T of its column on
the validation images) and its own decision threshold (the one maximising that class's F1 on the validation
images, on the calibrated probabilities); both go into the checkpoint. A prediction is every class whose
calibrated probability reaches its threshold."""
import math
from dataclasses import dataclass, field

import torch
from torch import nn

DEFAULT_DELIM = " "
DEFAULT_THRESHOLD = 0.5  # a class without positive validation images keeps this decision threshold


# ----------------------------------------------------------------------------- labels


def split_labels(text, delim=DEFAULT_DELIM):
    """The distinct class names of one label cell, sorted ('dog cat' -> ['cat', 'dog']); '' -> []."""
    parts = text.split() if not delim.strip() else text.split(delim)
    return sorted({p.strip() for p in parts if p.strip()})


def is_multi_hot(label):
    return isinstance(label, tuple)


def label_text(label, class_names, delim=DEFAULT_DELIM):
    """A sample's label as text: the class name, or a multi-hot tuple's names joined by delim."""
    if is_multi_hot(label):
        return delim.join(name for name, on in zip(class_names, label) if on)
    return class_names[label] if label >= 0 else ""


def positive_counts(samples, n_classes):
    """Images showing each class."""
    counts = [0] * n_classes
    for _, label in samples:
        for c, on in enumerate(label):
            counts[c] += on
    return counts


def positive_weights(samples, n_classes):
    """--class_weights auto: BCEWithLogitsLoss's pos_weight per class, negatives / positives (1.0 when a class has
    no positive or no negative image)."""
    positives = positive_counts(samples, n_classes)
    return [(len(samples) - p) / p if 0 < p < len(samples) else 1.0 for p in positives]


# ----------------------------------------------------------------------------- logits -> decisions


def probabilities(logits, temperatures=None, views=1):
    """sigmoid(logits / T_class) in float32; with views > 1 the batch holds `views` stacked copies of the same
    images (evaluation.with_flips) and their probabilities are averaged."""
    logits = logits.float()
    if temperatures is not None:
        logits = logits / torch.as_tensor(temperatures, dtype=torch.float32, device=logits.device)
    probs = logits.sigmoid()
    if views > 1:
        probs = probs.view(views, -1, probs.shape[1]).mean(0)
    return probs


def decide(probs, thresholds):
    """Boolean (N, classes): the classes whose probability reaches their threshold (compared in float64: a
    threshold halfway between two float32 probabilities stays between them)."""
    return probs.double() >= torch.as_tensor(thresholds, dtype=torch.float64, device=probs.device)


def bce(logits, labels, temperature=1.0):
    """Mean binary cross-entropy of sigmoid(logits / T) over every (image, class) pair, in float64."""
    return float(nn.functional.binary_cross_entropy_with_logits(logits.double() / temperature, labels.double()))


def exact_match(preds, labels):
    """Share of images whose predicted set of classes is exactly their labelled set."""
    return float((preds.bool() == labels.bool()).all(1).double().mean()) if len(labels) else 0.0


def loss_accuracy(logits, labels):
    """trainer's metrics from collected logits: BCE, the exact match at probability 0.5, and the mAP."""
    if not len(labels):
        return {"loss": 0.0, "accuracy": 0.0, "count": 0}
    return {"loss": bce(logits, labels), "accuracy": exact_match(logits > 0, labels), "count": int(len(labels)),
            "map": mean_average_precision(logits.float().sigmoid(), labels)}


def mean_average_precision(probs, labels):
    """The mean over classes of average precision (classes without positives left out); NaN when none has any."""
    import evaluation

    values = [evaluation.average_precision(probs[:, c].tolist(), labels[:, c].bool().tolist())
              for c in range(labels.shape[1])]
    known = [v for v in values if not math.isnan(v)]
    return sum(known) / len(known) if known else math.nan


# ----------------------------------------------------------------------------- calibration


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


@dataclass
class Calibration:
    """Per-class temperatures and decision thresholds fitted on the validation images."""
    temperatures: list
    thresholds: list
    metrics: dict  # valid_bce_before/after, valid_map, valid_exact_match(_at_half), calibration_count
    unfitted: list  # names of the classes whose temperature stays 1.0: their BCE has no minimum in the range
    no_better: list = field(default_factory=list)  # and those whose fitted temperature would not lower their BCE
    always: dict = field(default_factory=dict)  # class present in every validation image -> its threshold
    absent: list = field(default_factory=list)  # and of those present in none (their threshold is not fitted)

    def probabilities(self, logits, views=1):
        return probabilities(logits, self.temperatures, views)

    def checkpoint_entries(self):
        return {"temperatures": list(self.temperatures), "thresholds": list(self.thresholds)}

    def warnings(self):
        """Lines about thresholds the validation images could not fit: a class in every image, or in none."""
        out = []
        if self.always:
            out.append(f"warning: {', '.join(self.always)} {'is' if len(self.always) == 1 else 'are'} in every "
                       "validation image, so no threshold can be fitted against images without "
                       f"{'it' if len(self.always) == 1 else 'them'}: the lowest validation probability, or 0.5 if "
                       f"lower, is used ({fmt(self.always.values())})")
        if self.absent:
            out.append(f"warning: no validation image shows {', '.join(self.absent)}: threshold "
                       f"{DEFAULT_THRESHOLD:g}, not fitted (give the validation images some, e.g. with a split column)")
        return out

    def summary(self):
        m = self.metrics
        kept = f"; temperature stays 1.0 for {', '.join(self.unfitted)}" if self.unfitted else ""
        if self.no_better:
            kept += (f"; temperature stays 1.0 for {', '.join(self.no_better)}: a fitted one would not lower "
                     f"{'its' if len(self.no_better) == 1 else 'their'} validation BCE")
        return (f"per-class temperatures {fmt(self.temperatures)} and F1 thresholds {fmt(self.thresholds)} fitted "
                f"on {m['calibration_count']} validation images: validation BCE {m['valid_bce_before']:.4f} -> "
                f"{m['valid_bce_after']:.4f}, exact match {m['valid_exact_match_at_half']:.4f} (all at 0.5) -> "
                f"{m['valid_exact_match']:.4f}, mAP {m['valid_map']:.4f}{kept}")


def fmt(values):
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


def calibrate(logits, labels, class_names):
    """Calibration of the best model from its validation logits; None when there are none."""
    from evaluation import LOG_T_RANGE, fit_temperature

    if not len(labels):
        return None
    lo, hi = (math.exp(x) for x in LOG_T_RANGE)
    temperatures, unfitted, no_better = [], [], []
    for c, name in enumerate(class_names):
        t = fit_temperature(logits[:, c], labels[:, c], loss=bce)
        if not lo * 1.01 < t < hi / 1.01:  # no minimum inside the range (a perfectly separated column)
            t = 1.0
            unfitted.append(name)
        elif not bce(logits[:, c], labels[:, c], t) < bce(logits[:, c], labels[:, c]):  # it must not make it worse
            t = 1.0
            no_better.append(name)
        temperatures.append(float(t))
    probs = probabilities(logits, temperatures)
    thresholds = [best_f1_threshold(probs[:, c], labels[:, c]) for c in range(labels.shape[1])]
    metrics = {"valid_bce_before": bce(logits, labels), "valid_bce_after": bce(logits / torch.tensor(temperatures), labels),
               "valid_map": mean_average_precision(probs, labels),
               "valid_exact_match_at_half": exact_match(logits > 0, labels),
               "valid_exact_match": exact_match(decide(probs, thresholds), labels), "calibration_count": int(len(labels))}
    positives = labels.bool().sum(0).tolist()
    always = {name: thresholds[c] for c, name in enumerate(class_names) if positives[c] == len(labels)}
    absent = [name for c, name in enumerate(class_names) if not positives[c]]
    return Calibration(temperatures, thresholds, metrics, unfitted, no_better, always, absent)


def from_checkpoint(ckpt):
    """The calibration stored in a multi-label checkpoint (or an export's metadata)."""
    n = len(ckpt["class_names"])
    return Calibration(list(ckpt.get("temperatures") or [1.0] * n), list(ckpt.get("thresholds") or
                                                                        [DEFAULT_THRESHOLD] * n), {}, [])


# ----------------------------------------------------------------------------- the report


def report(labels, preds, probs, class_names):
    """(table, summary): the per-class table (precision, recall, F1 of the decided sets, support = images
    showing the class, ROC AUC and average precision of the probabilities), then 'micro avg' (pooled over every
    (image, class) pair) and 'macro avg' (plain mean over classes; its average_precision is the mAP); summary
    holds mAP, exact-match accuracy, the micro and macro F1 and the image count."""
    import pandas as pd

    from evaluation import REPORT_COLUMNS, report_row

    labels, preds, probs = labels.bool(), preds.bool(), probs.double()

    def row(name, y, p, scores):  # y, p: present, predicted (any shape); scores: the probabilities
        return report_row(name, int((y & p).sum()), int(p.sum()), int(y.sum()), scores.flatten().tolist(),
                          y.flatten().tolist())

    table = pd.DataFrame([row(name, labels[:, c], preds[:, c], probs[:, c]) for c, name in enumerate(class_names)],
                         columns=REPORT_COLUMNS)
    micro = row("micro avg", labels, preds, probs)
    metrics = REPORT_COLUMNS[1:4] + REPORT_COLUMNS[5:]
    macro = {"class": "macro avg", **table[metrics].mean().to_dict(), "support": int(labels.sum())}
    table = pd.concat([table, pd.DataFrame([micro, macro], columns=REPORT_COLUMNS)], ignore_index=True)
    summary = {"mAP": float(macro["average_precision"]), "exact_match": exact_match(preds, labels),
               "micro_f1": float(micro["f1"]), "macro_f1": float(macro["f1"]), "count": int(len(labels))}
    return table, summary


def describe_summary(summary):
    return (f"mAP {summary['mAP']:.4f}, exact match {summary['exact_match']:.4f}, micro F1 {summary['micro_f1']:.4f}, "
            f"macro F1 {summary['macro_f1']:.4f} on {summary['count']} images")
