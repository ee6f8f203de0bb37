"""'None of my classes': how unlike the training images a new image is (out-of-distribution detection).

train.py keeps a reference in the checkpoint (key "ood", tensors and plain types only): for the default
method the L2-normalised penultimate features (the classifier's inputs) of the training images, and a
threshold on the score fitted on the validation images so that --ood_keep of them count as in
distribution. predict.py and the exported ONNX graph compute `ood_score` (higher = less like the training
images) beside the logits with the same Scorer module.

Methods (bench/ood_bench.py measures them on near and far out-of-distribution images):
  knn          1 - cosine similarity to the k-th nearest training feature (Sun et al. 2022); the default
  mahalanobis  the smallest squared Mahalanobis distance to a class mean, covariance shared (Lee et al. 2018)
  energy       -T logsumexp(logits / T) (Liu et al. 2020)
  msp          1 - the largest calibrated softmax probability (Hendrycks and Gimpel 2017)
"""

import math

import torch
from torch import nn

import evaluation
from cli import CLIError
from data_loader import eval_subset
from features import capture_head_input, feature_dim, pooled

METHODS = ("knn", "mahalanobis", "energy", "msp")
DEFAULT_METHOD = "knn"  # the best of the four on the set it was chosen on, and on most others (docs/ood.md)
K = 3  # neighbours for knn: the score is the distance to the k-th (bench/ood_bench.py compares 1 to 20)
MAX_REFERENCE_MB = 16  # the checkpoint grows by at most this; larger training sets keep a seeded sample of rows
REFERENCE_FORMAT = 1
SHRINKAGE = 1e-3  # mahalanobis: covariance + SHRINKAGE * mean variance * I, so few images still invert


class Scorer(nn.Module):
    """(penultimate features, logits) -> ood_score per row, higher = less like the training images. The
    reference is held in buffers, so the module runs on any device and traces into an ONNX graph."""

    def __init__(self, reference, temperature=1.0):
        super().__init__()
        self.method, self.temperature = reference["method"], float(temperature)
        self.k = int(reference.get("k", K))
        if self.method == "knn":
            self.register_buffer("bank", reference["features"])  # (n, dim) unit rows, float16
        elif self.method == "mahalanobis":
            self.register_buffer("means", reference["means"].float())  # (classes, dim)
            self.register_buffer("precision", reference["precision"].float())  # (dim, dim)

    def forward(self, features, logits):
        with torch.autocast(features.device.type, enabled=False):  # float32 under --amp too, as when fitted
            return self.score(pooled(features).float(), logits.float() / self.temperature)

    def score(self, features, logits):
        if self.method == "knn":
            sims = nn.functional.normalize(features, dim=1) @ self.bank.float().T
            return 1 - sims.topk(min(self.k, self.bank.shape[0]), dim=1).values[:, -1]
        if self.method == "mahalanobis":
            projected = features @ self.precision
            squared = (
                (projected * features).sum(1, keepdim=True)
                - 2 * projected @ self.means.T
                + ((self.means @ self.precision) * self.means).sum(1)[None]
            )
            return squared.min(1).values.clamp(min=0)
        if self.method == "energy":
            return -self.temperature * torch.logsumexp(logits, 1)
        return 1 - logits.softmax(1).max(1).values  # msp


class ScoredModel(nn.Module):
    """The classifier with a second output: images -> (logits, ood_score). The score is computed from the
    classifier layer's input (a forward pre-hook) and the logits; what predict.py runs and export.py traces."""

    def __init__(self, model, head, scorer):
        super().__init__()
        self.model, self.scorer = model, scorer
        self._taken = []
        # the hook appends to an attribute (not capture_head_input's closed-over list): the ONNX and
        # torch.export tracers replay a module attribute's mutation, not a closure's
        model.get_submodule(head).register_forward_pre_hook(lambda m, inputs: self._taken.append(inputs[0]))

    def forward(self, images):
        self._taken.clear()
        logits = self.model(images)
        return logits, self.scorer(self._taken[-1], logits)


# ----------------------------------------------------------------------------- building the reference


def sample_rows(n, dim, max_mb, seed):
    """Indices of the training images the knn reference keeps: all, or a seeded sample of as many float16
    rows of `dim` as fit in max_mb."""
    rows = max(1, int(max_mb * 2**20 // (dim * 2)))
    if n <= rows:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:rows].sort().values


def knn_bank(features, max_mb, seed):
    """Unit rows in float16; a seeded sample of them when the whole would exceed max_mb."""
    features = features[sample_rows(len(features), features.shape[1], max_mb, seed)]
    return nn.functional.normalize(features.float(), dim=1).half()


def class_gaussians(features, labels, n_classes):
    """(class means, precision of the shared within-class covariance, shrunk towards a scaled identity)."""
    features = features.double()
    means = torch.stack(
        [features[labels == c].mean(0) if (labels == c).any() else features.mean(0) for c in range(n_classes)]
    )
    centred = features - means[labels]
    cov = centred.T @ centred / max(len(features) - 1, 1)
    cov += SHRINKAGE * float(cov.diagonal().mean()) * torch.eye(cov.shape[0], dtype=cov.dtype)
    return means.float(), torch.linalg.inv(cov).float()


def fit_threshold(scores, keep):
    """The smallest score t with at least `keep` of the scores <= t; None with fewer than 2 scores."""
    if len(scores) < 2:
        return None
    ordered = scores.double().sort().values
    return float(ordered[min(len(ordered) - 1, math.ceil(keep * len(ordered)) - 1)])


def build_reference(
    method,
    train_features,
    train_labels,
    n_classes,
    valid_features,
    valid_logits,
    temperature,
    keep,
    max_mb=MAX_REFERENCE_MB,
    seed=0,
    train_count=None,
    k=K,
):
    """The checkpoint's "ood" entry: the method's reference from the training images' features, and the
    threshold that keeps `keep` of the validation images in distribution. `train_count`: the readable
    training images when train_features is already a sample of them."""
    dim = int(train_features.shape[1])
    reference = {
        "format": REFERENCE_FORMAT,
        "method": method,
        "dim": dim,
        "n_classes": int(n_classes),
        "k": int(k),
        "keep": float(keep),
        "train_count": int(train_count or len(train_features)),
    }
    if method == "knn":
        reference["features"] = knn_bank(train_features, max_mb, seed)
    elif method == "mahalanobis":
        if dim * dim * 4 > max_mb * 2**20:
            raise CLIError(f"--ood_method mahalanobis keeps a {dim}x{dim} matrix, over {max_mb} MB; use knn")
        reference["means"], reference["precision"] = class_gaussians(train_features, train_labels, n_classes)
    scores = score(reference, temperature, valid_features, valid_logits)
    threshold = fit_threshold(scores, keep)
    reference.update(
        threshold=threshold,
        valid_count=int(len(scores)),
        valid_kept=float((scores <= threshold).double().mean()) if threshold is not None else None,
    )
    return reference


@torch.inference_mode()
def score(reference, temperature, features, logits, batch_size=1024):
    """ood_score of every row of (features, logits), in batches (the knn similarity matrix stays small)."""
    scorer = Scorer(reference, temperature)
    out = [
        scorer(features[i : i + batch_size], logits[i : i + batch_size]) for i in range(0, len(features), batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0)


def reference_bytes(reference):
    return sum(v.numel() * v.element_size() for v in reference.values() if isinstance(v, torch.Tensor))


def describe(reference):
    """One line for train.py's output: what the reference holds, its size, the threshold."""
    rows = reference["features"].shape[0] if "features" in reference else None
    held = (
        f"{rows} of {reference['train_count']} training features"
        if rows is not None
        else f"the features of {reference['train_count']} training images"
    )
    size = f"checkpoint +{reference_bytes(reference) / 2**20:.1f} MB"
    if reference["threshold"] is None:
        fit = (
            f"no threshold: {reference['valid_count']} readable validation image(s), 2 are needed; "
            "in_distribution stays empty"
        )
    else:
        fit = (
            f"threshold {reference['threshold']:.4g} keeps {reference['valid_kept']:.1%} of "
            f"{reference['valid_count']} validation images (--ood_keep {reference['keep']:g})"
        )
    return f"out-of-distribution reference: {reference['method']} on {held} (dim {reference['dim']}, {size}); {fit}"


@torch.inference_mode()
def collect_features(model, head, loader, compute, desc, stoppable=False):
    """(penultimate features, logits, labels) of every readable image of the loader (evaluation.collect_rows:
    dataset order, assembled over torchrun's processes); None when stopped (see collect_rows)."""
    model.eval()
    with capture_head_input(model, head) as taken:

        def both(images):
            taken.clear()
            logits = model(images)
            return torch.cat([logits.float(), pooled(taken[-1]).float()], 1)

        collected = evaluation.collect_rows(both, loader, compute, desc, stoppable)
    if collected is None:
        return None
    rows, labels = collected
    n_classes = model.get_submodule(head).weight.shape[0]
    return rows[:, n_classes:], rows[:, :n_classes], labels


def reference_for_run(model, head, loaders, cache, compute, method, keep, temperature, n_classes, seed):
    """The reference of a finished run's best model. knn keeps a seeded sample of the training images
    within MAX_REFERENCE_MB, and only those are read. Their features come from the frozen-backbone cache
    when it holds the eval view of every image (free), else from one eval pass of the model over them
    and the validation images. None when a stop signal arrives; a CLIError when nothing can be kept."""
    samples = loaders.train_eval.dataset.samples
    rows = (
        sample_rows(len(samples), feature_dim(model, head), MAX_REFERENCE_MB, seed)
        if method == "knn"
        else torch.arange(len(samples))
    )
    if cache is not None and cache.train.shape[0] == 1:
        readable = rows[cache.train_ok[rows]]
        train_features, train_count = cache.train[0][readable], int(cache.train_ok.sum())
        task = loaders.train_eval.dataset.task
        train_labels = task.tensor(samples[i][1] for i in readable.tolist())
        valid_features = cache.valid[0][cache.valid_ok]
        valid_labels = task.tensor(y for _, y in loaders.valid.dataset.samples)
        valid_logits, _ = evaluation.head_logits(
            model.get_submodule(head), cache.valid[0], cache.valid_ok, valid_labels, loaders.valid.batch_size, compute
        )
    else:
        if compute.stop_requested():  # every rank at the same point: a collective is safe here
            return None
        subset = eval_subset(loaders.train_eval, rows.tolist(), compute.dist.rank, compute.dist.world_size)
        train = collect_features(model, head, subset, compute, "ood train", stoppable=True)
        valid = collect_features(model, head, loaders.valid, compute, "ood valid", stoppable=True)
        if train is None or valid is None:
            return None
        (train_features, _, train_labels), (valid_features, valid_logits, _) = train, valid
        train_count = len(train_features) if len(rows) == len(samples) else len(samples)
    if not len(train_features):
        raise CLIError("no training image could be read")
    return build_reference(
        method,
        train_features,
        train_labels,
        n_classes,
        valid_features,
        valid_logits,
        temperature,
        keep,
        seed=seed,
        train_count=train_count,
    )


# ----------------------------------------------------------------------------- using it


def check_reference(reference, dim, n_classes, path):
    """A CLIError naming what does not fit when the checkpoint's reference does not match its model."""
    where = f"{str(path)!r}: its out-of-distribution reference"
    if not isinstance(reference, dict):
        raise CLIError(f"{where} is a {type(reference).__name__}, not a dict")
    if reference.get("method") not in METHODS:
        raise CLIError(f"{where} has an unknown method {reference.get('method')!r} (known: {', '.join(METHODS)})")
    version = reference.get("format", 0)
    if not isinstance(version, int) or version > REFERENCE_FORMAT:
        raise CLIError(f"{where} has format {version!r}; this version reads up to {REFERENCE_FORMAT}")
    threshold, k = reference.get("threshold"), reference.get("k", K)
    if not (threshold is None or isinstance(threshold, (int, float))) or not isinstance(k, int) or k < 1:
        raise CLIError(f"{where} has an unreadable threshold {threshold!r} or k {k!r}")
    needs = {"knn": [("features", -1)], "mahalanobis": [("means", -1), ("precision", 0), ("precision", 1)]}
    shapes_ok = reference.get("dim") == dim
    for key, axis in needs.get(reference["method"], []):
        value = reference.get(key)
        shapes_ok = shapes_ok and isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[axis] == dim
    if reference["method"] == "mahalanobis" and shapes_ok:
        shapes_ok = reference["means"].shape[0] == n_classes
    if not shapes_ok:
        widths = sorted(
            {int(v.shape[-1]) for k, v in reference.items() if isinstance(v, torch.Tensor) and v.dim() == 2}
        )
        raise CLIError(
            f"{where} ({reference['method']}, dim {reference.get('dim')}, tensors of width "
            f"{', '.join(map(str, widths)) or 'none'}) does not fit the model, whose classifier takes "
            f"{dim} features for {n_classes} classes"
        )


def scored_model(model, head, ckpt, path):
    """model -> ScoredModel with the checkpoint's reference, after checking that it fits."""
    check_reference(ckpt["ood"], feature_dim(model, head), len(ckpt["class_names"]), path)
    return ScoredModel(model, head, Scorer(ckpt["ood"], ckpt.get("temperature", 1.0)))
