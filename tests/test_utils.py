"""Small shared helpers: atomic writes, progress lines, the precision of CPU fine-tuning steps."""

import os
import stat

import pytest
import torch
from torch import nn

import utils


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def test_atomic_writes_get_the_permissions_open_would_give(tmp_path, umask):
    with utils.atomic_open(tmp_path / "result.csv") as f:
        f.write("a,b\n")
    utils.atomic_torch_save({"x": 1}, tmp_path / "m.pth")
    assert mode(tmp_path / "result.csv") == mode(tmp_path / "m.pth") == 0o644  # readable by colleagues
    umask(0o027)
    with utils.atomic_open(tmp_path / "group.csv") as f:
        f.write("x")
    assert mode(tmp_path / "group.csv") == 0o640
    os.chmod(tmp_path / "result.csv", 0o600)  # a file the user made private stays private when rewritten
    with utils.atomic_open(tmp_path / "result.csv") as f:
        f.write("c,d\n")
    assert mode(tmp_path / "result.csv") == 0o600 and (tmp_path / "result.csv").read_text() == "c,d\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_progress_lines_where_no_bar_shows(monkeypatch):
    """Written to a log (not a terminal): a line with the count, the rate and the time left, at most every
    `every` seconds; to a terminal, none (tqdm's bar shows there)."""
    import io

    clock = [100.0]
    monkeypatch.setattr(utils.time, "monotonic", lambda: clock[0])
    log = io.StringIO()
    progress = utils.Progress(1000, "predict", every=5, scale=2, out=log)
    for _ in range(3):
        clock[0] += 2
        progress.update(50)  # 100 images of the job per call, 50 img/s
    assert log.getvalue() == "predict: 300/1000 images (30%), 50.0 img/s, 0:00:14 left\n"
    terminal = io.StringIO()
    terminal.isatty = lambda: True
    quiet = utils.Progress(1000, "predict", every=0, out=terminal)
    quiet.update(10)
    assert terminal.getvalue() == ""
    assert utils.format_seconds(3725) == "1:02:05" and utils.format_seconds(float("inf")) == "?"


def gradients(conv, x, context, input_grad=True):
    """(output, input gradient, weight gradient, bias gradient) of conv(x) under `context`."""
    conv.zero_grad()
    x = x.detach().requires_grad_(input_grad)
    with context:
        out = conv(x)
    (out.float() ** 2).sum().backward()
    return out, x.grad, conv.weight.grad, None if conv.bias is None else conv.bias.grad


def test_cpu_fine_tuning_steps_take_the_gradients_of_slow_bf16_depthwise_convolutions_in_fp32():
    torch.manual_seed(0)
    fine_tune = utils.Compute(torch.device("cpu"), None, train_amp_dtype=torch.bfloat16)
    x = torch.randn(4, 16, 20, 20).contiguous(memory_format=torch.channels_last)
    for conv in (nn.Conv2d(16, 16, 5, padding=2, groups=16), nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)):
        conv = conv.to(memory_format=torch.channels_last)
        exact = gradients(conv, x, torch.autocast("cpu", enabled=False))
        out, *grads = gradients(conv, x, fine_tune.autocast(train=True))
        assert type(out.grad_fn).__name__ == "DepthwiseFp32BackwardBackward" and out.dtype == torch.bfloat16
        assert out.is_contiguous(memory_format=torch.channels_last)
        # the forward is autocast's bf16 convolution, the gradients those of its output in fp32
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(out, conv(x))
        for got, want in zip(grads, exact[1:]):
            assert got.dtype == want.dtype == torch.float32
            assert (got - want).norm() / want.norm() < 0.01
        assert grads[0].is_contiguous(memory_format=torch.channels_last)
    # a bf16 input without gradient (as a first layer's), a convolution without bias: its weights' gradient alone
    conv = nn.Conv2d(16, 16, 5, stride=2, groups=16, bias=False).to(memory_format=torch.channels_last)
    low = x.to(torch.bfloat16)
    exact = gradients(conv, low.float(), torch.autocast("cpu", enabled=False), input_grad=False)
    out, grad_x, grad_w, _ = gradients(conv, low, fine_tune.autocast(train=True), input_grad=False)
    assert type(out.grad_fn).__name__ == "DepthwiseFp32BackwardBackward" and grad_x is None
    assert grad_w.dtype == torch.float32 and (grad_w - exact[2]).norm() / exact[2].norm() < 0.01
    # where bf16 is fast (3x3, stride 1), other convolutions, NCHW steps (not measured), forward-only passes:
    # autocast's own path
    nchw = x.contiguous()
    native = [
        (nn.Conv2d(16, 16, 3, padding=1, groups=16), x, fine_tune.autocast(train=True)),
        (nn.Conv2d(16, 8, 5), x, fine_tune.autocast(train=True)),
        (nn.Conv2d(16, 16, 5, groups=16), nchw, fine_tune.autocast(train=True)),
        (nn.Conv2d(16, 16, 5, groups=16), x, utils.Compute(torch.device("cpu"), torch.bfloat16).autocast()),
    ]
    for conv, inputs, context in native:
        out, *_ = gradients(conv, inputs, context)
        assert type(out.grad_fn).__name__ == "ConvolutionBackward0" and out.dtype == torch.bfloat16
