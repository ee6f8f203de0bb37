"""How a model's logits are read after training, and what predict.py tallies of the labelled rows: one temperature
and the top class (Calibration), or a temperature and a decision threshold per class (SetCalibration), fitted by
the task (tasks.py) on the validation images; the accuracy, confusion matrix and report of predict.py's labelled
rows (Tally, SetTally)."""

from dataclasses import dataclass

import torch
from torch import nn

import metrics
from metrics import N_BINS

UNKNOWN = -1  # the predicted index of a row below --threshold (or rejected by --reject_ood)


def fmt(values):
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


def with_flips(images):
    """The batch followed by its horizontal mirror images, for one model call (test-time augmentation)."""
    return torch.cat([images, images.flip(-1)])


def averaged(probs, views):
    """With views > 1 the batch holds `views` stacked copies of the same images (with_flips): their mean."""
    return probs.view(views, -1, probs.shape[1]).mean(0) if views > 1 else probs


# ----------------------------------------------------------------------------- calibrations


@dataclass
class Calibration:
    """One temperature for the softmax, fitted on the validation images (1.0 = none)."""

    temperature: float = 1.0
    metrics: dict = None  # valid_nll_before/after, valid_ece_before/after, calibration_count
    unfitted: str = ""  # why no temperature could be fitted (then it stays 1.0)

    def probabilities(self, logits, views=1):
        """softmax(logits / T) in float32, averaged over the views (see with_flips)."""
        return averaged((logits.float() / float(self.temperature)).softmax(1), views)

    def uncertainty(self, probs, threshold=None):
        """(N,) in [0, 1] per row of calibrated probabilities: 1 - the margin between the two likeliest classes (1: a
        tie, 0: certain); what --rank_for_labelling ranks by. `threshold` does not change which class wins."""
        top = probs.topk(min(2, probs.shape[1]), dim=1).values
        return 1 - (top[:, 0] - (top[:, 1] if top.shape[1] > 1 else 0))

    def decide(self, probs, threshold=None):
        """Predicted class per row; UNKNOWN where the best probability is below `threshold` (None = never)."""
        confidence, pred = probs.max(1)
        if threshold is not None:
            pred = torch.where(confidence < threshold, torch.full_like(pred, UNKNOWN), pred)
        return pred

    def row_loss(self, logits, labels):
        """-log p(given class) per row."""
        logp = (logits.float() / float(self.temperature)).log_softmax(1)
        return -logp.gather(1, labels[:, None])[:, 0]

    def confidence_correct(self, logits, labels):
        """The reliability diagram's pairs: the top class's probability, and whether it is right."""
        confidence, pred = self.probabilities(logits).max(1)
        return confidence, pred == labels

    def checkpoint_entries(self):
        return {"temperature": self.temperature}

    def hparams(self):
        return {"temperature": self.temperature}

    def scalar_temperature(self):
        """The one temperature the out-of-distribution scores divide the logits by."""
        return self.temperature

    def name(self):
        return f"T = {self.temperature:.3f}"

    def summary(self):
        m = self.metrics
        if self.unfitted:
            return (
                f"temperature stays 1.0: {self.unfitted} (validation NLL {m['valid_nll_before']:.4f}, ECE "
                f"({N_BINS} bins) {m['valid_ece_before']:.4f} on {m['calibration_count']} validation images)"
            )
        limited = (
            f" (limited from the NLL's minimum, T = {m['sharpest_temperature']:.3f}, so that the mean validation "
            f"confidence stays {m['confidence_limit']:.3f}, the accuracy of one more right and one more wrong image)"
            if "sharpest_temperature" in m
            else ""
        )
        return (
            f"temperature {self.temperature:.3f} fitted on {m['calibration_count']} validation images{limited}: "
            f"validation NLL {m['valid_nll_before']:.4f} -> {m['valid_nll_after']:.4f}, "
            f"validation ECE ({N_BINS} bins) {m['valid_ece_before']:.4f} -> {m['valid_ece_after']:.4f}"
        )

    def warnings(self):
        return []  # (a set calibration's: thresholds that could not be fitted)


@dataclass
class SetCalibration:
    """Per-class temperatures and decision thresholds fitted on the validation images."""

    temperatures: list
    thresholds: list
    metrics: dict = None  # valid_bce_before/after, valid_map, valid_exact_match(_at_half), calibration_count
    unfitted: list = ()  # names of the classes whose temperature stays 1.0: their BCE has no minimum in the range
    no_better: list = ()  # and those whose fitted temperature would not lower their BCE
    always: dict = None  # class present in every validation image -> its threshold
    absent: list = ()  # and those present in none (their threshold is not fitted)

    def probabilities(self, logits, views=1):
        """sigmoid(logits / T_class) in float32, averaged over the views (see with_flips)."""
        logits = logits.float() / torch.as_tensor(self.temperatures, dtype=torch.float32, device=logits.device)
        return averaged(logits.sigmoid(), views)

    def uncertainty(self, probs, threshold=None):
        """(N,) in [0, 1]: how close the least decided class is to its decision threshold (the fitted ones, or
        `threshold` for every class), as a share of the room on that side (1: a class exactly at its threshold)."""
        t = torch.as_tensor(
            self.thresholds if threshold is None else [threshold] * probs.shape[1], dtype=torch.float32
        ).to(probs.device)
        room = torch.maximum(t, 1 - t).clamp_min(1e-6)
        return 1 - ((probs.float() - t).abs() / room).min(dim=1).values

    def decide(self, probs, threshold=None):
        """Boolean (N, classes): the classes whose probability reaches their threshold (`threshold`: that one
        for every class), compared in float64: a threshold halfway between two float32 probabilities stays
        between them."""
        thresholds = self.thresholds if threshold is None else [threshold] * probs.shape[1]
        return decide_sets(probs, thresholds)

    def row_loss(self, logits, labels):
        """-log p(given set): the BCE of every class of the row, summed."""
        scaled = logits.float() / torch.tensor(self.temperatures, dtype=torch.float32)
        return nn.functional.binary_cross_entropy_with_logits(scaled, labels.float(), reduction="none").sum(1)

    def confidence_correct(self, logits, labels):
        """The reliability diagram's pairs: every (image, class) probability, and whether the class is there."""
        return self.probabilities(logits).flatten(), labels.flatten().bool()

    def checkpoint_entries(self):
        return {"temperatures": list(self.temperatures), "thresholds": list(self.thresholds)}

    def hparams(self):
        return {}

    def scalar_temperature(self):
        return 1.0  # per-class temperatures: the out-of-distribution scores read the logits as they are

    def name(self):
        return "T per class"

    def warnings(self):
        """Lines about thresholds the validation images could not fit: a class in every image, or in none."""
        out, always = [], self.always or {}
        if always:
            out.append(
                f"warning: {', '.join(always)} {'is' if len(always) == 1 else 'are'} in every "
                "validation image, so no threshold can be fitted against images without "
                f"{'it' if len(always) == 1 else 'them'}: the lowest validation probability, or 0.5 if "
                f"lower, is used ({fmt(always.values())})"
            )
        if self.absent:
            out.append(
                f"warning: no validation image shows {', '.join(self.absent)}: threshold "
                f"{metrics.DEFAULT_THRESHOLD:g}, not fitted (give the validation images some, e.g. with a split "
                "column)"
            )
        return out

    def summary(self):
        m = self.metrics
        kept = f"; temperature stays 1.0 for {', '.join(self.unfitted)}" if self.unfitted else ""
        if self.no_better:
            kept += (
                f"; temperature stays 1.0 for {', '.join(self.no_better)}: a fitted one would not lower "
                f"{'its' if len(self.no_better) == 1 else 'their'} validation BCE"
            )
        return (
            f"per-class temperatures {fmt(self.temperatures)} and F1 thresholds {fmt(self.thresholds)} fitted "
            f"on {m['calibration_count']} validation images: validation BCE {m['valid_bce_before']:.4f} -> "
            f"{m['valid_bce_after']:.4f}, exact match {m['valid_exact_match_at_half']:.4f} (all at 0.5) -> "
            f"{m['valid_exact_match']:.4f}, mAP {m['valid_map']:.4f}{kept}"
        )


def decide_sets(probs, thresholds):
    """Boolean (N, classes): the classes whose probability reaches their threshold (in float64)."""
    return probs.double() >= torch.as_tensor(thresholds, dtype=torch.float64, device=probs.device)


# ----------------------------------------------------------------------------- what predict.py tallies


class Tally:
    """Labels, decisions and probabilities of the labelled rows: accuracy, the confusion matrix (with an
    'unknown' column under --threshold) and the per-class report."""

    PACKED = 1024  # rows of probabilities stacked into one float32 tensor at a time (memory: 4 bytes a number)

    def __init__(self, task):
        self.task = task
        self.labels, self.preds, self.argmax = [], [], []
        self.packed, self.recent = [], []  # the probabilities: stacked chunks, and the rows since the last one

    def keep_probs(self, probs):
        self.recent.append(torch.as_tensor(probs, dtype=torch.float32).flatten())
        if len(self.recent) >= self.PACKED:
            self.packed.append(torch.stack(self.recent))
            self.recent = []

    @property
    def probs(self):
        """(rows, classes) float32: every added row's probabilities."""
        return torch.cat(self.packed + ([torch.stack(self.recent)] if self.recent else []))

    def add(self, label, pred, probs):
        self.labels.append(label)
        self.preds.append(pred)
        self.argmax.append(int(probs.argmax()))
        self.keep_probs(probs)

    def __len__(self):
        return len(self.labels)

    def confusion(self, n, unknown_column):
        matrix = [[0] * (n + unknown_column) for _ in range(n)]
        for label, pred in zip(self.labels, self.preds):
            matrix[label][pred if pred != UNKNOWN else n] += 1
        return matrix

    def confidence_correct(self):
        """The best class's probability and whether it is the label, per row."""
        return self.probs.max(1).values, torch.tensor(self.argmax) == torch.tensor(self.labels)

    def summary(self, class_names, threshold, rejecting, calibration):
        """(lines to print, per-class report): accuracy over the labelled rows; when rows can be rejected
        (--threshold, --reject_ood), of the rows as written (a row predicted as unknown is not right), on the
        accepted rows with the share accepted, and of the best class regardless; the mean confidence and ECE."""
        n = len(self)
        if rejecting:  # what the rows say: an 'unknown' row is not a right answer
            accepted = [(p, y) for p, y in zip(self.preds, self.labels) if p != UNKNOWN]
            right = sum(p == y for p, y in accepted)
            best = sum(a == y for a, y in zip(self.argmax, self.labels))
            lines = [
                f"accuracy {right / n:.4f} ({right}/{n} labelled images; the {n - len(accepted)} predicted as "
                f"unknown count as wrong)",
                f"accuracy on accepted rows {right / max(len(accepted), 1):.4f} ({right}/{len(accepted)}; "
                f"{len(accepted) / n:.1%} of the labelled images accepted); the best class of every row: "
                f"{best / n:.4f}",
            ]
        else:
            correct = sum(a == y for a, y in zip(self.argmax, self.labels))
            lines = [f"accuracy {correct / n:.4f} ({correct}/{n} labelled images)"]
        confidence, correct = self.confidence_correct()
        lines.append(
            f"mean confidence {float(confidence.mean()):.4f}, ECE {metrics.ece(confidence, correct):.4f} "
            f"({N_BINS} bins; temperature {calibration.temperature:.3f} from the model)"
        )
        return lines, self.task.report(torch.tensor(self.labels), torch.tensor(self.preds), self.probs, class_names)


class SetTally(Tally):
    """A multi-label model's labelled rows: multi-hot labels and decisions (a rejected row decides no class)."""

    def add(self, label, pred, probs):
        self.labels.append(label)
        self.preds.append(tuple(0 for _ in label) if pred == UNKNOWN else pred)
        self.keep_probs(probs)

    def confidence_correct(self):
        return self.probs.flatten(), torch.tensor(self.labels).flatten().bool()

    def summary(self, class_names, threshold, rejecting, calibration):
        """(lines to print, per-class report): mAP, exact match, micro/macro F1, and the ECE of the per-class
        probabilities."""
        report, summary = self.task.set_report(
            torch.tensor(self.labels), torch.tensor(self.preds), self.probs, class_names
        )
        confidence, correct = self.confidence_correct()
        return [
            f"{describe_set_summary(summary)} (labelled; per-class thresholds "
            + (f"replaced by --threshold {threshold:g}" if threshold is not None else "from the checkpoint")
            + f"); ECE of the per-class probabilities {metrics.ece(confidence, correct):.4f}"
        ], report


def describe_set_summary(summary):
    return (
        f"mAP {summary['mAP']:.4f}, exact match {summary['exact_match']:.4f}, micro F1 "
        f"{summary['micro_f1']:.4f}, macro F1 {summary['macro_f1']:.4f} on {summary['count']} images"
    )
