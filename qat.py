"""Quantization-aware training for export.py --int8 --qat: the model learns to give, through int8 arithmetic, the
answers it gives in fp32.

The int8 file computes with rounded numbers: weights per output channel in -QMAX..QMAX, and each activation a uint8
on one scale per tensor (its min-max over the calibration images). `simulate` makes a PyTorch model compute the same
rounding (fake quantization; the rounding passes gradients straight through) where onnxruntime's QDQ build puts it:
the input of every convolution and of the classifier; the output of every convolution block (after its activation),
max pooling and residual block; both sides of a ResNet block's addition. The classifier itself stays fp32, as in the
int8 file. `distill` then trains the backbone so that these rounded outputs come close to the fp32 model's own logits
and features on the training images (distillation: no labels needed, nothing else learned), with the batch norms
frozen, as the int8 file folds them into the convolutions. The trained weights are quantized as usual
(int8.quantize); the gate still holds the build against the original fp32 model."""

import copy

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.misc import Conv2dNormActivation

from model_loader import is_head_param

RESIDUAL_BLOCKS = {"BasicBlock", "Bottleneck", "InvertedResidual", "MBConv", "FusedMBConv"}  # torchvision's
LR = 1e-5  # Adam's; the weights move by about a rounding step
BATCH = 16


class _FakeQuantWeight(nn.Module):
    """A convolution's weights rounded per output channel, symmetrically, to -qmax..qmax steps of max|w| / qmax."""

    def __init__(self, qmax):
        super().__init__()
        self.qmax = qmax

    def forward(self, w):
        scale = (w.detach().abs().amax(dim=tuple(range(1, w.dim()))) / self.qmax).clamp_min(1e-12)
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -self.qmax, self.qmax)


def _activation_points(model, head):
    """(modules whose input is rounded, modules whose output is rounded): every convolution's input and the
    classifier's; the output of every convolution block and max pooling, both sides of a ResNet block's addition
    (its last norm and its shortcut), and every residual block's output (the sum, which its shortcut carries on)."""
    inputs, outputs = [], []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) or name == head:
            inputs.append((name, m))
        if isinstance(m, (Conv2dNormActivation, nn.MaxPool2d)) or type(m).__name__ in RESIDUAL_BLOCKS:
            outputs.append((name, m))
        if isinstance(m, (BasicBlock, Bottleneck)):
            outputs.append((f"{name}.bn2", m.bn2) if isinstance(m, BasicBlock) else (f"{name}.bn3", m.bn3))
            if m.downsample is not None:
                outputs.append((f"{name}.downsample", m.downsample))
    return inputs, outputs


def _uint8_params(lo, hi):
    """onnxruntime's asymmetric uint8 (scale, zero point) of a min-max range that includes 0."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-8) / 255
    return scale, int(round(-lo / scale))


def activation_ranges(model, head, images, batch=32):
    """{("in" or "out", module name): (min, max)} of each rounding point over images (model in eval mode, fp32);
    the names fit any copy of the model."""
    inputs, outputs = _activation_points(model, head)
    ranges = {}

    def seen(key, x):
        lo, hi = ranges.get(key, (0.0, 0.0))
        ranges[key] = (min(lo, float(x.min())), max(hi, float(x.max())))

    hooks = [m.register_forward_pre_hook(lambda m, i, k=("in", n): seen(k, i[0])) for n, m in inputs]
    hooks += [m.register_forward_hook(lambda m, i, o, k=("out", n): seen(k, o)) for n, m in outputs]
    try:
        with torch.no_grad():
            for i in range(0, len(images), batch):
                model(images[i : i + batch])
    finally:
        for h in hooks:
            h.remove()
    return ranges


class simulate:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Within it, `model` computes as its int8 build with `ranges` (activation_ranges) and weights in -qmax..qmax."""

    def __init__(self, model, head, ranges, qmax):
        self.model, self.head, self.qmax = model, head, qmax
        self.params = {key: _uint8_params(*r) for key, r in ranges.items()}

    def _round(self, key, x):
        scale, zero = self.params[key]
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)

    def __enter__(self):
        inputs, outputs = _activation_points(self.model, self.head)
        self.hooks = [m.register_forward_pre_hook(lambda m, i, k=("in", n): (self._round(k, i[0]),)) for n, m in inputs]
        self.hooks += [m.register_forward_hook(lambda m, i, o, k=("out", n): self._round(k, o)) for n, m in outputs]
        self.convs = [m for _, m in inputs if isinstance(m, nn.Conv2d)]
        for conv in self.convs:
            parametrize.register_parametrization(conv, "weight", _FakeQuantWeight(self.qmax))
        return self.model

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        for conv in self.convs:  # the latent fp32 weights, which int8.quantize rounds as the simulation did
            parametrize.remove_parametrizations(conv, "weight", leave_parametrized=False)
        return False


def unsimulated(model, head):
    """How many linear and attention layers of the backbone the simulation leaves unrounded (onnxruntime's build
    quantizes them): vision transformers and MLP-mixing models gain little from distill."""
    return sum(
        isinstance(m, (nn.Linear, nn.MultiheadAttention)) and name != head and not is_head_param(name, head)
        for name, m in model.named_modules()
    )


def distill(model, head, images, epochs, qmax, stop=lambda: False, log=print, seed=0):
    """A copy of `model` (eval mode) trained for `epochs` on `images` (preprocessed, N x 3 x H x W) to give through
    int8 rounding the logits and classifier inputs the original gives in fp32 (random horizontal flips); returns
    (the copy, [mean loss per epoch]), or (None, losses) when stop() became true (checked after every batch).
    The loss: mean squared logit difference + mean squared feature difference / the features' variance."""
    teacher = model.eval()
    student = copy.deepcopy(model).eval()  # batch norms frozen: the int8 file folds them into the convolutions
    ranges = activation_ranges(student, head, images)
    features = {}
    hooks = [
        net.get_submodule(head).register_forward_pre_hook(lambda m, i, name=name: features.__setitem__(name, i[0]))
        for name, net in (("teacher", teacher), ("student", student))
    ]
    for name, p in student.named_parameters():
        p.requires_grad_(not is_head_param(name, head))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    try:
        with torch.no_grad():
            teacher(images[:64])
            spread = float(features["teacher"].flatten(1).var(0, unbiased=False).mean()) or 1.0  # one image: 1.0
        with simulate(student, head, ranges, qmax):
            optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=LR)
            for _ in range(epochs):
                order, total = torch.randperm(len(images), generator=generator), 0.0
                for start in range(0, len(order), BATCH):
                    x = images[order[start : start + BATCH]]
                    flip = torch.rand(len(x), generator=generator) < 0.5
                    x = torch.where(flip[:, None, None, None], x.flip(3), x)
                    with torch.no_grad():
                        target = teacher(x)
                    out = student(x)
                    loss = ((out - target) ** 2).mean()
                    loss = loss + ((features["student"] - features["teacher"]) ** 2).mean() / spread
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"the loss became {float(loss)} in epoch {len(losses) + 1}")
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach()) * len(x)
                    if stop():
                        return None, losses
                losses.append(total / len(images))
                log(f"int8: quantization-aware training, epoch {len(losses)}/{epochs}: loss {losses[-1]:.4f}")
    finally:
        for h in hooks:
            h.remove()
        for p in student.parameters():
            p.requires_grad_(False)
    return student, losses
