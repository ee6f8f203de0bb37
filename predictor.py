"""What predict.py and serve.py both run, so that the page, the API and result.csv answer alike: a model file loaded
once (a .pth checkpoint of train.py, or an .onnx export that onnxruntime runs) with its task, calibration,
preprocessing and out-of-distribution reference, made ready on its device; a batch of images turned into its
outputs (calibrated probabilities, the decisions, ood_score, Grad-CAM maps) and each image's row, with the columns
result.csv has."""

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

import data_loader
import explain
import exported_model
import model_loader
import ood
import tasks
from calibration import UNKNOWN, with_flips
from cli import CLIError
from features import capture_head_input, feature_dim, pooled
from utils import Compute, amp_dtype_for, resolve_device

MAX_PROB_COLUMNS = 20  # above this many classes, top-k columns replace the per-class probabilities


@dataclass(frozen=True)
class Reading:
    """The settings that change a row (the scripts build it from their flags)."""

    threshold: float = None  # in (0, 1]: rows below this calibrated confidence are unknown_label (None: never)
    unknown_label: str = "unknown"  # the prediction of a rejected row (and of a multi-label row deciding no class)
    tta: bool = False  # average each image's probabilities with its mirror image's
    reject_ood: bool = False  # rows unlike the training images are unknown_label
    topk: int = None  # the k best classes per row (None: 5 above MAX_PROB_COLUMNS classes, else none)

    def __post_init__(self):
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise CLIError(f"--threshold must be in (0, 1]; got {self.threshold}")
        if self.topk is not None and self.topk <= 0:
            raise CLIError(f"--topk must be positive; got {self.topk}")


def load_model(model_fn, explain_maps=False):
    """(checkpoint, or an export's metadata read as one; the model; the classifier layer's name, None for ONNX):
    one error line for anything else. explain_maps: Grad-CAM will be asked for, which needs the checkpoint."""
    head = None
    if Path(model_fn).suffix.lower() == ".pt2":
        raise CLIError(
            f"{model_fn} is a torch.export program (load it with torch.export.load); predict.py runs the "
            "checkpoint it came from, or an .onnx export"
        )
    if exported_model.is_exported(model_fn):  # an ONNX file of export.py: onnxruntime runs it
        if explain_maps:
            raise CLIError(
                f"--explain needs the checkpoint (.pth) {model_fn} was exported from: heat maps take "
                "gradients, which an ONNX model does not give"
            )
        ckpt, model = exported_model.load_exported(model_fn)
    else:
        ckpt = model_loader.load_checkpoint(model_fn)
        model, head = model_loader.model_from_checkpoint(ckpt, model_fn)
        if "ood" in ckpt:
            ood.check_reference(ckpt["ood"], feature_dim(model, head), len(ckpt["class_names"]), model_fn)
    return ckpt, model, head


def prepare_model(
    ckpt, model, head, model_fn, device, amp=False, explain_maps=False, dist=None, progress=False, log=print
):
    """(the model ready to run, its Compute, the Grad-CAM of explain_maps or None): on `device`, optimized for
    inference, with the ood_score output when the checkpoint has a reference. An ONNX model's batches stay on the
    CPU (onnxruntime optimizes its graph itself)."""
    cam = None
    if isinstance(model, exported_model.OnnxModel):
        model, device, channels_last = model.to(device), torch.device("cpu"), False
    else:
        channels_last = model_loader.is_convolutional(model)
        model = model_loader.optimize_for_inference(model.to(device), channels_last, keep_modules=explain_maps)
        if explain_maps:  # gradients from the hooked layer up only: none for the weights
            cam = explain.GradCAM(*explain.target_layer(model.requires_grad_(False), head, ckpt["input_size"], device))
        if ckpt.get("ood") is not None:  # a second output: the ood_score, computed from the classifier's input
            model = ood.scored_model(model, head, ckpt, model_fn).to(device)
    compute = Compute(device, amp_dtype_for(device, amp, log), channels_last, dist=dist, progress=progress)
    return model, compute, cam


@dataclass
class Outputs:
    """A batch's outputs, on the CPU: calibrated probabilities (N, classes), the task's decision per row (UNKNOWN
    when rejected), ood_score (N,) or None, unlike the training images per row (True / False / None: no
    threshold), Grad-CAM maps (N, h, w) or None."""

    probs: torch.Tensor
    decisions: list
    scores: torch.Tensor
    unlike: list
    maps: torch.Tensor = None
    features: torch.Tensor = None  # (N, D) float32: the classifier's input, when the Predictor keeps it

    def score(self, i):
        """(ood_score, unlike) of row i, or None without a reference."""
        return None if self.scores is None else (float(self.scores[i]), self.unlike[i])


class Predictor:
    """A loaded model with everything that reads its outputs: what predict.py writes a row of, and serve.py answers."""

    def __init__(self, ckpt, model, compute, reading=Reading(), cam=None):
        self.ckpt, self.model, self.compute, self.reading, self.cam = ckpt, model, compute, reading, cam
        self.class_names = ckpt["class_names"]
        self.task = tasks.for_checkpoint(ckpt)  # one label per image, or a set
        self.calibration = self.task.calibration_of(ckpt)  # the temperature(s) and thresholds fitted in training
        self.reference = ckpt.get("ood")  # the out-of-distribution reference (method, threshold)
        self.ood_threshold = self.reference.get("threshold") if self.reference else None
        self.preprocess = data_loader.Preprocess.of(ckpt)
        self.views = 2 if reading.tta else 1  # the image, and its mirror image with --tta
        many = len(self.class_names) > MAX_PROB_COLUMNS
        self.topk = min(reading.topk or (5 if many else 0), len(self.class_names))
        self.feature_layer = None  # keep_features: (the model, the classifier layer's name) whose input to keep
        self.check()

    @classmethod
    def load(
        cls,
        model_fn,
        reading=Reading(),
        gpu_id=None,
        amp=False,
        explain_maps=False,
        dist=None,
        progress=False,
        log=print,
    ):
        """The model file loaded and made ready (load_model, prepare_model) on --gpu_id's device."""
        ckpt, model, head = load_model(model_fn, explain_maps)
        device = resolve_device(gpu_id, dist.local_rank if dist is not None else None)
        model, compute, cam = prepare_model(ckpt, model, head, model_fn, device, amp, explain_maps, dist, progress, log)
        return cls(ckpt, model, compute, reading, cam)

    def check(self):
        """One error line for settings this model cannot follow."""
        reading = self.reading
        if reading.reject_ood and self.reference is None:
            raise CLIError(
                "--reject_ood: the model has no out-of-distribution reference (train.py writes one unless "
                "--ood_method none)"
            )
        if (self.rejecting or self.task.empty_label_allowed) and reading.unknown_label in self.class_names:
            raise CLIError(f"--unknown_label {reading.unknown_label!r} is one of the classes; choose another word")

    def keep_features(self, head):
        """From now on, Outputs carry each image's penultimate features (the classifier layer's input, which the
        ood_score reads too). head: the classifier layer's name; None (an ONNX model): one error line."""
        if head is None:
            raise CLIError(
                "--embeddings, --similar_to and --rank_for_labelling need the checkpoint (.pth): the ONNX file "
                "gives the logits and ood_score only"
            )
        self.feature_layer = (self.model.model if isinstance(self.model, ood.ScoredModel) else self.model, head)

    def features_of(self, image):
        """(D,) float32: the penultimate features of one RGB image (keep_features first), preprocessed as the rows."""
        with torch.inference_mode():
            return self.outputs(self.preprocess.transform()(image)[None]).features[0]

    def uncertainty(self, probs):
        """(N,) in [0, 1] of calibrated probabilities: how undecided each row is (the calibration's measure, with
        --threshold's value for a multi-label model's classes when given)."""
        threshold = self.reading.threshold if self.task.multi_label else None
        return self.calibration.uncertainty(probs, threshold)

    @property
    def rejecting(self):
        """Whether rows may be predicted as unknown_label (--threshold, --reject_ood)."""
        return self.reading.threshold is not None or self.reading.reject_ood

    def columns(self, labelled, explained=False):
        """result.csv's columns."""
        columns = ["file_dir"] + self.task.answer_columns()
        if len(self.class_names) <= MAX_PROB_COLUMNS or self.task.all_probabilities():
            columns += [f"prob_{c}" for c in self.class_names]
        columns += [f"top{i + 1}_{kind}" for i in range(self.topk) for kind in ("class", "prob")]
        columns += ["ood_score", "in_distribution"] if self.reference is not None else []
        columns += ["heatmap"] if explained else []
        return columns + (["label"] if labelled else []) + ["error"]

    def outputs(self, images, maps=False):
        """The Outputs of a batch of preprocessed images (maps: Grad-CAM of the best class, which needs the cam)."""
        compute, reading = self.compute, self.reading
        images = compute.to_device(images)
        tap = capture_head_input(*self.feature_layer) if self.feature_layer else nullcontext(None)
        with compute.autocast(), tap as taken:
            views_in = with_flips(images) if reading.tta else images
            out = self.cam.forward(self.model, views_in) if maps else self.model(views_in)
        logits, scores = out if isinstance(out, tuple) else (out, None)
        probs = self.calibration.probabilities(logits.detach(), self.views).cpu()
        heat = self.cam.maps(logits, probs.argmax(1)).cpu() if maps else None
        decisions = self.task.decisions(self.calibration.decide(probs, reading.threshold))
        unlike = [None] * len(probs)  # per row: True = out of distribution, None = not known
        if scores is not None:
            scores = scores[: len(probs)].detach().float().cpu()  # with --tta: the image's own view
            if self.ood_threshold is not None:
                unlike = (scores > self.ood_threshold).tolist()
                if reading.reject_ood:
                    decisions = [UNKNOWN if u else d for d, u in zip(decisions, unlike)]
        features = None if taken is None else pooled(taken[-1][: len(probs)]).detach().float().cpu()
        return Outputs(probs, decisions, scores, unlike, heat, features)

    def row(self, sample, probs, decision, score=None, labelled=False):
        """An image's cells in columns() order (the heatmap cell left out): (path, label) sample, its probabilities,
        the task's decision; score: (ood_score, unlike) or None without a reference."""
        path, label = sample
        task, names = self.task, self.class_names
        row = [path] + task.answer(decision, probs, names, self.reading.unknown_label)
        if len(names) <= MAX_PROB_COLUMNS or task.all_probabilities():
            row += [f"{float(p):.6f}" for p in probs]
        if self.topk:
            values, indices = probs.topk(self.topk)
            for v, i in zip(values.tolist(), indices.tolist()):
                row += [names[i], f"{v:.6f}"]
        if score is not None:
            value, unlike = score
            row += [f"{value:.6f}", "" if unlike is None else str(int(not unlike))]
        if labelled:
            row.append(task.text(label, names))
        return row + [""]

    def error_row(self, sample, reason, columns, labelled):
        """An unreadable image: its path, its label when known, the reason; the prediction columns empty."""
        path, label = sample
        row = dict.fromkeys(columns, "")
        row.update(file_dir=path, error=reason)
        if labelled:
            row["label"] = self.task.text(label, self.class_names)
        return list(row.values())
