"""stages.py: the plan of a run's stages, the head stage (the linear probe against the SGD head, the better kept, in
--freeze runs and before fine-tuning), skipping a fine-tune with nothing to gain, the schedule's phases and the time
left from epochs alike."""

import csv
import math
import time

import pytest
import torch

import stages
import train
import trainer
from probe import ProbeResult


def run_train(*argv):
    return train.main(train.parse_args([str(a) for a in argv]))


def args(data, out, *extra, weights=None):
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
        "1",
        "--model_fn",
        out / "m.pth",
        "--log_dir",
        out / "run",
        "--ood_method",
        "none",
        *(["--weights", weights] if weights else []),
        *extra,
    ]


# ----------------------------------------------------------------------------- the head stage


def test_choose_head_keeps_the_lower_validation_loss_and_says_which():
    probe_result = ProbeResult(0.01, 0.2, {"loss": 0.30, "accuracy": 0.9, "count": 10}, 1.0)
    sgd = {"epoch": 7, "epochs": 9, "train_loss": 0.1, "valid": {"loss": 0.25, "accuracy": 0.8, "count": 10}}
    choice = stages.choose_head(probe_result, sgd, lambda valid: {})
    assert choice.kept == "sgd" and choice.metrics["valid_loss"] == 0.25 and choice.metrics["valid_accuracy"] == 0.8
    assert choice.summary() == "kept the SGD head: validation loss 0.2500 (epoch 7) against the linear probe's 0.3000"
    sgd["valid"]["loss"] = 0.35
    choice = stages.choose_head(probe_result, sgd, lambda valid: {})
    assert choice.kept == "probe" and choice.metrics["train_loss"] == 0.2 and choice.record()["sgd_epoch"] == 7
    assert choice.summary() == "kept the linear probe: validation loss 0.3000 against the SGD head's 0.3500 (epoch 7)"
    assert stages.choose_head(probe_result, {}, lambda valid: {}).kept == "probe"  # no SGD epoch finished


def test_freeze_ends_with_the_better_of_its_best_epoch_and_the_probe(tiny_data, tmp_path, capsys):
    """--freeze: after the SGD epochs the probe is fitted on the same cached features; the lower validation loss is
    the checkpoint, and the summary says which. --no_probe keeps the SGD epochs alone."""
    sgd = run_train(*args(tiny_data, tmp_path / "sgd", "--freeze", "--n_epochs", "2", "--no_probe"))
    capsys.readouterr()
    both = run_train(*args(tiny_data, tmp_path / "both", "--freeze", "--n_epochs", "2"))
    out = capsys.readouterr().out
    record = both.state.probe
    assert not sgd.state.probe and record["sgd_valid_loss"] == pytest.approx(sgd.state.best_loss)  # the same epochs
    same = [{k: v for k, v in r.items() if k != "seconds"} for r in (*both.state.history, *sgd.state.history)]
    assert record["sgd_epoch"] == sgd.state.best_epoch and same[:2] == same[2:]
    kept = "probe" if record["probe_valid_loss"] < record["sgd_valid_loss"] else "sgd"
    assert record["kept"] == kept and both.state.best_loss == min(record["probe_valid_loss"], record["sgd_valid_loss"])
    assert f"kept the {'linear probe' if kept == 'probe' else 'SGD head'}: validation loss" in out
    assert "head on cached features: linear probe (L2" in out and "frozen backbone, head only (SGD epochs" in out
    saved = torch.load(tmp_path / "both" / "m.pth", weights_only=True)
    assert saved["metrics"]["valid_loss"] == pytest.approx(both.state.best_loss)
    assert (both.state.best_epoch == 0) == (kept == "probe")


def test_the_fine_tune_starts_from_the_head_freeze_would_end_with(tuning_data, tmp_path, weights_file, capsys):
    """The default fine-tune's head stage trains the SGD head exactly as a --freeze run (same epochs, same best), fits
    the probe, and fine-tunes from the better: so it never starts below --freeze, and keeps that head when
    fine-tuning does not beat it."""
    frozen = run_train(
        *args(tuning_data, tmp_path / "frozen", "--freeze", "--n_epochs", "3", "--no_probe", weights=weights_file)
    )
    tuned = run_train(*args(tuning_data, tmp_path / "tuned", "--n_epochs", "3", weights=weights_file))
    record = tuned.state.probe
    assert record["sgd_valid_loss"] == pytest.approx(frozen.state.best_loss, rel=1e-6)
    assert record["sgd_epoch"] == frozen.state.best_epoch
    assert record["valid_loss"] == min(record["sgd_valid_loss"], record["probe_valid_loss"])
    assert tuned.state.best_loss <= record["valid_loss"] and len(tuned.state.history) == 3  # it did fine-tune
    assert "kept the" in capsys.readouterr().out


def test_a_fine_tune_with_nothing_to_gain_stops_after_the_head_stage(tiny_data, tmp_path, weights_file, capsys):
    """These three easy classes: the head on the frozen backbone already gets every validation image right, so the
    run says why and ends with that head instead of spending 17x a --freeze run's time on fine-tuning; a resume of
    it fine-tunes nothing either."""
    result = run_train(*args(tiny_data, tmp_path, "--n_epochs", "3", weights=weights_file))
    out = capsys.readouterr().out
    assert result.state.probe["valid_accuracy"] == 1.0 and result.state.history == [] and result.state.epoch == 0
    line = [ln for ln in out.splitlines() if ln.startswith("fine-tuning skipped")]
    assert len(line) == 1 and "already gets all 9 validation images right" in line[0], out  # said once
    assert "(--no_probe fine-tunes anyway)" in line[0] and "best: the " in out
    resumed = run_train("--resume", tmp_path / "m_last.pth")
    assert resumed.state.history == [] and "fine-tuning skipped" in capsys.readouterr().out
    plan = stages.StagePlan(
        trainer.FitConfig(n_epochs=3, frozen_epochs=0, lr=1e-3, backbone_lr_scale=0.1, probe=True), 0, True, True, 1, 1
    )
    assert plan.nothing_to_gain({"valid_accuracy": 0.99, "valid_loss": 0.1, "valid_count": 100}) == ""
    assert plan.nothing_to_gain({"valid_accuracy": 1.0, "valid_loss": 0.1, "valid_count": 0}) == ""


# ----------------------------------------------------------------------------- the schedule


def test_a_later_phase_warms_up_from_its_own_first_step():
    """Two phases of 100 steps, 10% warm-up: step 100 is the second phase's first warm-up step, exactly as step 0
    is the first's."""
    phases = [(0, 100), (100, 100)]
    factor = [stages.lr_factor(s, phases, 0.1, "cosine") for s in range(200)]
    assert factor[0] == factor[100] == 1 / 11 and factor[5] == factor[105] == 6 / 11
    assert factor[10] == factor[110] == 1.0


def test_the_freeze_run_and_the_head_stage_build_the_same_optimizer(tiny_data):
    import data_loader as dl
    import model_loader as ml

    model, head = ml.build_model("resnet18", 3, log=lambda *a: None)
    config = trainer.FitConfig(n_epochs=4, frozen_epochs=4, lr=1e-3, backbone_lr_scale=0.1)
    plan = stages.StagePlan(config, 4, False, True, 5, 7)
    _, frozen = plan.optimizer(model, head)
    tuning = stages.StagePlan(
        trainer.FitConfig(n_epochs=4, frozen_epochs=0, lr=1e-3, backbone_lr_scale=0.1, probe=True), 0, True, True, 5, 7
    )
    _, head_stage = tuning.optimizer(model, head, head_only=True)
    for step in (0, 1, 7, 19):
        assert frozen.lr_lambdas[0](step) == head_stage.lr_lambdas[0](step)
    _, fine = tuning.optimizer(model, head)
    assert len(fine.lr_lambdas) == 2 and fine.lr_lambdas[0](3) == pytest.approx(0.1 * fine.lr_lambdas[1](3))
    assert dl.IMAGENET_MEAN  # the module imports stay used


# ----------------------------------------------------------------------------- the time left


def test_the_time_left_comes_from_epochs_alike():
    clock = stages.EpochClock()
    assert clock.left([stages.HEAD] * 3) == "0:00 left + 3 head epochs not timed yet"
    clock.add(stages.HEAD, 0.1)
    clock.add(stages.HEAD, 0.3)
    clock.add(stages.WHOLE, 30.0)
    assert clock.left([stages.HEAD] * 10 + [stages.WHOLE] * 2) == "1:02 left"
    fresh = stages.EpochClock()
    fresh.add(stages.FROZEN, 12.0)
    assert fresh.left([stages.FROZEN, stages.WHOLE, stages.WHOLE]) == "0:12 left + 2 fine-tuning epochs not timed yet"
    assert stages.pace(stages.HEAD, {"count": 900}, {"count": 100}, 0.01) == "100000 cached features/s"
    assert stages.pace(stages.WHOLE, {"count": 90}, {"count": 10}, 10.0) == "10.0 img/s"


def test_the_first_cached_epoch_does_not_count_the_cache_build(tiny_data, tmp_path, monkeypatch, capsys):
    """The cache's build has its own line; the epoch it happened in is timed without it, so its time left is not
    the build's time times the epochs left ('22:10 left' for 19 s)."""
    real = trainer.build_feature_cache

    def slow_build(*a, **k):
        time.sleep(1.5)
        cache = real(*a, **k)
        cache.seconds += 1.5
        return cache

    monkeypatch.setattr(trainer, "build_feature_cache", slow_build)
    run_train(*args(tiny_data, tmp_path, "--freeze", "--n_epochs", "20", "--patience", "0", "--no_probe"))
    out = capsys.readouterr().out
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        seconds = [float(r["seconds"]) for r in csv.DictReader(f)]
    assert len(seconds) == 20 and seconds[0] < 1.0, seconds
    first = next(line for line in out.splitlines() if line.startswith("epoch 1/20"))
    assert "cached features/s" in first and math.isfinite(seconds[0])
    left = first.split("cached features/s, ")[1].split(" left")[0]
    minutes, secs = map(int, left.split(":"))
    assert minutes * 60 + secs < 19, first  # the build alone would have made it 19 x 1.5 s = 0:28
