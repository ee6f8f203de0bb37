import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import cli
import data_loader as dl
import features
import model_loader as ml
import run_log
import stages
import tasks
import train
import trainer
import utils
from conftest import ROOT
from helpers import interrupt_when_called
from utils import DistInfo


def fast_args(data, tmp_path, *extra):
    return [
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
        "0",
        "--model_fn",
        tmp_path / "m.pth",
        "--log_dir",
        tmp_path / "run",
        *extra,
    ]


def run_train(*argv):
    return train.main(train.parse_args([str(a) for a in argv]))


def test_lr_schedule_warms_up_decays_and_restarts_per_phase():
    phases = [(0, 100), (100, 100)]
    f = [stages.lr_factor(s, phases, 0.1, "cosine") for s in range(200)]
    assert f[0] < f[5] < f[10] and f[10] == pytest.approx(1.0, abs=0.02)
    assert f[50] < f[20] and f[99] == pytest.approx(0.01, abs=0.01)
    assert f[100] < 0.2 and f[110] == pytest.approx(1.0, abs=0.02)  # warm-up again after unfreezing
    assert stages.lr_factor(50, [(0, 100)], 0.1, "constant") == 1.0


def test_head_takes_features_only_when_the_classifier_is_last():
    resnet, head = ml.build_model("resnet18", 3, log=print)
    squeeze, shead = ml.build_model("squeezenet1_0", 3, log=print)
    cpu = torch.device("cpu")
    assert features.head_takes_features(resnet, head, 32, cpu)
    assert not features.head_takes_features(squeeze, shead, 64, cpu)


def cache_setup(tiny_data, tmp_path, budget_mb=64):
    torch.manual_seed(0)
    model, head = ml.build_model("resnet18", 3, log=print)
    splits = dl.build_splits(tiny_data, 0.25, 0)
    loaders = dl.build_loaders(splits, 32, 36, dl.IMAGENET_MEAN, dl.IMAGENET_STD, 8, 0, seed=0)
    compute = utils.Compute(torch.device("cpu"), dist=DistInfo())
    skips = dl.SkipLog(splits.train, splits.class_names, print)
    cache = features.build_feature_cache(model, head, loaders, 1, budget_mb, tmp_path / "cache.bin", compute, skips)
    return model, splits, loaders, cache


def test_the_feature_cache_writes_progress_lines_to_a_log(tiny_data, tmp_path, monkeypatch):
    """A busy machine may take a minute over the backbone pass: where no bar shows, lines say how far it is."""
    import io

    log = io.StringIO()
    real = features.Progress
    monkeypatch.setattr(features, "Progress", lambda *a, **k: real(*a, **{**k, "every": 0, "out": log}))
    model, head = ml.build_model("resnet18", 3, log=print)
    splits = dl.build_splits(tiny_data, 0.25, 0)
    loaders = dl.build_loaders(splits, 32, 36, dl.IMAGENET_MEAN, dl.IMAGENET_STD, 8, 0, seed=0)
    compute = utils.Compute(torch.device("cpu"), dist=DistInfo(), progress=True)
    features.build_feature_cache(
        model, head, loaders, 1, 64, tmp_path / "c.bin", compute, dl.SkipLog(splits.train, splits.class_names, print)
    )
    lines = log.getvalue().splitlines()
    n = len(splits.train) + len(splits.valid)
    assert lines[0].startswith("feature cache: 8/48 images (17%),") and lines[-1].startswith(f"feature cache: {n}/{n}")


def test_cached_features_equal_the_frozen_backbone_output(tiny_data, tmp_path):
    model, splits, loaders, cache = cache_setup(tiny_data, tmp_path)
    assert cache.location == "memory" and cache.train.shape == (1, len(splits.train), 512)
    assert bool(cache.train_ok.all()) and bool(cache.valid_ok.all())
    backbone = nn.Sequential(*list(model.children())[:-1], nn.Flatten()).eval()  # resnet without fc
    tf = dl.build_transforms(32, 36, dl.IMAGENET_MEAN, dl.IMAGENET_STD, train=False)
    with torch.no_grad():
        for i in (0, 7, len(splits.train) - 1):
            expected = backbone(tf(dl.load_rgb(splits.train[i][0]))[None])[0]
            assert torch.allclose(cache.train[0, i], expected, atol=1e-5)
        expected = backbone(tf(dl.load_rgb(splits.valid[3][0]))[None])[0]
        assert torch.allclose(cache.valid[0, 3], expected, atol=1e-5)


def test_feature_cache_spills_to_a_file_past_its_memory_budget(tiny_data, tmp_path):
    _, _, _, in_memory = cache_setup(tiny_data, tmp_path / "a", budget_mb=64)
    _, _, _, spilled = cache_setup(tiny_data, tmp_path / "b", budget_mb=0)
    assert spilled.location == str(tmp_path / "b" / "cache.bin")
    assert (tmp_path / "b" / "cache.bin").stat().st_size == spilled.train.numel() * 4
    assert torch.allclose(spilled.train, in_memory.train, atol=1e-6)


def test_head_epoch_on_cached_features_equals_the_loop_through_the_backbone(tiny_data, tmp_path):
    """Same images (eval view), same order, same batches: identical head weights, cached or not."""
    model, splits, loaders, cache = cache_setup(tiny_data, tmp_path)
    head = "fc"
    ml.set_backbone_trainable(model, head, False)
    compute = utils.Compute(torch.device("cpu"), dist=DistInfo())
    labels = torch.tensor([y for _, y in splits.train])
    results = []
    for cached in (True, False):
        torch.manual_seed(1)
        model.fc.reset_parameters()
        opt = torch.optim.SGD(model.fc.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        sampler = dl.TrainSampler(len(splits.train), seed=3)
        sampler.set_epoch(0)
        if cached:
            metrics = trainer.train_head_epoch(
                model.fc,
                cache,
                labels,
                sampler,
                8,
                opt,
                sched,
                scaler,
                nn.CrossEntropyLoss(),
                compute,
                0,
                tasks.SingleLabel(),
            )
        else:
            eval_view = dl.make_loader(loaders.train_eval.dataset, 8, sampler, 0)
            ml.set_train_mode(model, head, backbone_frozen=True)
            skips = dl.SkipLog(splits.train, splits.class_names, print)
            metrics = trainer.train_one_epoch(
                model, eval_view, opt, sched, scaler, nn.CrossEntropyLoss(), compute, skips
            )
        results.append((metrics, model.fc.weight.detach().clone()))
    (m1, w1), (m2, w2) = results
    assert torch.allclose(w1, w2, atol=1e-5)
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5) and m1["count"] == m2["count"] == len(splits.train)


def test_feature_cache_accuracy_parity_with_the_uncached_loop(tiny_data, tmp_path):
    """A backbone that knows the images (fine-tuned briefly, passed as --weights), then the head alone:
    cached and uncached reach the same validation accuracy within noise."""
    run_train(*fast_args(tiny_data, tmp_path / "donor", "--n_epochs", "4", "--patience", "0"))
    common = ["--freeze", "--n_epochs", "5", "--patience", "0", "--weights", tmp_path / "donor" / "m.pth"]
    cached = run_train(*fast_args(tiny_data, tmp_path / "c", *common))
    plain = run_train(*fast_args(tiny_data, tmp_path / "p", *common, "--no_feature_cache"))
    assert cached.cache_note.startswith("feature cache") and not plain.cache_note
    a, b = cached.state.history[-1], plain.state.history[-1]
    assert a["valid_accuracy"] >= 0.6 and b["valid_accuracy"] >= 0.6
    assert abs(a["valid_accuracy"] - b["valid_accuracy"]) <= 0.2
    assert a["valid_count"] == b["valid_count"] == 9


def test_frozen_training_changes_only_the_head(tiny_data, tmp_path):
    run_train(*fast_args(tiny_data, tmp_path, "--freeze", "--n_epochs", "2"))
    last = torch.load(tmp_path / "m_last.pth", weights_only=True)
    assert [len(g["params"]) for g in last["optimizer"]["param_groups"]] == [2]  # fc.weight, fc.bias only
    ckpt = ml.load_checkpoint(tmp_path / "m.pth")
    torch.manual_seed(42)  # the same seed train.py builds the model with
    fresh, _ = ml.build_model("resnet18", 3, log=print)
    for k, v in fresh.state_dict().items():
        if k.startswith("fc."):
            assert not torch.equal(v, ckpt["state_dict"][k])
        else:
            assert torch.equal(v, ckpt["state_dict"][k]), k  # weights and BatchNorm statistics untouched


def test_unfreeze_after_trains_head_then_everything(tiny_data, tmp_path):
    result = run_train(*fast_args(tiny_data, tmp_path, "--unfreeze_after", "1", "--n_epochs", "2", "--patience", "0"))
    assert [row["epoch"] for row in result.state.history] == [1, 2]
    ckpt = ml.load_checkpoint(tmp_path / "m_last.pth")
    torch.manual_seed(42)
    fresh, _ = ml.build_model("resnet18", 3, log=print)
    assert not torch.equal(fresh.conv1.weight, ckpt["state_dict"]["conv1.weight"])


def test_early_stopping_and_metrics_csv(tiny_data, tmp_path):
    result = run_train(
        *fast_args(
            tiny_data,
            tmp_path,
            "--freeze",
            "--n_epochs",
            "30",
            "--patience",
            "1",
            "--lr",
            "0.5",
            "--lr_schedule",
            "constant",
        )
    )
    assert result.stopped_early and len(result.state.history) < 30
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, len(result.state.history) + 1))
    assert set(rows[0]) == {"epoch", "train_loss", "train_accuracy", "valid_loss", "valid_accuracy", "lr", "seconds"}
    ckpt = ml.load_checkpoint(tmp_path / "m.pth")
    assert ckpt["epoch"] == result.state.best_epoch
    assert ckpt["metrics"]["valid_loss"] == pytest.approx(min(float(r["valid_loss"]) for r in rows))


def test_learning_happens_on_real_images(tmp_path):
    """Two easy Fashion-MNIST classes from the shipped sample: well above chance in a few epochs."""
    from conftest import copy_subset

    data = copy_subset(tmp_path / "easy", ["bag", "trouser"], 40, 20)
    result = run_train(*fast_args(data, tmp_path, "--n_epochs", "4", "--patience", "0"))
    assert result.state.best_metrics["valid_accuracy"] >= 0.8
    assert result.test_metrics["accuracy"] >= 0.8 and result.test_metrics["count"] == 40


def test_amp_and_channels_last_paths_run_on_cpu(tiny_data, tmp_path):
    result = run_train(*fast_args(tiny_data, tmp_path, "--amp", "--n_epochs", "1"))
    assert math.isfinite(result.state.history[0]["train_loss"])
    cpu = torch.device("cpu")
    assert (utils.amp_dtype_for(cpu, True) is torch.bfloat16) == utils.cpu_has_fast_bf16()
    # the bf16 autocast path itself, whatever this CPU's speed at it
    # on a CPU without bf16 instructions training steps stay NCHW (faster there); with them, and on GPUs,
    # channels_last; forward-only passes go channels_last everywhere
    assert trainer.train_channels_last(cpu, True) == utils.cpu_has_fast_bf16()
    assert trainer.train_channels_last(torch.device("cuda"), True) and not trainer.train_channels_last(cpu, False)
    # the default precision: bf16 only for fine-tuning steps, and only where the hardware has it
    forward, steps, words = utils.precision_for(cpu, None)
    assert forward is None and (steps is torch.bfloat16) == utils.cpu_has_fast_bf16(), words
    assert utils.precision_for(cpu, False)[:2] == (None, None)
    assert utils.precision_for(cpu, True)[0] is utils.amp_dtype_for(cpu, True)
    fine_tune = utils.Compute(cpu, None, train_amp_dtype=torch.bfloat16, dist=DistInfo())
    with fine_tune.autocast(train=True):
        assert nn.Linear(4, 2)(torch.randn(1, 4)).dtype == torch.bfloat16
    with fine_tune.autocast():
        assert nn.Linear(4, 2)(torch.randn(1, 4)).dtype == torch.float32
    on_cpu = utils.Compute(cpu, channels_last=True, train_channels_last=False, dist=DistInfo())
    assert on_cpu.to_device(torch.randn(2, 3, 8, 8)).is_contiguous(memory_format=torch.channels_last)
    assert not on_cpu.to_device(torch.randn(2, 3, 8, 8), train=True).is_contiguous(memory_format=torch.channels_last)
    # the channels_last training path (as on GPUs) with the bf16 autocast path, whatever this CPU's speed at them
    compute = utils.Compute(cpu, torch.bfloat16, channels_last=True, train_channels_last=True, dist=DistInfo())
    x = compute.to_device(torch.randn(2, 3, 8, 8), train=True)
    assert x.is_contiguous(memory_format=torch.channels_last)
    with compute.autocast():
        assert nn.Linear(4, 2)(torch.randn(1, 4)).dtype == torch.bfloat16
    model, head = ml.build_model("resnet18", 3, log=print)
    model = model.to(memory_format=torch.channels_last)
    formats = []
    model.register_forward_pre_hook(
        lambda m, args: formats.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    splits = dl.build_splits(tiny_data, 0.25, 0)
    loaders = dl.build_loaders(splits, 32, 36, dl.IMAGENET_MEAN, dl.IMAGENET_STD, 8, 0, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    metrics = trainer.train_one_epoch(
        model,
        loaders.train,
        opt,
        sched,
        torch.amp.GradScaler("cpu", enabled=False),
        nn.CrossEntropyLoss(),
        compute,
        dl.SkipLog(splits.train, [], print),
    )
    assert math.isfinite(metrics["loss"]) and metrics["count"] == len(splits.train)
    assert formats and all(formats)


def test_inference_rewrite_keeps_the_probabilities():
    model, _ = ml.build_model("resnet18", 3, log=print)
    model.eval()
    for m in model.modules():  # non-trivial BatchNorm statistics, so folding has work to do
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    fast = ml.optimize_for_inference(model, channels_last=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        p1 = model(x).softmax(1)
        p2 = fast(x.contiguous(memory_format=torch.channels_last)).softmax(1)
    assert torch.allclose(p1, p2, atol=1e-5)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched


def test_cache_views_hold_distinct_augmented_views(tiny_data, tmp_path):
    model, head = ml.build_model("resnet18", 3, log=print)
    splits = dl.build_splits(tiny_data, 0.25, 0)
    loaders = dl.build_loaders(splits, 32, 36, dl.IMAGENET_MEAN, dl.IMAGENET_STD, 8, 0, seed=0)
    compute = utils.Compute(torch.device("cpu"), dist=DistInfo())
    skips = dl.SkipLog(splits.train, splits.class_names, print)
    first = features.build_feature_cache(model, head, loaders, 3, 64, tmp_path / "c.bin", compute, skips)
    again = features.build_feature_cache(model, head, loaders, 3, 64, tmp_path / "c.bin", compute, skips)
    assert first.train.shape == (3, len(splits.train), 512) and bool(first.train_ok.all())
    assert not torch.allclose(first.train[0], first.train[1])  # different augmentations
    assert torch.equal(first.train, again.train)  # seeded per image and view: reproducible
    result = run_train(*fast_args(tiny_data, tmp_path, "--freeze", "--cache_views", "3", "--n_epochs", "2"))
    assert "feature cache" in result.cache_note and len(result.state.history) == 2


FAULTS_PER_FORWARD = """
import resource, sys
import torch, torchvision
import cli
def measure():
    model = torchvision.models.resnet18(num_classes=4).eval()
    x = torch.randn(16, 3, 112, 112)
    with torch.inference_mode():
        model(x), model(x)
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(3):
            model(x)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
if sys.argv[1] == "cli":
    cli.run_cli(measure)  # what train.py and predict.py run under
else:
    measure()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_cli_keeps_activation_memory_mapped_between_batches(tmp_path):
    """Under run_cli, repeated forward passes reuse the heap instead of faulting fresh pages in."""
    script = tmp_path / "faults.py"
    script.write_text(FAULTS_PER_FORWARD)
    env = {k: v for k, v in os.environ.items() if not k.startswith(cli.ALLOCATOR_ENV)}

    def faults(mode, **extra):
        out = subprocess.run(
            [sys.executable, str(script), mode],
            env={**env, "PYTHONPATH": str(ROOT), **extra},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return int(out.split()[-1])

    plain, tuned = faults("plain"), faults("cli")
    assert tuned * 10 < plain, (plain, tuned)
    assert faults("cli", MALLOC_TOP_PAD_="0") * 10 > plain  # a user's own malloc settings are left alone


def test_short_epochs_write_checkpoints_at_most_every_save_interval(tiny_data, tmp_path, monkeypatch):
    """Cached head epochs take milliseconds: the checkpoints are written after the first epoch and at the end
    only, and hold the same as a run that writes after every epoch."""
    writes = []
    real = run_log.atomic_torch_save
    monkeypatch.setattr(
        run_log, "atomic_torch_save", lambda obj, path: (writes.append(Path(path).name), real(obj, path))
    )
    throttled = run_train(*fast_args(tiny_data, tmp_path / "a", "--freeze", "--n_epochs", "4", "--patience", "0"))
    # epoch 1, then the last epoch, then the head stage's choice (written at once), then the best once more with
    # its fitted temperature
    assert writes == ["m.pth", "m_last.pth"] * 3 + ["m.pth"], writes
    writes.clear()
    every = run_train(
        *fast_args(tiny_data, tmp_path / "b", "--freeze", "--n_epochs", "4", "--patience", "0", "--save_interval", "0")
    )
    assert writes.count("m_last.pth") == 5 and writes.count("m.pth") >= 2, writes  # after every epoch, and the head
    assert throttled.state.best_epoch == every.state.best_epoch
    for name in ("m.pth", "m_last.pth"):
        a, b = (torch.load(tmp_path / d / name, weights_only=True) for d in "ab")
        assert a["epoch"] == b["epoch"] and a["metrics"] == b["metrics"]
        for k in a["state_dict"]:
            assert torch.equal(a["state_dict"][k], b["state_dict"][k]), (name, k)


# ----------------------------------------------------------------------------- bugs a user would not see


def test_valid_folder_labels_use_the_training_class_order(tmp_path):
    """valid/ holds only some classes: its labels must still index train/'s class list, not its own."""
    from PIL import Image

    for c in ("ant", "bee", "cat"):
        for i in range(2):
            (tmp_path / "train" / c).mkdir(parents=True, exist_ok=True)
            Image.new("L", (8, 8), i).save(tmp_path / "train" / c / f"{i}.png")
    for c in ("bee", "cat"):
        (tmp_path / "valid" / c).mkdir(parents=True)
        Image.new("L", (8, 8), 5).save(tmp_path / "valid" / c / "v.png")
    splits = dl.build_splits(tmp_path, 0.5, 0)
    assert [(Path(p).parent.name, splits.class_names[y]) for p, y in splits.valid] == [("bee", "bee"), ("cat", "cat")]


def test_logged_learning_rate_warms_up_then_decays(tiny_data, tmp_path):
    result = run_train(
        *fast_args(
            tiny_data, tmp_path, "--freeze", "--n_epochs", "6", "--patience", "0", "--warmup", "0.4", "--lr", "0.01"
        )
    )
    lrs = [row["lr"] for row in result.state.history]
    peak = lrs.index(max(lrs))
    assert 0 < peak < 5, lrs  # rises during the warm-up, then falls
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1 : peak + 1])), lrs
    assert all(a > b for a, b in zip(lrs[peak:], lrs[peak + 1 :])), lrs
    assert max(lrs) == pytest.approx(0.01, rel=0.2) and lrs[-1] < 0.002
    csv_lrs = [float(r["lr"]) for r in csv.DictReader(open(tmp_path / "run" / "metrics.csv"))]
    assert csv_lrs == pytest.approx(lrs)


def test_label_smoothing_and_class_weights_change_the_training_loss(tmp_path):
    from conftest import copy_subset

    data = copy_subset(tmp_path / "imb", ["bag"], 24, 1)
    copy_subset(data, ["trouser"], 6, 1)
    common = ["--freeze", "--n_epochs", "1"]
    plain = run_train(*fast_args(data, tmp_path / "plain", *common)).state.history[0]
    smooth = run_train(*fast_args(data, tmp_path / "smooth", *common, "--label_smoothing", "0.3")).state.history[0]
    weighted = run_train(*fast_args(data, tmp_path / "w", *common, "--class_weights", "auto")).state.history[0]
    # the same seed, images, order and initial head: only the loss function differs
    assert abs(smooth["train_loss"] - plain["train_loss"]) > 1e-3
    assert abs(weighted["train_loss"] - plain["train_loss"]) > 1e-3


def test_test_split_is_evaluated_with_the_best_weights_not_the_last(tiny_data, tmp_path, monkeypatch):
    """Epoch 3 is made to look worse on validation, so epoch 2 stays best; the test figures must be those of
    the best checkpoint, although the model trained on for a third epoch."""
    real = trainer.Fitter.run_epoch

    def third_epoch_looks_worse(self, epoch):
        train_metrics, valid = real(self, epoch)
        return train_metrics, (dict(valid, loss=99.0) if epoch == 2 else valid)

    monkeypatch.setattr(trainer.Fitter, "run_epoch", third_epoch_looks_worse)
    result = run_train(*fast_args(tiny_data, tmp_path, "--freeze", "--n_epochs", "3", "--patience", "0", "--no_probe"))
    assert result.state.best_epoch == 2 and result.state.epoch == 3
    best, last = ml.load_checkpoint(tmp_path / "m.pth"), ml.load_checkpoint(tmp_path / "m_last.pth")
    assert not torch.equal(best["state_dict"]["fc.weight"], last["state_dict"]["fc.weight"])
    splits = dl.build_splits(tiny_data, 0.2, 42)
    loaders = dl.build_loaders(splits, 32, 36, dl.IMAGENET_MEAN, dl.IMAGENET_STD, 8, 0, seed=42)
    compute = utils.Compute(torch.device("cpu"), dist=DistInfo())
    scores = {}
    for name, ckpt in (("best", best), ("last", last)):
        model, _ = ml.model_from_checkpoint(ckpt)
        scores[name] = trainer.evaluate(model, loaders.test, compute)
    assert scores["best"]["loss"] != pytest.approx(scores["last"]["loss"], rel=1e-4)
    assert result.test_metrics["loss"] == pytest.approx(scores["best"]["loss"], rel=1e-5)


@pytest.mark.parametrize("extra", [["--no_feature_cache"], []])
def test_frozen_backbone_statistics_never_move(tiny_data, tmp_path, extra):
    """With --freeze the BatchNorm running statistics stay those of the weights file: through the backbone
    (--no_feature_cache) and on cached features alike."""
    weights = tmp_path / "backbone.pth"
    torch.manual_seed(3)
    donor = __import__("torchvision").models.resnet18()
    donor.train()(torch.randn(4, 3, 32, 32))  # non-trivial running statistics
    torch.save(donor.state_dict(), weights)
    run_train(*fast_args(tiny_data, tmp_path, "--freeze", "--n_epochs", "1", "--weights", weights, *extra))
    saved = ml.load_checkpoint(tmp_path / "m.pth")["state_dict"]
    for k, v in donor.state_dict().items():
        if "running_" in k:
            assert torch.equal(saved[k], v), k


def test_resume_refuses_a_checkpoint_that_is_not_a_last_file(tiny_data, tmp_path):
    run_train(*fast_args(tiny_data, tmp_path, "--freeze", "--n_epochs", "1"))
    with pytest.raises(cli.CLIError, match="not a resumable checkpoint"):
        train.parse_args(["--resume", str(tmp_path / "m.pth")])


def test_resume_needs_no_imagenet_weights_and_the_start_line_names_the_weights(
    tiny_data, tmp_path, monkeypatch, capsys
):
    import torchvision

    home = tmp_path / "torch_home"
    cached = home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), cached)
    monkeypatch.setenv("TORCH_HOME", str(home))
    run_train(*fast_args(tiny_data, tmp_path, "--use_pretrained", "--freeze", "--n_epochs", "1", "--verbose", "1"))
    out = capsys.readouterr()
    assert "backbone weights: ImageNet (resnet18-f37072fd.pth" in out.out and "random" not in out.err
    cached.unlink()  # offline, with an empty TORCH_HOME: the checkpoint has the trained weights
    result = run_train("--resume", tmp_path / "m_last.pth", "--n_epochs", "2", "--verbose", "1")
    assert result.state.epoch == 2
    assert f"backbone weights: the resumed checkpoint {tmp_path / 'm_last.pth'}" in capsys.readouterr().out


def test_resuming_an_early_stopped_run_with_more_epochs_trains_them(tiny_data, tmp_path, capsys):
    run_train(*fast_args(tiny_data, tmp_path, "--freeze", "--n_epochs", "1"))
    last = torch.load(tmp_path / "m_last.pth", weights_only=True)
    last["train_state"]["bad_epochs"] = 5  # as after an early stop at the default --patience 5
    last["train_state"]["best_metrics"]["valid_loss"] = -1.0  # and no epoch will do better
    torch.save(last, tmp_path / "m_last.pth")
    result = run_train("--resume", tmp_path / "m_last.pth", "--n_epochs", "3")
    assert result.state.epoch == 3 and not result.stopped_early
    assert "its patience starts again, up to --n_epochs 3" in capsys.readouterr().out
    last = torch.load(tmp_path / "m_last.pth", weights_only=True)
    last["train_state"]["bad_epochs"] = 2  # not stopped at its --patience 5; resumed with a lower one to stop sooner
    torch.save(last, tmp_path / "m_last.pth")
    result = run_train("--resume", tmp_path / "m_last.pth", "--n_epochs", "6", "--patience", "2")
    assert result.state.epoch == 4 and result.stopped_early and "starts again" not in capsys.readouterr().out


def test_freezing_a_random_backbone_is_said(tiny_data, tmp_path, capsys):
    run_train(*fast_args(tiny_data, tmp_path, "--freeze", "--n_epochs", "1", "--verbose", "1"))
    out = capsys.readouterr()
    assert "backbone weights: random initialisation" in out.out
    warnings = [line for line in out.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "random" in warnings[0] and "--use_pretrained" in warnings[0]


def test_interrupt_before_the_first_epoch_ends_saves_nothing(tiny_data, tmp_path, monkeypatch, capsys):
    """A real SIGINT during the first training step: the run says nothing was trained."""
    interrupt_when_called(monkeypatch, trainer, "train_step")
    with pytest.raises(SystemExit) as e:
        run_train(*fast_args(tiny_data, tmp_path, "--n_epochs", "2"))
    assert e.value.code == 130
    out = capsys.readouterr().out
    assert "nothing was trained yet" in out and "--resume" not in out
    assert not (tmp_path / "m_last.pth").exists() and not (tmp_path / "m.pth").exists()


def test_prediction_grid_shows_every_class_and_the_truth_when_wrong(tiny_data):
    splits = dl.build_splits(tiny_data, 0.5, 0)  # valid sorted by class: bag..., sneaker..., trouser...
    assert [y for _, y in run_log.spread_over_classes(splits.valid, 5)] == [0, 1, 2, 0, 1]

    class AlwaysBag(nn.Module):
        def forward(self, x):
            return torch.tensor([[5.0, 0.0, 0.0]]).expand(len(x), 3)

    meta = {"input_size": 32, "resize_size": 36, "mean": dl.IMAGENET_MEAN, "std": dl.IMAGENET_STD}
    fig = run_log.prediction_grid(
        AlwaysBag(),
        splits.valid,
        splits.class_names,
        meta,
        utils.Compute(torch.device("cpu"), dist=DistInfo()),
        tasks.SingleLabel(),
        n=6,
    )
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == 6 and all(t.startswith("bag ") for t in titles)
    assert sum("true: sneaker" in t for t in titles) == 2 and sum("true: trouser" in t for t in titles) == 2
    assert sum("true:" in t for t in titles) == 4


def test_a_stop_signal_during_the_final_evaluation_ends_with_its_status(tiny_data, tmp_path, monkeypatch, capsys):
    """SIGINT after the last epoch (calibration, test pass): the written files stand, and the exit says so."""
    import evaluation

    interrupt_when_called(monkeypatch, evaluation, "collect_logits")
    with pytest.raises(SystemExit) as e:
        run_train(*fast_args(tiny_data, tmp_path, "--freeze", "--n_epochs", "1"))
    assert e.value.code == 130
    assert "interrupted at the end of training" in capsys.readouterr().out
    assert ml.load_checkpoint(tmp_path / "m.pth")["epoch"] == 1
