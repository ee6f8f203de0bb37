"""The label mode, decided once: one class per image (SingleLabel: softmax, cross-entropy, one temperature,
the top class) or any set of classes per image (MultiLabel: train.py --labels_csv FILE --multi_label).

Multi-label: the CSV's label column holds every class an image shows, separated by --label_delim (default a
space); an empty label is an image showing none of them. A sample's label is then a multi-hot tuple (1 where
the class is present), and a batch's labels a float (N, classes) matrix. The model gives one logit per class,
read as an independent sigmoid probability and trained with BCEWithLogitsLoss. After training each class gets
its own temperature (the BCE-minimising T of its column on the validation images) and its own decision
threshold (the one maximising that class's F1 on the validation images, on the calibrated probabilities); both
go into the checkpoint. A prediction is every class whose calibrated probability reaches its threshold.

train.py, predict.py and export.py choose the task (for_run, for_checkpoint); every other module receives it
and asks it, instead of telling the modes apart by a flag, a checkpoint key or a tensor's shape.

Over 600 lines, as one concern that does not split: the rules of the two label modes, which answer the same
questions method for method (MultiLabel overrides each of SingleLabel's), so that a change to one rule is made
for both modes in one place. What reads a model's outputs after training (the calibrations) and what
predict.py tallies are calibration.py's."""

import json
import math
from collections import Counter

import torch
from torch import nn

import metrics
from calibration import UNKNOWN, Calibration, SetCalibration, SetTally, Tally, decide_sets

DEFAULT_DELIM = " "
TITLE_CLASSES = 3  # a multi-label title names this many classes at most (the most probable first), then "+N more"


def split_labels(text, delim=DEFAULT_DELIM):
    """The distinct class names of one label cell, sorted ('dog cat' -> ['cat', 'dog']); '' -> []."""
    parts = text.split() if not delim.strip() else text.split(delim)
    return sorted({p.strip() for p in parts if p.strip()})


def looks_multi(names, known):
    """True when some label of `names` splits (on spaces, |, commas or semicolons) into several names of `known`:
    a cell listing several classes, read as one."""
    known = set(known)
    for name in names:
        for sep in (None, "|", ",", ";"):
            parts = [p.strip() for p in name.split(sep) if p.strip()]
            if len(parts) > 1 and sum(p in known for p in parts) >= 2:
                return True
    return False


def inverse_frequency(counts):
    """total / (classes x count) per class; 0.0 for a class without images."""
    total, n = sum(counts), len(counts)
    return [total / (n * c) if c else 0.0 for c in counts]


def first_few(names, n=TITLE_CLASSES):
    """The first n of names joined by ', ', then '+k more' for the rest."""
    return ", ".join(names[:n] + ([f"+{len(names) - n} more"] if len(names) > n else []))


# ----------------------------------------------------------------------------- the two tasks


class SingleLabel:
    """One class per image: an index label, softmax over the classes, cross-entropy."""

    multi_label = False
    delim = None
    decision_name = "top-1"  # what export.py's check counts as agreeing
    loss_name = "NLL"
    confusion_matrix = True  # predict.py draws one beside its figure
    explained_class = "predicted"  # the class predict.py --explain maps
    empty_label_allowed = False  # an empty label cell is an error
    unknown_hint = " (several classes per cell? this model has one label per image)"

    # -- labels
    def check_format(self, class_names, samples, where, warn):
        """One warning when the labels look read the wrong way: names made of several class names ('bag
        sneaker' beside 'bag')."""
        if looks_multi(class_names, class_names):
            warn(
                f"warning: {where}: labels such as "
                f"{next(n for n in class_names if looks_multi([n], class_names))!r} look like several classes in "
                "one cell; for several labels per image add --multi_label (and --label_delim if they are not "
                "separated by spaces); if it is one class, ignore this"
            )

    def parse(self, cell):
        """A label cell's class name (the CSV reader refuses an empty one)."""
        return cell

    def names(self, label):
        """The class names a parsed label uses."""
        return (label,)

    def encode(self, pairs, class_names):
        """[(path, class index)] ordered by class, then path (as a folder scan orders them)."""
        index = {c: i for i, c in enumerate(class_names)}
        return sorted(((f, index[label]) for f, label in pairs), key=lambda s: (s[1], s[0]))

    def folder_labels(self, class_names):
        """{folder name: label} of input images in folders named after a class (others: -1, unknown)."""
        return {c: i for i, c in enumerate(class_names)}

    def text(self, label, class_names, delim=None):
        """A sample's label as text ('' for an unknown label)."""
        return class_names[label] if label >= 0 else ""

    def restore(self, label):
        """A label as a checkpoint stored it."""
        return label

    def tensor(self, labels):
        """Class indices as a long (N,) tensor."""
        return torch.tensor(list(labels), dtype=torch.long)

    def counts(self, samples, n_classes):
        """Images per class."""
        counts = Counter(y for _, y in samples)
        return [counts.get(i, 0) for i in range(n_classes)]

    def loss_weights(self, samples, n_classes):
        """--class_weights auto (and --balanced_sampler's draw): inverse class frequency."""
        return inverse_frequency(self.counts(samples, n_classes))

    def strata(self, labels):
        """What the seeded validation split keeps in proportion: the classes."""
        return list(labels)

    def checkpoint_entries(self):
        return {}

    def export_metadata(self, ckpt):
        """What an export carries besides the temperature (strings): nothing for one label per image."""
        return {}

    def entries_from_metadata(self, meta):
        """The checkpoint keys an export's metadata gives back (exported_model.checkpoint_from_metadata)."""
        return {}

    # -- training
    def criterion(self, weights=None, label_smoothing=0.0):
        """Cross-entropy with optional class weights and label smoothing."""
        weights = None if weights is None else torch.tensor(weights, dtype=torch.float32)
        return nn.CrossEntropyLoss(weight=weights, label_smoothing=label_smoothing)

    def eval_loss(self, logits, labels):
        """Plain cross-entropy (no weights or smoothing), so validation losses compare across runs."""
        return nn.functional.cross_entropy(logits, labels)

    def correct(self, logits, labels):
        return float((logits.argmax(1) == labels).sum())

    def keeps_logits(self):
        """Whether an evaluation keeps its logits for a ranking metric (the mAP)."""
        return False

    def epoch_extras(self, kept):
        return {}

    def metrics(self, logits, labels):
        """Loss, accuracy and count from collected logits."""
        if not len(labels):
            return {"loss": 0.0, "accuracy": 0.0, "count": 0}
        return {
            "loss": metrics.nll(logits, labels),
            "accuracy": float((logits.argmax(1) == labels).double().mean()),
            "count": int(len(labels)),
        }

    # -- calibration
    def calibrate(self, logits, labels, class_names=None):
        """Temperature scaling on validation logits; None when there are none (the temperature stays 1.0).
        A temperature is kept only when it lowers the validation NLL; else it stays 1.0, with the reason.
        When the NLL has no minimum inside the searched range the temperature stays 1.0, with the reason:
        with every validation image predicted right, the NLL keeps falling as T -> 0, and the 'fitted' T
        would make every prediction certain (a test image that is wrong then gets confidence 1.0). A sharper T
        (below 1) is limited so that the mean validation confidence stays at most the accuracy one more right and one
        more wrong image would give (metrics.limit_sharpening): 12 validation images with one wrong gave T = 0.055
        and a confidence of 1.000 on every test image."""
        if not len(labels):
            return None
        temperature, unfitted = metrics.fit_temperature(logits, labels), ""
        lo, hi = (math.exp(x) for x in metrics.LOG_T_RANGE)
        if temperature < lo * 1.01:
            every = bool((logits.argmax(1) == labels).all())
            unfitted = (
                "every validation image is predicted right, so " if every else ""
            ) + f"the validation NLL still falls at T = {lo:g} and no temperature can be fitted"
        elif temperature > hi / 1.01:
            unfitted = "the validation NLL falls as T grows without end (the model is no better than chance there)"
        elif not metrics.nll(logits, labels, temperature) < metrics.nll(logits, labels):  # must not make it worse
            unfitted = (
                f"T = {temperature:.3f} would not lower the validation NLL (it gives "
                f"{metrics.nll(logits, labels, temperature):.4f})"
            )
        limited = None
        if not unfitted and temperature < 1:
            temperature, limited = metrics.limit_sharpening(logits, labels, temperature)
            if temperature == 1.0:
                unfitted = (
                    f"the mean validation confidence is above {limited[1]:.3f} (the accuracy of one more right and "
                    f"one more wrong image) at T = 1 already, so the NLL's minimum, T = {limited[0]:.3f}, is not kept"
                )
        if unfitted:
            temperature = 1.0
        before, after = Calibration(), Calibration(float(temperature))
        found = {
            "valid_nll_before": metrics.nll(logits, labels),
            "valid_nll_after": metrics.nll(logits, labels, temperature),
            "valid_ece_before": metrics.ece(*before.confidence_correct(logits, labels)),
            "valid_ece_after": metrics.ece(*after.confidence_correct(logits, labels)),
            "calibration_count": int(len(labels)),
        }
        if limited and not unfitted:
            found["sharpest_temperature"], found["confidence_limit"] = limited
        return Calibration(float(temperature), found, unfitted)

    def uncalibrated(self, n_classes):
        return Calibration()

    def calibration_of(self, ckpt):
        """The calibration a checkpoint (or an export's metadata) stores; older ones have none: T = 1."""
        return Calibration(float(ckpt.get("temperature", 1.0)))

    # -- reports
    def report(self, labels, preds, probs, class_names):
        """A pandas DataFrame in scikit-learn's layout: one row per class, then 'macro avg' (plain mean) and
        'weighted avg' (by support). preds may hold UNKNOWN (below --threshold): such rows count as wrong for
        recall and are left out of precision. roc_auc and average_precision are one-vs-rest from probs.
        A class never predicted has precision 0 (as scikit-learn's zero_division=0). The macro average is over the
        classes among the labels or the predictions (scikit-learn's default labels)."""
        import numpy as np
        import pandas as pd

        columns = metrics.REPORT_COLUMNS
        labels, preds = np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)
        probs = np.asarray(probs, dtype=np.float64).reshape(len(labels), len(class_names))
        rows = [
            metrics.report_row(
                name,
                int(((preds == c) & (labels == c)).sum()),
                int((preds == c).sum()),
                int((labels == c).sum()),
                probs[:, c],
                labels == c,
            )
            for c, name in enumerate(class_names)
        ]
        table = pd.DataFrame(rows, columns=columns)
        scores = columns[1:4] + columns[5:]
        total = int(table.support.sum())
        # over the classes present among the labels or the predictions, as scikit-learn's default: a class with
        # neither (predicting one folder) would count as 0 and halve an average whose every row is right
        present = table[(table.support > 0).to_numpy() | np.isin(np.arange(len(class_names)), preds)]
        macro = {"class": "macro avg", **present[scores].mean().to_dict(), "support": total}  # NaN (one-class) skipped
        weighted = {
            "class": "weighted avg",
            **{m: metrics.weighted_mean(table[m], table.support) for m in scores},
            "support": total,
        }
        return pd.concat([table, pd.DataFrame([macro, weighted], columns=columns)], ignore_index=True)

    def test_results(self, logits, labels, calibration, class_names):
        """(metrics, per-class report or None) of the test images' logits, with the calibration fitted on the
        validation images (None: uncalibrated)."""
        found = self.metrics(logits, labels)
        if not len(labels):
            return found, None
        calibration = calibration or self.uncalibrated(len(class_names))
        found.update(self.calibrated_figures(logits, labels, calibration))
        table, figures = self.test_report(labels, calibration.probabilities(logits), calibration, class_names)
        found.update(figures)
        return found, table

    def test_report(self, labels, probs, calibration, class_names):
        """(the test images' per-class report, the figures it adds to the test metrics): the top class decides."""
        return self.report(labels, probs.argmax(1), probs, class_names), {}

    def calibrated_figures(self, logits, labels, calibration):
        """ece of the raw logits, and loss_calibrated and ece_calibrated under the calibration."""
        raw = self.uncalibrated(logits.shape[1])
        return {
            "ece": metrics.ece(*raw.confidence_correct(logits, labels)),
            "ece_calibrated": metrics.ece(*calibration.confidence_correct(logits, labels)),
            "loss_calibrated": self.loss_under(logits, labels, calibration),
        }

    def loss_under(self, logits, labels, calibration):
        return metrics.nll(logits, labels, calibration.temperature)

    def describe_test(self, t):
        return f"test accuracy {t['accuracy']:.4f} on {t['count']} images (loss {t['loss']:.4f})"

    def describe_best(self, m):
        return f"accuracy {m['valid_accuracy']:.4f}"

    def tally(self):
        return Tally(self)

    # -- predictions as text
    def decisions(self, pred_tensor):
        """Per row: the class index (or UNKNOWN)."""
        return pred_tensor.tolist()

    def accepted(self, pred):
        return pred != UNKNOWN

    def answer_columns(self):
        return ["predict", "confidence"]

    def answer(self, pred, probs, class_names, unknown_label):
        """The predict and confidence cells of a row."""
        return [unknown_label if pred == UNKNOWN else class_names[pred], f"{float(probs.max()):.6f}"]

    def all_probabilities(self):
        """Whether every prob_ column is written, however many classes (a set's answer is every probability)."""
        return False

    def title(self, label, pred, probs, class_names, unknown_label):
        """(title, wrong) of a prediction in a figure: the class and its probability; the true class when the
        label says otherwise; 'unknown' (with the best class named) for a rejected row (wrong None)."""
        best, confidence = int(probs.argmax()), float(probs.max())
        truth = f"\ntrue: {class_names[label]}" if label >= 0 and label != best else ""
        if pred == UNKNOWN:
            return f"{unknown_label} ({class_names[best]} {confidence:.2f})" + truth, None
        return f"{class_names[pred]} ({confidence:.2f})" + truth, bool(truth)

    def grid_title(self, prob, label, class_names, calibration):
        """(title, right) of a validation image in TensorBoard's grid: the top class and its probability, and the
        true class when it is another."""
        p = int(prob.argmax())
        return f"{class_names[p]} {prob[p]:.2f}" + ("" if p == label else f"\ntrue: {class_names[label]}"), p == label

    def names_of_rows(self, labels, chosen, class_names):
        """Per row: (given, predicted) as text."""
        return [(class_names[y], class_names[p]) for y, p in zip(labels.tolist(), chosen.tolist())]

    def chosen(self, logits, calibration):
        """The decision of each row of logits (top class)."""
        return logits.argmax(1)


class MultiLabel(SingleLabel):
    """Any set of classes per image: a multi-hot tuple, one sigmoid per class, binary cross-entropy."""

    multi_label = True
    decision_name = "label-set"
    loss_name = "BCE"
    confusion_matrix = False  # sets of classes: the per-class report instead
    explained_class = "most probable"
    empty_label_allowed = True  # an image showing none of the classes
    unknown_hint = " (classes separated by another character than the training's?)"

    def __init__(self, delim=DEFAULT_DELIM):
        self.delim = delim

    # -- labels
    def check_format(self, class_names, samples, where, warn):
        """One warning when no train row has two classes: another separator?"""
        if samples and max(sum(y) for _, y in samples) < 2:
            shown = next((n for n in class_names if looks_multi([n], class_names) or any(s in n for s in " |,;")), None)
            warn(
                f"warning: {where}: no train row lists more than one class with --label_delim {self.delim!r}"
                + (f" (a class is named {shown!r}: another separator?)" if shown else "")
                + "; if each image shows at most one class, ignore this"
            )

    def parse(self, cell):
        return tuple(split_labels(cell, self.delim))

    def names(self, label):
        return label

    def encode(self, pairs, class_names):
        """[(path, multi-hot tuple)] ordered by the set (first classes first), then path."""
        hot = [(f, tuple(int(c in set(label)) for c in class_names)) for f, label in pairs]
        return sorted(hot, key=lambda s: (tuple(-v for v in s[1]), s[0]))

    def folder_labels(self, class_names):
        return {}  # a folder's name does not say which other classes an image shows

    def text(self, label, class_names, delim=None):
        if label == -1 or label == UNKNOWN:
            return ""
        return (delim or self.delim).join(name for name, on in zip(class_names, label) if on)

    def restore(self, label):
        return tuple(label) if isinstance(label, list) else label

    def tensor(self, labels):
        """Multi-hot tuples as a float (N, classes) matrix."""
        return torch.tensor(list(labels), dtype=torch.float32)

    def counts(self, samples, n_classes):
        """Images showing each class."""
        counts = [0] * n_classes
        for _, label in samples:
            for c, on in enumerate(label):
                counts[c] += on
        return counts

    def loss_weights(self, samples, n_classes):
        """--class_weights auto: BCEWithLogitsLoss's pos_weight per class, negatives / positives (1.0 when a class
        has no positive or no negative image)."""
        positives = self.counts(samples, n_classes)
        return [(len(samples) - p) / p if 0 < p < len(samples) else 1.0 for p in positives]

    def strata(self, labels):
        """The set of labels; sets of one image pooled."""
        labels = list(labels)
        sizes = Counter(labels)
        return [y if sizes[y] > 1 else () for y in labels]

    def checkpoint_entries(self):
        return {"multi_label": True}  # sigmoid per class; temperatures, thresholds per class

    def export_metadata(self, ckpt):
        """The outputs are read as sigmoid(logits / temperatures[c]) per class, and class c is predicted where that
        reaches thresholds[c] (multi_label "1"; JSON lists, one number per class)."""
        calibration = self.calibration_of(ckpt)
        return {
            "multi_label": "1",
            "temperatures": json.dumps([float(t) for t in calibration.temperatures]),
            "thresholds": json.dumps([float(t) for t in calibration.thresholds]),
        }

    def entries_from_metadata(self, meta):
        return {
            "multi_label": True,
            "temperatures": json.loads(meta["temperatures"]),
            "thresholds": json.loads(meta["thresholds"]),
        }

    # -- training
    def criterion(self, weights=None, label_smoothing=0.0):
        """BCEWithLogitsLoss with optional per-class positive weights."""
        weights = None if weights is None else torch.tensor(weights, dtype=torch.float32)
        return nn.BCEWithLogitsLoss(pos_weight=weights)

    def eval_loss(self, logits, labels):
        return nn.functional.binary_cross_entropy_with_logits(logits, labels)

    def correct(self, logits, labels):
        """Exact matches at probability 0.5."""
        return float(((logits > 0) == labels.bool()).all(1).sum())

    def keeps_logits(self):
        return True

    def epoch_extras(self, kept):
        """The mAP of the kept (logits, labels) pairs."""
        return {
            "map": metrics.mean_average_precision(
                torch.cat([p[0] for p in kept]).sigmoid(), torch.cat([p[1] for p in kept])
            )
        }

    def metrics(self, logits, labels):
        """BCE, the exact match at probability 0.5, and the mAP."""
        if not len(labels):
            return {"loss": 0.0, "accuracy": 0.0, "count": 0}
        return {
            "loss": metrics.bce(logits, labels),
            "accuracy": metrics.exact_match(logits > 0, labels),
            "count": int(len(labels)),
            "map": metrics.mean_average_precision(logits.float().sigmoid(), labels),
        }

    # -- calibration
    def calibrate(self, logits, labels, class_names=None):
        """Per-class temperatures and F1 thresholds of the best model from its validation logits; None when
        there are none."""
        if not len(labels):
            return None
        class_names = class_names or [str(c) for c in range(labels.shape[1])]
        temperatures, unfitted, no_better = [], [], []
        for c, name in enumerate(class_names):
            t = metrics.fit_temperature(logits[:, c], labels[:, c], loss=metrics.bce)
            if not metrics.temperature_in_range(t):  # no minimum inside the range (a perfectly separated column)
                t = 1.0
                unfitted.append(name)
            elif not metrics.bce(logits[:, c], labels[:, c], t) < metrics.bce(logits[:, c], labels[:, c]):
                t = 1.0  # it must not make it worse
                no_better.append(name)
            temperatures.append(float(t))
        fitted = SetCalibration(temperatures, [])
        probs = fitted.probabilities(logits)
        thresholds = [metrics.best_f1_threshold(probs[:, c], labels[:, c]) for c in range(labels.shape[1])]
        found = {
            "valid_bce_before": metrics.bce(logits, labels),
            "valid_bce_after": metrics.bce(logits / torch.tensor(temperatures), labels),
            "valid_map": metrics.mean_average_precision(probs, labels),
            "valid_exact_match_at_half": metrics.exact_match(logits > 0, labels),
            "valid_exact_match": metrics.exact_match(decide_sets(probs, thresholds), labels),
            "calibration_count": int(len(labels)),
        }
        positives = labels.bool().sum(0).tolist()
        always = {name: thresholds[c] for c, name in enumerate(class_names) if positives[c] == len(labels)}
        absent = [name for c, name in enumerate(class_names) if not positives[c]]
        return SetCalibration(temperatures, thresholds, found, unfitted, no_better, always, absent)

    def uncalibrated(self, n_classes):
        return SetCalibration([1.0] * n_classes, [metrics.DEFAULT_THRESHOLD] * n_classes)

    def calibration_of(self, ckpt):
        n = len(ckpt["class_names"])
        return SetCalibration(
            list(ckpt.get("temperatures") or [1.0] * n), list(ckpt.get("thresholds") or [metrics.DEFAULT_THRESHOLD] * n)
        )

    # -- reports
    def set_report(self, labels, preds, probs, class_names):
        """(table, summary): the per-class table (precision, recall, F1 of the decided sets, support = images
        showing the class, ROC AUC and average precision of the probabilities), then 'micro avg' (pooled over
        every (image, class) pair) and 'macro avg' (plain mean over classes; its average_precision is the mAP);
        summary holds mAP, exact-match accuracy, the micro and macro F1 and the image count."""
        import pandas as pd

        columns = metrics.REPORT_COLUMNS
        labels, preds, probs = labels.bool(), preds.bool(), probs.double()

        def row(name, y, p, scores):  # y, p: present, predicted (any shape); scores: the probabilities
            return metrics.report_row(
                name, int((y & p).sum()), int(p.sum()), int(y.sum()), scores.flatten().tolist(), y.flatten().tolist()
            )

        table = pd.DataFrame(
            [row(name, labels[:, c], preds[:, c], probs[:, c]) for c, name in enumerate(class_names)], columns=columns
        )
        micro = row("micro avg", labels, preds, probs)
        scores = columns[1:4] + columns[5:]
        macro = {"class": "macro avg", **table[scores].mean().to_dict(), "support": int(labels.sum())}
        table = pd.concat([table, pd.DataFrame([micro, macro], columns=columns)], ignore_index=True)
        summary = {
            "mAP": float(macro["average_precision"]),
            "exact_match": metrics.exact_match(preds, labels),
            "micro_f1": float(micro["f1"]),
            "macro_f1": float(macro["f1"]),
            "count": int(len(labels)),
        }
        return table, summary

    def report(self, labels, preds, probs, class_names):
        return self.set_report(labels, preds, probs, class_names)[0]

    def test_report(self, labels, probs, calibration, class_names):
        """The calibration's thresholds decide the sets; accuracy becomes their exact match, and map, micro_f1
        and macro_f1 are added."""
        table, summary = self.set_report(labels, calibration.decide(probs), probs, class_names)
        return table, {
            "accuracy": summary["exact_match"],
            "map": summary["mAP"],
            "micro_f1": summary["micro_f1"],
            "macro_f1": summary["macro_f1"],
        }

    def loss_under(self, logits, labels, calibration):
        return metrics.bce(logits / torch.tensor(calibration.temperatures), labels)

    def describe_test(self, t):
        return (
            f"test mAP {t['map']:.4f}, exact match {t['accuracy']:.4f}, micro F1 {t['micro_f1']:.4f} on "
            f"{t['count']} images (loss {t['loss']:.4f})"
        )

    def describe_best(self, m):
        return f"mAP {m['valid_map']:.4f}, exact match (at 0.5) {m['valid_accuracy']:.4f}"

    def tally(self):
        return SetTally(self)

    # -- predictions as text
    def decisions(self, pred_tensor):
        """Per row: the multi-hot tuple of the classes decided."""
        return [tuple(row) for row in pred_tensor.int().tolist()]

    def accepted(self, pred):
        return pred != UNKNOWN and any(pred)

    def answer_columns(self):
        return ["predict"]

    def answer(self, pred, probs, class_names, unknown_label):
        """The classes joined by the training's delimiter (unknown_label for none); no confidence column."""
        return [(self.text(pred, class_names) if pred != UNKNOWN else "") or unknown_label]

    def all_probabilities(self):
        return True

    def title(self, label, pred, probs, class_names, unknown_label):
        """The decided classes, most probable first, the first TITLE_CLASSES of them and '+N more' (and so the
        true set), so a title fits its cell."""
        best, confidence = int(probs.argmax()), float(probs.max())
        on = (
            sorted((c for c, yes in enumerate(pred) if yes), key=lambda c: -float(probs[c]))
            if isinstance(pred, tuple)
            else []
        )
        chosen = first_few([f"{class_names[c]} ({probs[c]:.2f})" for c in on])
        given = isinstance(label, tuple) and pred != label
        truth = f"\ntrue: {first_few([n for n, yes in zip(class_names, label) if yes]) or 'none'}" if given else ""
        if not chosen:
            return f"{unknown_label} ({class_names[best]} {confidence:.2f})" + truth, None
        return chosen + truth, bool(truth)

    def grid_title(self, prob, label, class_names, calibration):
        """The predicted set with each class's probability ('none' for no class), and the true set when it is
        another."""
        chosen = tuple(int(v) for v in calibration.decide(prob))
        title, right = (
            ", ".join(f"{class_names[c]} {prob[c]:.2f}" for c in range(len(prob)) if chosen[c]),
            chosen == label,
        )
        return (title or "none") + ("" if right else f"\ntrue: {self.text(label, class_names, ', ') or 'none'}"), right

    def names_of_rows(self, labels, chosen, class_names):
        """Per row: (given, predicted) sets, space-joined ('(none)' for no class), as label_issues.csv writes."""
        return [
            (
                self.text(tuple(y.int().tolist()), class_names, " ") or "(none)",
                self.text(tuple(p.int().tolist()), class_names, " ") or "(none)",
            )
            for y, p in zip(labels, chosen)
        ]

    def chosen(self, logits, calibration):
        return calibration.decide(calibration.probabilities(logits)) if calibration else logits > 0


def for_run(multi_label, delim=DEFAULT_DELIM):
    """The task train.py's flags ask for."""
    return MultiLabel(delim or DEFAULT_DELIM) if multi_label else SingleLabel()


def for_metadata(meta):
    """The task of an export's metadata (strings; see MultiLabel.export_metadata)."""
    return MultiLabel() if meta.get("multi_label") == "1" else SingleLabel()


def for_checkpoint(ckpt):
    """The task a checkpoint (or an export's metadata, read back as one) was trained for; its `multi_label`
    key, and its training flag --label_delim."""
    if not ckpt.get("multi_label"):
        return SingleLabel()
    return MultiLabel(ckpt.get("args", {}).get("label_delim") or DEFAULT_DELIM)
