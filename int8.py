"""The int8 build of export.py --int8 and its gate: onnxruntime's static quantization of the fp32 ONNX export (QDQ
format; per-channel weights, since per-tensor scales are what breaks the depthwise convolutions of MobileNets and
EfficientNets; unsigned 8-bit activations, signed weights, as x86's VNNI instructions take them, or 7 bits of
range on x86 CPUs without VNNI, where 8-bit ones can saturate: see saturates), calibrated on the
model's own training images through its eval transform, then held against the fp32 export on labelled held-out
images before anything is written: accuracy of both, top-1 agreement, the largest probability difference and the
speed-up at batch 1 and 32. The backbone is quantized; the classifier layer (a Gemm or MatMul) and the
out-of-distribution score's graph, which read the backbone's features, stay in fp32 (on EfficientNet-Lite0,
quantizing the convolutions alone agreed with fp32 on 96.7% of the sample's test images, the whole backbone on 100%:
docs/export.md); the score's threshold, and for knn its reference, are refitted to the int8 features (fit_ood) and
its flag is gated too."""

import contextlib
import functools
import io
import json
import platform
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import data_loader
import exported_model
import labels_csv
import tasks
from cli import CLIError

METHODS = ("minmax", "percentile", "entropy")  # calibration methods tried in this order by "auto"
# percentile and entropy keep histograms of every activation: on EfficientNet-Lite0 at 224 px 64 images took 6 GB,
# 300 took 22 GB (with onnxruntime's chunking asked for); they calibrate on the first 64 (drawn over all classes)
HISTOGRAM_IMAGES = 64
BATCH = 16  # calibration images per batch


def calibration_count(method, n):
    """How many of n calibration images the method uses."""
    if method == "minmax":
        return n
    n = min(n, HISTOGRAM_IMAGES)
    return n - n % BATCH if n >= BATCH else n  # equal batches: the histogram calibrators stack them


KEPT_FP32 = "the classifier layer and the out-of-distribution score"  # said in the output


@dataclass
class Figures:
    """The gate's figures, kept in the int8 file's metadata (key "int8", JSON)."""

    calibration: str  # the method kept
    calibration_images: int
    gate_images: int
    labelled: bool  # False: only the agreement was gated
    accuracy_fp32: float
    accuracy_int8: float
    agreement: float  # share of images whose decision (top-1, or the multi-label set) is the same
    max_prob_diff: float
    speedup_batch1: float = float("nan")
    speedup_batch32: float = float("nan")
    fp32_mb: float = float("nan")
    int8_mb: float = float("nan")
    weights: str = "s8"  # "s8": signed 8-bit; "s7": 7 bits of range (weight_format); files built before it: s8
    built_saturating: bool | None = None  # saturates() where it was built (the gate measured that); None: not known
    qat_epochs: int = 0  # export.py --qat: epochs of quantization-aware training before the build
    # the out-of-distribution flag (in_distribution) on the gate images, when the model has a threshold:
    ood_agreement: float | None = None  # share of images whose flag is the same as the fp32 export's
    ood_flagged_fp32: int | None = None  # images flagged unlike the training images by fp32, and by int8
    ood_flagged_int8: int | None = None
    ood_flagged_both: int | None = None  # images flagged by both
    ood_refit: str = ""  # "": fp32's reference and threshold; "threshold" or "reference" (fit_ood)
    ood_reference_images: int | None = None  # "reference": the training images its rows come from
    ood_threshold: float | None = None  # the int8 file's threshold

    @classmethod
    def from_metadata(cls, figures):
        """The Figures an int8 file's metadata holds (its "int8" entry, read back as a dict)."""
        return cls(**{k: v for k, v in figures.items() if k in cls.__dataclass_fields__})

    @property
    def drop(self):
        """Accuracy points lost (0 without labels)."""
        return 100 * (self.accuracy_fp32 - self.accuracy_int8) if self.labelled else 0.0

    def trained_words(self):
        epochs = self.qat_epochs
        return f", after {epochs} epoch{'s' * (epochs != 1)} of quantization-aware training" if epochs else ""

    def ood_words(self):
        if self.ood_agreement is None:
            return ""
        refit = {
            "threshold": "; threshold refitted",
            "reference": f"; reference rebuilt from int8 features of {self.ood_reference_images} training images",
        }.get(self.ood_refit, "")
        return (
            f"; out-of-distribution flag agreement {self.ood_agreement:.2%} (flagged: fp32 {self.ood_flagged_fp32}, "
            f"int8 {self.ood_flagged_int8}, both {self.ood_flagged_both}{refit})"
        )

    def line(self):
        accuracy = (
            f"accuracy fp32 {self.accuracy_fp32:.4f}, int8 {self.accuracy_int8:.4f} ({self.drop:+.2f} points lost), "
            if self.labelled
            else "no labelled images: accuracy not measured, "
        )
        return (
            f"int8 ({self.calibration} calibration on {self.calibration_images} training images, "
            f"{WEIGHT_WORDS.get(self.weights, self.weights)} weights{self.trained_words()}; held against fp32 "
            f"on {self.gate_images} images): {accuracy}top-1 agreement {self.agreement:.2%}, largest probability "
            f"difference {self.max_prob_diff:.3f}{self.ood_words()}; speed-up {self.speedup_batch1:.2f}x at batch 1, "
            f"{self.speedup_batch32:.2f}x at batch 32; {self.int8_mb:.1f} MB against {self.fp32_mb:.1f} MB"
        )


WEIGHT_WORDS = {"s8": "8-bit", "s7": "7-bit"}
QMAX = {"s8": 127, "s7": 64}  # the weights' range, -QMAX..QMAX (onnxruntime's symmetric int8, reduce_range for s7)
VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}  # x86 instructions that add int8 products in 32 bits
X86 = ("x86_64", "amd64", "i386", "i686", "x86")


@functools.cache
def cpu_flags(path="/proc/cpuinfo"):
    """This CPU's feature flags as /proc/cpuinfo lists them (its 'flags' line on x86, 'Features' on ARM); None
    where the file cannot be read (Windows, macOS)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return frozenset(line.partition(":")[2].split())


def saturates(machine=None, flags=None):
    """Whether onnxruntime's int8 convolutions can saturate on this CPU: True on an x86 one without VNNI, whose AVX2
    and AVX-512 path adds pairs of uint8 x int8 products in 16 bits (onnxruntime's documentation advises 7-bit
    weights there); False on other CPUs and x86 ones with VNNI; None on x86 when the flags cannot be read. Measured
    on an AVX2-only EPYC, EfficientNet-Lite0 on Fashion tops: 8-bit weights agreed with fp32 on 85.9% of the images,
    7-bit ones on 94.4% (docs/export.md)."""
    if (machine or platform.machine()).lower() not in X86:
        return False
    flags = cpu_flags() if flags is None else flags
    return None if flags is None else not (flags & VNNI_FLAGS)


def weight_format(asked="auto"):
    """The weights the int8 build uses (--int8_weights): `asked` itself, or for "auto" this machine's: 8-bit where
    the int8 kernels add in 32 bits, 7 bits of range where they can saturate or it cannot be told (saturates)."""
    if asked != "auto":
        return asked
    return "s8" if saturates() is False else "s7"


def cpu_warning(figures, device_type="cpu"):
    """A warning line when a file with 8-bit weights runs on a CPU where they saturate and its figures were not
    measured on such a CPU, else ""."""
    if device_type != "cpu" or figures.weights != "s8" or not saturates() or figures.built_saturating:
        return ""
    return (
        "warning: this int8 file has 8-bit weights, and this CPU has no VNNI: onnxruntime's int8 kernels can "
        "saturate here, so its answers may agree with fp32 less than its gate measured (EfficientNet-Lite0 on "
        "Fashion tops: 98.1% with VNNI, 85.9% without); export.py --int8 --int8_weights s7 builds for such CPUs, "
        "and the fp32 .onnx is the safe choice"
    )


def warning_for(ckpt, device_type):
    """cpu_warning of a loaded model: "" unless it is an export.py --int8 build (its "int8" metadata)."""
    return cpu_warning(Figures.from_metadata(ckpt["int8"]), device_type) if "int8" in ckpt else ""


def training_files(ckpt, n, seed=0):
    """Up to n of the model's own training images, drawn over all its classes in turn (seeded); a CLIError when the
    training data cannot be found from here."""
    saved = ckpt.get("args", {})
    task = tasks.for_checkpoint(ckpt)
    try:
        if saved.get("labels_csv"):
            parts = labels_csv.read_labels(saved["labels_csv"], saved.get("image_root"), lambda *a: None, task)
            samples = parts.get("train") or parts.get(None) or []
        else:
            root = data_loader.dataset_root(saved.get("data_dir"), saved.get("dataset_name"))
            train = root / "train" if (root / "train").is_dir() else root
            _, samples = data_loader.scan_class_folders(train)
    except CLIError as e:
        raise CLIError(
            f"--int8 calibrates on the model's training images, which cannot be read from here ({e}); "
            "give them with --calibration_dir DIR"
        ) from None
    return spread(samples, n, seed, key=lambda s: str(s[1]))


def spread(samples, n, seed, key):
    """n samples taken in turn from each group (key), each group shuffled (seeded)."""
    groups = {}
    for s in samples:
        groups.setdefault(key(s), []).append(s)
    rng = random.Random(seed)
    queues = [rng.sample(g, len(g)) for _, g in sorted(groups.items())]
    out = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop())
    return [f for f, _ in out]


def load_batch(files, preprocess, limit=None):
    """(N, 3, H, W) float32 of the files through the eval transform; unreadable ones left out."""
    tf, images = preprocess.transform(), []
    for f in files[:limit]:
        try:
            images.append(tf(data_loader.load_rgb(f, preprocess.draft_side())))
        except Exception:  # noqa: BLE001 - an unreadable file: the others calibrate
            continue
    if not images:
        raise CLIError("none of the calibration images could be read")
    return torch.stack(images)


class CalibrationReader:
    """onnxruntime's CalibrationDataReader over preprocessed images, `batch` at a time."""

    def __init__(self, images, batch=BATCH):
        self.batches = [images[i : i + batch].numpy() for i in range(0, len(images), batch)]
        self.index = 0

    def get_next(self):
        if self.index >= len(self.batches):
            return None
        self.index += 1
        return {"input": self.batches[self.index - 1]}

    def rewind(self):
        self.index = 0


def quantize(fp32_path, out_path, images, method, weights="s8"):
    """The int8 QDQ model of fp32_path at out_path, calibrated on `images` with `method`; `weights`: "s8" (signed
    8-bit) or "s7" (signed, 7 bits of range)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        with contextlib.redirect_stdout(io.StringIO()):  # onnxruntime's histogram calibrators print their progress
            quantize_static(
                str(prepared),
                str(out_path),
                CalibrationReader(images[: calibration_count(method, len(images))]),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                reduce_range=weights == "s7",
                calibrate_method=methods[method],
                nodes_to_exclude=head_nodes(str(prepared)),
                extra_options=None if method == "minmax" else {"CalibMaxIntermediateOutputs": 2},  # merged in twos
            )


def classifier_node(graph):
    """The classifier layer: the Gemm or MatMul node the 'logits' output comes from (None if there is none)."""
    producer = {out: node for node in graph.node for out in node.output}
    node = producer.get("logits")
    while node is not None and node.op_type not in ("Gemm", "MatMul"):
        node = producer.get(node.input[0])
    return node


def head_nodes(path):
    """The names of the nodes that read the classifier's input, directly or through others: the classifier layer
    (the Gemm or MatMul the 'logits' output comes from) and the out-of-distribution score's graph."""
    import onnx

    graph = onnx.load(path).graph
    node = classifier_node(graph)
    if node is None:
        return []
    reached, tensors = set(), {node.input[0]}
    for candidate in graph.node:  # the graph is in topological order: one pass finds every node downstream
        if any(i in tensors for i in candidate.input):
            reached.add(candidate.name)
            tensors.update(candidate.output)
    return sorted(reached)


def run_model(path, images, batch=32):
    """(logits, ood_score or None, the classifier's input) of an ONNX file of export.py on images, in batches."""
    import onnx

    proto = onnx.load(str(path))
    has_score = len(proto.graph.output) == 2
    node = classifier_node(proto.graph)  # None where the classifier is a convolution (SqueezeNet): no features
    if node is not None:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None))
    session = exported_model.onnx_session(proto.SerializeToString())
    batches = (images[i : i + batch].contiguous().numpy() for i in range(0, len(images), batch))
    runs = [session.run(None, {"input": x}) for x in batches]
    logits, *rest = (torch.cat([torch.from_numpy(r[j]) for r in runs]) for j in range(len(runs[0])))
    return logits, (rest[0] if has_score else None), (rest[-1].flatten(1) if node is not None else None)


def compare(fp32_path, int8_path, images, labels, ckpt, method, n_calibration, weights, qat_epochs=0, training=None):
    """Figures of int8 against fp32 on images (labels: per image, or None); `weights`: the build's (quantize).
    With an out-of-distribution threshold, fit_ood may refit the int8 file's score (`training`: the model's own
    training images, preprocessed, or None)."""
    calibration = tasks.for_checkpoint(ckpt).calibration_of(ckpt)
    (a, score_a, _), (b, score_b, features_b) = run_model(fp32_path, images), run_model(int8_path, images)
    pa, pb = calibration.probabilities(a), calibration.probabilities(b)
    da, db = calibration.decide(pa), calibration.decide(pb)
    same = (da == db).reshape(len(images), -1).all(1)
    accuracy = [
        float((d == labels).reshape(len(images), -1).all(1).float().mean()) if labels is not None else float("nan")
        for d in (da, db)
    ]
    figures = Figures(
        method,
        n_calibration,
        len(images),
        labels is not None,
        *accuracy,
        float(same.float().mean()),
        float((pa - pb).abs().max()),
        weights=weights,
        built_saturating=saturates(),
        qat_epochs=qat_epochs,
    )
    if score_a is not None and ckpt["ood"].get("threshold") is not None:
        fit_ood(figures, int8_path, images, ckpt, score_a, (b, score_b, features_b), training)
    return figures


# ----------------------------------------------------------------------------- the out-of-distribution score


def fit_ood(figures, int8_path, images, ckpt, fp32_scores, int8_outputs, training=None):
    """The int8 file's out-of-distribution score, made to flag what the fp32 export flags on the gate images.
    Quantization noise moves the features it is computed from: on solar cells the int8 file with fp32's reference
    and threshold flagged 56 of 160 held-out cells as unlike the training images where fp32 flagged 13
    (docs/export.md). Three candidates, the one whose flags agree best with fp32's on the gate images kept (the first
    of equals): fp32's reference and threshold as they are; the threshold refitted so that int8 flags as many gate
    images as fp32 does; and, for the knn score with the model's own training images to hand, its reference rebuilt
    from their int8 features with that refitted threshold. A rebuilt reference replaces the graph's constant in the
    file; the figures, read back from the file, say which was kept and the threshold it needs."""
    import ood

    reference, threshold = ckpt["ood"], ckpt["ood"]["threshold"]
    logits, scores, features = int8_outputs
    flagged = fp32_scores > threshold
    count = int(flagged.sum())

    def refitted(candidate_scores):
        """The threshold above which int8 flags `count` of the gate images (ties aside): halfway between the
        highest score left unflagged and the lowest flagged, so that neither sits on it (another CPU's rounding)."""
        ordered, n = candidate_scores.double().sort().values, len(candidate_scores)
        if count >= n:
            return threshold
        top = float(ordered[n - count - 1])
        return (top + float(ordered[n - count])) / 2 if count else top + max(1e-6, 1e-6 * abs(top))

    def agreement(candidate):
        """The share of gate images a (kind, threshold, scores) candidate flags as fp32 does."""
        return float(((candidate[2] > candidate[1]) == flagged).float().mean())

    candidates = [("", threshold, scores), ("threshold", refitted(scores), scores)]
    bank = None
    usable = features is not None and training is not None and len(training) >= reference.get("k", ood.K)
    if reference["method"] == "knn" and usable:
        bank = ood.knn_bank(run_model(int8_path, training)[2], ood.MAX_REFERENCE_MB, seed=0)
        rebuilt = ood.score({**reference, "features": bank}, ckpt.get("temperature", 1.0), features, logits)
        candidates.append(("reference", refitted(rebuilt), rebuilt))
    kind, chosen, _ = max(candidates, key=agreement)
    if kind == "reference" and not replace_knn_bank(int8_path, reference["features"], bank):
        kind, chosen, _ = max(candidates[:2], key=agreement)
    if kind == "reference":
        scores = run_model(int8_path, images)[1]  # the file's own scores, with the constant replaced
    kept = scores > chosen
    figures.ood_refit, figures.ood_threshold = kind, chosen
    figures.ood_agreement = float((kept == flagged).float().mean())
    figures.ood_flagged_fp32, figures.ood_flagged_int8 = count, int(kept.sum())
    figures.ood_flagged_both = int((kept & flagged).sum())
    figures.ood_reference_images = len(bank) if kind == "reference" else None


def replace_knn_bank(path, old, new):
    """Replaces, in the ONNX file at path, the knn score's constant that holds the `old` reference rows (as the
    exporter folded them: transposed to float32, or as they are) by the `new` rows; False when no constant matches."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    forms = (lambda rows: rows.float().T.contiguous().numpy(), lambda rows: rows.numpy())  # both tried
    for init in proto.graph.initializer:
        for form in forms:
            if tuple(init.dims) != form(old).shape:
                continue
            value = numpy_helper.to_array(init)
            same = np.allclose(value.astype(np.float32), form(old).astype(np.float32), atol=1e-3)
            if value.dtype.kind == "f" and same:
                init.CopyFrom(numpy_helper.from_array(form(new).astype(value.dtype), init.name))
                del proto.graph.value_info[:]  # shapes inferred for the old row count
                onnx.save(proto, str(path))
                return True
    return False


def rate(path, images, batch, repeats=3):
    """images/s of an ONNX file on ready tensors at this batch size (best of `repeats` passes)."""
    model = exported_model.OnnxModel(path)
    x = images[:batch] if len(images) >= batch else images.repeat(batch // len(images) + 1, 1, 1, 1)[:batch]
    model(x)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(max(1, 32 // batch)):
            model(x)
        best = min(best, time.perf_counter() - start)
    return max(1, 32 // batch) * batch / best


def measure_speed(figures, fp32_path, int8_path, images):
    figures.speedup_batch1 = rate(int8_path, images, 1) / rate(fp32_path, images, 1)
    figures.speedup_batch32 = rate(int8_path, images, 32) / rate(fp32_path, images, 32)
    figures.fp32_mb, figures.int8_mb = (Path(p).stat().st_size / 2**20 for p in (fp32_path, int8_path))


def speed_note(figures):
    """A line when the int8 file ran slower than fp32 at batch 1 or 32 where it was built, else "": the gate does
    not refuse a build for its speed (a smaller file may be what is wanted), but the user should not assume it."""
    timed = ((1, figures.speedup_batch1), (32, figures.speedup_batch32))
    slower = [f"{x:.2f}x at batch {b}" for b, x in timed if x < 1]
    if not slower:
        return ""
    return (
        f"note: on this CPU the int8 file ran slower than fp32 ({' and '.join(slower)}); int8 pays on CPUs with VNNI "
        "and on some models more than others (docs/export.md#int8): time both files where they will run"
    )


def failure(figures, max_drop, min_agreement, min_ood_agreement=0.0):
    """The gate: the one-line reason the int8 build is refused, or ""."""
    if figures.labelled and not figures.drop <= max_drop:
        return (
            f"int8 loses {figures.drop:.2f} accuracy points ({figures.accuracy_fp32:.4f} -> "
            f"{figures.accuracy_int8:.4f}), more than --max_drop {max_drop:g}"
        )
    if not figures.agreement >= min_agreement:
        return (
            f"int8 agrees with fp32 on {figures.agreement:.2%} of the images, under --min_agreement {min_agreement:g}"
        )
    if figures.ood_agreement is not None and not figures.ood_agreement >= min_ood_agreement:
        return (
            f"int8's out-of-distribution flag (in_distribution) agrees with fp32's on {figures.ood_agreement:.2%} of "
            f"the images, under --min_ood_agreement {min_ood_agreement:g}"
        )
    return ""


def metadata(figures):
    """What the int8 file's metadata adds: the gate's figures as JSON, and the out-of-distribution threshold that
    fit_ood kept (predict.py and serve.py read it as the fp32 file's)."""
    threshold = {} if figures.ood_threshold is None else {"ood_threshold": repr(float(figures.ood_threshold))}
    return {"int8": json.dumps({**asdict(figures), "kept_fp32": KEPT_FP32}), **threshold}


def labels_of(files, ckpt):
    """Per file, the class index its folder names (a multi-hot row for a multi-label model: not known from a
    folder), or None when some file's folder is not a class."""
    task = tasks.for_checkpoint(ckpt)
    if task.multi_label:
        return None
    index = task.folder_labels(ckpt["class_names"])
    found = [index.get(Path(f).parent.name, -1) for f in files]
    return None if -1 in found else torch.tensor(found)


def best_of(candidates, max_drop, min_agreement, min_ood_agreement=0.0):
    """The candidate (figures, path) to keep: the first that passes the gate, else the one closest to it."""
    passing = [c for c in candidates if not failure(c[0], max_drop, min_agreement, min_ood_agreement)]
    if passing:
        return passing[0]
    return max(candidates, key=lambda c: (c[0].agreement - c[0].drop / 100, c[0].agreement, c[0].ood_agreement or 0))
