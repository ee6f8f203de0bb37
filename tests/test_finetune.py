"""Fine-tuning the LP-FT way: the linear probe, the head's rate after it, keeping the better of probe and
fine-tune, the BatchNorm policies, discriminative rates, the augmentation policies, and resuming either stage."""

import argparse

import pytest
import torch
from PIL import Image
from torch import nn

import data_loader as dl
import model_loader as ml
import probe
import stages
import tasks
import train
import trainer
from conftest import run_in_process, run_script
from helpers import interrupt_when_called


def test_probe_keeps_the_penalty_with_the_lowest_validation_loss():
    torch.manual_seed(0)
    centres = torch.randn(3, 16) * 0.6
    y = torch.arange(3).repeat(20)
    x = centres[y] + torch.randn(60, 16)
    vy = torch.arange(3).repeat(30)
    vx = centres[vy] + torch.randn(90, 16)
    head = nn.Linear(16, 3)
    before = head.weight.detach().clone()
    task = tasks.SingleLabel()
    result = probe.fit_probe(head, x, y, vx, vy, nn.CrossEntropyLoss(), task)
    losses = dict(result.tried)
    assert len(losses) == len(probe.L2_GRID) and result.l2 == min(losses, key=losses.get)
    assert result.valid["loss"] == pytest.approx(min(losses.values()))
    assert task.metrics(head(vx).detach(), vy)["loss"] == pytest.approx(result.valid["loss"])  # the kept head
    assert not torch.equal(head.weight, before)
    # the penalty matters: the strongest and the weakest give different validation losses on so few images
    assert losses[probe.L2_GRID[0]] != pytest.approx(losses[probe.L2_GRID[-1]], rel=1e-3)


def tuned_args(data, out, weights, *extra):
    return [
        str(a)
        for a in (
            "--data_dir",
            data,
            "--model_name",
            "resnet18",
            "--input_size",
            "32",
            "--num_workers",
            "0",
            "--batch_size",
            "8",
            "--verbose",
            "1",
            "--model_fn",
            out / "m.pth",
            "--log_dir",
            out / "run",
            "--weights",
            weights,
            "--ood_method",
            "none",
            *extra,
        )
    ]


def run_train(argv):
    return train.main(train.parse_args(argv))


def test_fine_tuning_never_ends_worse_than_its_probe(tuning_data, tmp_path, weights_file, capsys):
    # a rate that wrecks the backbone: every fine-tuned epoch is worse than the probe, which is kept
    result = run_train(
        tuned_args(tuning_data, tmp_path, weights_file, "--n_epochs", "2", "--lr", "3", "--backbone_lr_scale", "1")
    )
    out = capsys.readouterr().out
    assert (
        "head on cached features: linear probe (L2" in out and "kept the linear probe: fine-tuning did not beat" in out
    ), out
    state = result.state
    assert state.best_epoch == 0 and len(state.history) == 2
    assert state.best_metrics["valid_loss"] == state.probe["valid_loss"]
    assert not any(r["valid_loss"] <= state.probe["valid_loss"] for r in state.history)  # worse, or not a number
    assert "best: the linear probe" in out
    saved = torch.load(tmp_path / "m.pth", weights_only=True)
    assert saved["metrics"]["valid_loss"] == pytest.approx(state.probe["valid_loss"])


def test_resume_after_the_probe_continues_exactly(tuning_data, tmp_path, weights_file, monkeypatch, capsys):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    result = run_train(tuned_args(tuning_data, straight, weights_file, "--n_epochs", "2"))
    out = capsys.readouterr().out
    assert "head on cached features: linear probe (L2" in out and "fine-tune all (BatchNorm frozen)" in out
    assert "img/s" in out and "left" in out and "precision: " in out
    assert result.state.probe and len(result.state.history) == 2
    # the fitted head fine-tunes at the backbone's rate: never thrown back to --lr
    last = torch.load(straight / "m_last.pth", weights_only=True)
    rates = {g["name"]: g["initial_lr"] for g in last["optimizer"]["param_groups"]}
    assert rates == {"head": pytest.approx(1e-3), "backbone": pytest.approx(1e-4)}
    head_lr, backbone_lr = (g["lr"] for g in last["optimizer"]["param_groups"])
    assert head_lr == pytest.approx(backbone_lr)
    assert max(r["lr"] for r in result.state.history) <= 1e-4 * 1.0001

    interrupt_when_called(monkeypatch, trainer, "train_one_epoch")  # the first fine-tuning epoch, after the probe
    with pytest.raises(SystemExit):
        run_train(tuned_args(tuning_data, broken, weights_file, "--n_epochs", "2"))
    monkeypatch.undo()
    out = capsys.readouterr().out
    assert "interrupted after the head stage" in out, out
    assert torch.load(broken / "m_last.pth", weights_only=True)["train_state"]["probe"]
    resumed = run_train(["--resume", str(broken / "m_last.pth")])
    assert "head on cached features: linear probe" not in capsys.readouterr().out  # not fitted again
    a = torch.load(straight / "m_last.pth", weights_only=True)["state_dict"]
    b = torch.load(broken / "m_last.pth", weights_only=True)["state_dict"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    assert [r["valid_loss"] for r in resumed.state.history] == pytest.approx(
        [r["valid_loss"] for r in result.state.history], rel=1e-5
    )


def test_unfreeze_after_keeps_the_fitted_head_at_the_backbone_rate(tiny_data, tmp_path, weights_file, capsys):
    result = run_train(tuned_args(tiny_data, tmp_path, weights_file, "--n_epochs", "3", "--unfreeze_after", "1"))
    rows = result.state.history
    assert max(r["lr"] for r in rows[1:]) <= 1e-4 * 1.0001  # after unfreezing: the backbone's rate (--lr 1e-3)
    factor = lambda step: stages.settled_head_factor(step, lambda s: 1.0, settled_from=10, scale=0.1)
    assert factor(9) == 1.0 and factor(10) == 0.1
    assert not result.state.probe
    out = capsys.readouterr().out
    assert "fine-tuning improved validation loss" in out or "kept head-only epoch 1" in out, out


def test_batchnorm_policies():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 8, 8))
    ml.set_train_mode(model, "4", backbone_frozen=False, batchnorm="frozen")
    assert model[0].training and model[4].training and not model[1].training
    ml.set_train_mode(model, "4", backbone_frozen=False, batchnorm="train")
    assert model[1].training
    # re-estimated: the plain mean and variance of the convolution's outputs over all batches
    batches = [torch.randn(8, 3, 8, 8) * 2 + 1 for _ in range(3)]
    model.eval()
    assert ml.reestimate_batchnorm(model, batches)
    with torch.no_grad():
        conv = [model[0](b) for b in batches]
    # the plain average of the batches' statistics (no momentum: the first batch weighs as much as the last)
    assert torch.allclose(model[1].running_mean, torch.stack([c.mean((0, 2, 3)) for c in conv]).mean(0), atol=1e-5)
    assert torch.allclose(model[1].running_var, torch.stack([c.var((0, 2, 3)) for c in conv]).mean(0), rtol=1e-4)
    assert not model.training and model[1].momentum == 0.1
    # stopped part-way: the statistics are put back
    before = model[1].running_mean.clone()
    assert not ml.reestimate_batchnorm(model, [b * 5 for b in batches], stop=lambda: True)
    assert torch.equal(model[1].running_mean, before)


def test_discriminative_rates_grow_towards_the_head():
    model, head = ml.build_model("resnet18", 3, log=lambda *a: None)
    groups = ml.param_groups(model, head, 1e-3, 0.1, 0.0, layer_decay=0.5)
    assert groups[0]["name"] == "head" and groups[0]["lr"] == 1e-3
    rates = [g["lr"] for g in groups[1:]]  # the top block first
    assert rates[0] == pytest.approx(1e-4) and all(b == pytest.approx(a * 0.5) for a, b in zip(rates, rates[1:]))
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    names = [n for n, _ in model.named_parameters()]
    assert groups[-1]["params"][0] is dict(model.named_parameters())[names[0]]  # conv1: the slowest
    # a model whose backbone is one tensor has no blocks: one error line from train.py, a fallback when unasked
    toy = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 2))
    args = argparse.Namespace(
        batchnorm=None, layer_decay=0.7, no_probe=False, freeze=False, unfreeze_after=0, model_name="toy"
    )
    with pytest.raises(train.CLIError, match="--layer_decay: toy's backbone blocks could not be told apart"):
        train.fine_tuning(args, toy, "1", True)
    args.layer_decay = None
    assert train.fine_tuning(args, toy, "1", True) == (True, "train", 1.0)
    args.batchnorm = "frozen"
    with pytest.raises(train.CLIError, match="--batchnorm frozen: toy has no BatchNorm layers"):
        train.fine_tuning(args, toy, "1", True)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--augment", "heavy"], "argument --augment: invalid choice: 'heavy'"),
        (["--batchnorm", "frozen", "--model_name", "squeezenet"], "squeezenet has no BatchNorm layers"),
        (["--freeze", "--batchnorm", "reestimate"], "--freeze keeps the backbone as it is"),
        (["--layer_decay", "1.5"], "--layer_decay must be in (0, 1]"),
    ],
)
def test_fine_tuning_flags_refuse_what_cannot_apply(tiny_data, tmp_path, argv, fragment, capsys):
    args = [
        "--data_dir",
        tiny_data,
        "--input_size",
        "32",
        "--model_fn",
        tmp_path / "m.pth",
        "--log_dir",
        tmp_path / "r",
        "--model_name",
        "resnet18",
        *argv,
    ]
    if argv[0] == "--augment":  # argparse's own message, from the script as a user runs it
        proc = run_script("train.py", *args)
        assert proc.returncode == 2 and fragment in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        return
    assert fragment in run_in_process(train, args, capsys)
    assert not (tmp_path / "m.pth").exists()


def test_augmentation_policies_keep_the_image_and_turn_it_when_asked():
    img = Image.new("RGB", (40, 40))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # a red top-left quarter: where it lands shows the turn
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    evaluated = dl.build_transforms(32, 32, mean, std, train=False)(img)
    assert torch.equal(dl.build_transforms(32, 32, mean, std, train=True, augment="none")(img), evaluated)
    turned = dl.build_transforms(32, 32, mean, std, train=True, augment="none", any_orientation=True)
    corners = set()
    for seed in range(40):
        torch.manual_seed(seed)
        x = turned(img)
        corners.add(tuple(int(x[0, r, c] > 0.5) for r, c in ((0, 0), (0, 31), (31, 0), (31, 31))))
    assert corners == {(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1)}
    upright = dl.build_transforms(32, 32, mean, std, train=True, augment="none")
    assert all(upright(img)[0, 0, 0] > 0.5 for _ in range(5))
    for policy in ("light", "default", "strong"):
        torch.manual_seed(0)
        x = dl.build_transforms(32, 36, mean, std, train=True, augment=policy)(img)
        assert x.shape == (3, 32, 32)


def test_the_probe_penalises_weights_and_never_biases():
    """One huge L2 on 80/20 classes: the weights go to about 0 and the bias alone fits the class shares, so the
    softmax of the bias is about 0.8/0.2 (a penalised bias would be pulled to 0, giving 0.5/0.5)."""
    torch.manual_seed(0)
    x = torch.randn(100, 8)
    y = torch.tensor([0] * 80 + [1] * 20)
    head = nn.Linear(8, 2)
    probe.fit_head(head, x, y, nn.CrossEntropyLoss(), l2=1e6)
    assert head.weight.abs().max() < 1e-4
    assert torch.allclose(head.bias.detach().softmax(0), torch.tensor([0.8, 0.2]), atol=1e-3)


def test_automatic_bf16_trains_the_backbone_epochs_only(tuning_data, tmp_path, weights_file, monkeypatch):
    """Without --amp/--no_amp, fine-tuning steps run in bf16 where the CPU computes it natively (fp32 elsewhere);
    head-only epochs (and validation) always in fp32."""
    import utils

    seen = []
    real = utils.Compute.autocast

    def recording(self, train=False):
        seen.append((train, (self.train_amp_dtype or self.amp_dtype) if train else self.amp_dtype))
        return real(self, train)

    monkeypatch.setattr(utils.Compute, "autocast", recording)
    steps = []
    real_step = trainer.train_step

    def counting(*a, **k):
        steps.append(k.get("whole", a[9] if len(a) > 9 else False))
        return real_step(*a, **k)

    monkeypatch.setattr(trainer, "train_step", counting)
    run_train(
        tuned_args(
            tuning_data, tmp_path, weights_file, "--n_epochs", "2", "--unfreeze_after", "1", "--no_feature_cache"
        )
    )
    native = utils.native_bf16(torch.device("cpu"))
    assert steps.count(False) == 6 and steps.count(True) == 6  # 48 images, batches of 8: head epoch, then all
    training = {dtype for train, dtype in seen if train}
    assert training == {torch.bfloat16 if native else None}
    assert {dtype for train, dtype in seen if not train} == {None}
