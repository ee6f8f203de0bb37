import pytest
import torch
import torchvision
from torch import nn

import model_loader as ml
from cli import CLIError


@pytest.mark.parametrize(
    "alias, name, head",
    [
        ("resnet", "resnet34", "fc"),
        ("alexnet", "alexnet", "classifier.6"),
        ("vgg", "vgg16_bn", "classifier.6"),
        ("squeezenet", "squeezenet1_0", "classifier.1"),
        ("densenet", "densenet121", "classifier"),
        ("resnet18", "resnet18", "fc"),
        ("mobilenet_v2", "mobilenet_v2", "classifier.1"),
        ("efficientnet_b0", "efficientnet_b0", "classifier.1"),
        ("convnext_tiny", "convnext_tiny", "classifier.2"),
        ("vit_b_16", "vit_b_16", "heads.head"),
    ],
)
def test_every_older_name_and_some_torchvision_names_build_with_the_right_head(alias, name, head):
    assert ml.resolve_model_name(alias) == name
    model, found = ml.build_model(name, 3, log=lambda *a: None)
    assert found == head
    size = 224 if name == "vit_b_16" else 64
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 3)


def test_unknown_model_name_lists_valid_ones():
    with pytest.raises(CLIError, match="unknown --model_name 'resnet9000'.*resnet18"):
        ml.resolve_model_name("resnet9000")
    with pytest.raises(CLIError, match="unknown --model_name 'efficientnet_lite'; did you mean efficientnet_lite0?"):
        ml.resolve_model_name("efficientnet_lite")


def test_model_defaults_come_from_the_backbone():
    d = ml.model_defaults("resnet34")
    assert d["input_size"] == 224 and d["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert ml.model_defaults("inception_v3")["input_size"] == 299


def test_freezing_leaves_exactly_the_head_trainable_and_batchnorm_in_eval():
    model, head = ml.build_model("resnet18", 4, log=lambda *a: None)
    ml.set_backbone_trainable(model, head, False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]
    ml.set_train_mode(model, head, backbone_frozen=True)
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.fc.training
    before = model.bn1.running_mean.clone()
    model(torch.randn(4, 3, 32, 32))
    assert torch.equal(before, model.bn1.running_mean)  # statistics do not drift
    ml.set_backbone_trainable(model, head, True)
    ml.set_train_mode(model, head, backbone_frozen=False)
    assert all(p.requires_grad for p in model.parameters()) and model.bn1.training


def test_param_groups_give_the_backbone_a_smaller_rate():
    model, head = ml.build_model("resnet18", 2, log=lambda *a: None)
    groups = ml.param_groups(model, head, 1e-3, 0.1, 0.0)
    assert [g["name"] for g in groups] == ["head", "backbone"]
    assert groups[0]["lr"] == 1e-3 and groups[1]["lr"] == pytest.approx(1e-4)
    assert len(groups[0]["params"]) == 2
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))


def make_ckpt(model, name="resnet18", classes=("a", "b", "c")):
    return ml.make_checkpoint(
        model, name, list(classes), 32, 36, [0.5] * 3, [0.25] * 3, 3, {"valid_loss": 0.5}, {"lr": 1e-3, "data_dir": "x"}
    )


def test_checkpoint_round_trip_with_weights_only_and_rebuild_from_metadata(tmp_path):
    model, _ = ml.build_model("resnet18", 3, log=lambda *a: None)
    path = tmp_path / "m.pth"
    ml.save_checkpoint(make_ckpt(model), path)
    raw = torch.load(path, weights_only=True)
    assert set(ml.CHECKPOINT_KEYS) <= set(raw) and raw["class_names"] == ["a", "b", "c"]
    assert {"epoch", "metrics", "args", "torch_version", "torchvision_version"} <= set(raw)
    assert not any(k.startswith("module.") for k in raw["state_dict"])
    bare = torchvision.models.get_model("resnet18", num_classes=3)
    bare.load_state_dict(raw["state_dict"])  # users can take the bare torchvision model
    rebuilt, head = ml.model_from_checkpoint(ml.load_checkpoint(path))
    x = torch.randn(2, 3, 32, 32)
    model.eval(), rebuilt.eval()
    assert head == "fc" and torch.equal(model(x), rebuilt(x))


def test_pretrained_weights_load_offline_from_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _, path = ml.pretrained_file("resnet18")
    assert path == tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    source = torchvision.models.resnet18()  # a real 1000-class resnet18 state_dict under torchvision's name
    path.parent.mkdir(parents=True)
    torch.save(source.state_dict(), path)
    messages = []
    model, head = ml.build_model("resnet18", 2, pretrained=True, log=messages.append)
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    assert model.fc.weight.shape == (2, 512)
    assert any("loaded" in m for m in messages)


def test_pretrained_weights_missing_offline_gives_the_file_to_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(CLIError) as e:
        ml.build_model("resnet18", 2, pretrained=True)
    message = str(e.value)
    assert "resnet18-f37072fd.pth" in message and str(tmp_path / "hub" / "checkpoints") in message
    assert "--weights" in message and "\n" not in message


def test_weights_file_accepts_our_checkpoint_and_reports_mismatches(tmp_path):
    donor, _ = ml.build_model("resnet18", 5, log=lambda *a: None)
    ckpt = make_ckpt(donor, classes="abcde")
    ckpt["state_dict"]["extra.weight"] = torch.zeros(1)
    path = tmp_path / "donor.pth"
    ml.save_checkpoint(ckpt, path)
    messages = []
    model, _ = ml.build_model("resnet18", 3, weights_path=path, log=messages.append)
    assert torch.equal(model.conv1.weight, donor.conv1.weight)
    assert any("unexpected" in m and "extra.weight" in m for m in messages)


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(torchvision.models.squeezenet1_0().state_dict(), path)
    with pytest.raises(CLIError, match="do not fit"):
        ml.build_model("resnet18", 2, weights_path=path)


class Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))  # would create a file when unpickled


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    target = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pth"
    torch.save({"format_version": 1, "state_dict": {}, "payload": Payload(str(target))}, path)
    with pytest.raises(CLIError, match="pickled Python objects or code"):
        ml.load_checkpoint(path)
    assert not target.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"hello, not a checkpoint", "not a"),
        (None, "does not exist"),
    ],
)
def test_non_checkpoints_get_one_line_errors(tmp_path, content, message):
    path = tmp_path / "x.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CLIError, match=message) as e:
        ml.load_checkpoint(path)
    assert "\n" not in str(e.value)


def test_a_bare_state_dict_is_named_as_such(tmp_path):
    path = tmp_path / "sd.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(CLIError, match="bare state_dict.*missing format_version"):
        ml.load_checkpoint(path)


def test_state_dict_of_another_shape_is_a_clear_error(tmp_path):
    model, _ = ml.build_model("resnet18", 3, log=lambda *a: None)
    ckpt = make_ckpt(model)
    ckpt["class_names"] = ["a", "b"]  # the head says 3
    path = tmp_path / "m.pth"
    ml.save_checkpoint(ckpt, path)
    with pytest.raises(CLIError, match="does not fit resnet18 with 2 classes"):
        ml.model_from_checkpoint(ml.load_checkpoint(path), path)


def test_plain_turns_objects_into_weights_only_types(tmp_path):
    from pathlib import Path

    value = ml.plain({"p": Path("a/b"), "t": (1, 2.5, True, None), "v": torch.__version__})
    assert value == {"p": "a/b", "t": [1, 2.5, True, None], "v": str(torch.__version__)}
    torch.save(value, tmp_path / "x.pth")
    assert torch.load(tmp_path / "x.pth", weights_only=True) == value
