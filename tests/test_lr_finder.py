"""train.py --find_lr (lr_finder.py): the suggestion rules against hand computations, the range test with the
run's own model (weights restored after it), and the command's files and messages."""

import math

import pytest
import torch

import data_loader
import lr_finder
import model_loader
import train
import trainer
from helpers import read_csv
from utils import Compute, DistInfo


def test_smoothing_is_a_bias_corrected_moving_average():
    assert lr_finder.smooth([2.0, 4.0], beta=0.5) == pytest.approx([2.0, (0.5 * 0.5 * 2 + 0.5 * 4) / 0.75])
    assert lr_finder.smooth([3.0] * 5) == pytest.approx([3.0] * 5)


def test_the_rules_on_a_hand_made_curve():
    lrs = [10 ** (-6 + i / 2) for i in range(13)]  # 1e-6 ... 1e0, half a decade apart
    losses = [2.0, 2.0, 1.99, 1.9, 1.5, 0.8, 0.5, 0.4, 0.35, 0.6, 1.5, 4.0, 9.0]
    # the longest falling stretch: indices 1..8 (2.0 > 1.99 > ... > 0.35), 8 steps; start = 8 - 8 = 0;
    # a third of it is 8/3 -> index 0 + 2 + 1 = 3
    assert lr_finder.valley(losses) == 3
    # the steepest fall per decade: 1.5 -> 0.8 (-0.7 in half a decade), between indices 4 and 5
    assert lr_finder.steepest(lrs, losses) == 4
    assert lr_finder.lr_at(0, 100) == pytest.approx(1e-7) and lr_finder.lr_at(99, 100) == pytest.approx(10.0)
    assert lr_finder.lr_at(1, 100) / lr_finder.lr_at(0, 100) == pytest.approx(1e8 ** (1 / 99))


def test_suggestions_leave_out_the_first_tenth_and_the_last_five_steps():
    lrs = [lr_finder.lr_at(i, 40) for i in range(40)]
    losses = [1.0] * 40
    losses[38] = -5.0  # a minimum among the last 5 steps: ignored
    losses[2] = -5.0  # and in the first tenth: ignored
    losses[20] = 0.5
    assert lr_finder.suggest(lrs, losses)["minimum"] == pytest.approx(lrs[20] / 10)
    assert lr_finder.suggest(lrs[:7], losses[:7]) == {}


def test_steepest_ignores_a_false_fall_after_the_loss_diverges():
    """A multi-label range test's curve (smoothed, every fourth step): a low mini-batch loss among exploding ones
    made the steepest fall at lr 2.3 (it trained to a test mAP of 0.93 against 0.97 at 0.01)."""
    lrs = [10 ** (-7 + i * 8 / 59) for i in range(60)]
    losses = [0.70] * 30 + [
        0.69,
        0.67,
        0.64,
        0.59,
        0.56,
        0.52,
        0.49,
        0.47,
        0.46,
        0.47,
        0.50,
        0.56,
        0.60,
        0.62,
        0.66,
        0.58,
        0.70,
        0.80,
        0.95,
        1.2,
        1.6,
        2.0,
        2.5,
        3.0,
        3.5,
        4.0,
        4.5,
        5.0,
        5.5,
        6.0,
    ]
    assert lr_finder.diverging_from(losses) == 41  # 0.56 > 1.2 x 0.46
    suggested = lr_finder.suggest(lrs, losses)["steepest"]
    assert suggested == lrs[32]  # 0.64 -> 0.59, the steepest fall before it diverges (not 0.66 -> 0.58 at 44)
    bump = [0.5] * 10 + [0.62, 0.5] + [0.5 - 0.01 * i for i in range(40)] + [0.2 * 1.5**i for i in range(8)]
    assert lr_finder.diverging_from(bump) > 12  # a rise before any fall below the start is not a divergence


def noisy_start_then_descent():
    """A frozen range test's smoothed curve on 20 images in batches of 2 (lr_find.csv, efficientnet_lite0, 64 px):
    the first steps' averages of a few mini-batch losses swing by 0.05 a step, as much as the real descent from
    1e-3 on; steepest said 7.7e-07 there."""
    lrs = [lr_finder.lr_at(i, 100) for i in range(100)]
    # fmt: off
    losses = [
        2.399, 1.699, 1.794, 1.527, 1.542, 1.464, 1.484, 1.481, 1.497, 1.515, 1.601, 1.573, 1.52, 1.496, 1.478,
        1.445, 1.393, 1.417, 1.465, 1.52, 1.491, 1.472, 1.481, 1.529, 1.546, 1.539, 1.537, 1.545, 1.538, 1.511,
        1.501, 1.511, 1.49, 1.479, 1.474, 1.475, 1.476, 1.491, 1.465, 1.471, 1.472, 1.442, 1.44, 1.432, 1.416, 1.404,
        1.393, 1.367, 1.338, 1.311, 1.288, 1.252, 1.219, 1.183, 1.157, 1.135, 1.113, 1.088, 1.06, 1.03, 1.001, 0.973,
        0.946, 0.92, 0.895, 0.87, 0.847, 0.824, 0.802, 0.781, 0.761, 0.741, 0.721, 0.703, 0.685, 0.667, 0.65, 0.634,
        0.618, 0.603, 0.588, 0.573, 0.559, 0.545, 0.532, 0.519, 0.507, 0.495, 0.483, 0.471, 0.46, 0.449, 0.438,
        0.428, 0.418, 0.408, 0.399, 0.39, 0.381, 0.372,
    ]
    # fmt: on
    return lrs, losses


def test_steepest_is_taken_along_the_clear_descent_not_in_a_noisy_start():
    lrs, losses = noisy_start_then_descent()
    assert lr_finder.steepest(lrs[10:95], losses[10:95]) == 1  # 1.573 -> 1.52, at 7.7e-07: noise
    # the descent: from 1.491 (the last point within a tenth of the fall 1.601 -> 0.408 of the start) to the lowest
    assert lr_finder.descent(losses[10:95]) == (27, 84)
    assert lr_finder.suggest(lrs, losses)["steepest"] == lrs[10 + 27 + 13]  # 1.288 -> 1.252, at 1.1e-03


def test_a_flat_or_noisy_curve_without_a_clear_descent_gets_no_suggestion():
    """A fine-tuned range test's curve (20 images, batches of 2): flat within noise, then diverging; steepest
    said 9.5e-02, at the edge of the explosion."""
    lrs = [lr_finder.lr_at(i, 87) for i in range(87)]
    flat = [1.45 + 0.02 * math.sin(i) for i in range(70)]
    flat[66:69] = [1.394, 1.405, 1.393]  # a dip of 4% just before the explosion
    losses = flat + [1.42, 1.44, 1.57, 1.7, 1.69, 1.79, 1.87, 2.0, 2.25, 2.29, 2.94, 3.39, 3.83, 4.2, 4.36, 5.8, 6.0]
    assert lr_finder.suggest(lrs, losses) == {} and lr_finder.descent(lr_finder.trimmed(lrs, losses)[1]) is None
    why = lr_finder.no_suggestion(lr_finder.RangeTest(lrs=lrs, losses=losses, smoothed=losses, stopped="x"))
    assert why.startswith(
        f"the smoothed loss shows no clear descent: from 1.47 its lowest is 1.39 (at --lr {lrs[68]:.1e})"
    )
    assert "less than 10% lower, before it diverges" in why
    falling = losses[:40] + [1.45 - 0.2 * math.log10(1 + i) for i in range(1, 30)]  # 1.45 -> 1.16 (20%)
    assert (
        lr_finder.suggest(lrs[:69], falling)
        and lr_finder.no_suggestion(lr_finder.RangeTest(lrs=lrs[:69], smoothed=falling)) == ""
    )


def build_fitter(data, tmp_path, *flags):
    """A Fitter as train.main builds it, before fit()."""
    args = train.parse_args(
        [
            str(a)
            for a in (
                "--data_dir",
                data,
                "--model_name",
                "resnet18",
                "--input_size",
                "32",
                "--batch_size",
                "4",
                "--num_workers",
                "0",
                "--model_fn",
                tmp_path / "m.pth",
                "--log_dir",
                tmp_path / "run",
                *flags,
            )
        ]
    )
    splits = data_loader.build_splits(data, args.valid_ratio, args.seed)
    torch.manual_seed(0)
    model, head = model_loader.build_model("resnet18", len(splits.class_names), log=lambda *a: None)
    meta = train.model_meta(args, "resnet18")
    loaders = data_loader.build_loaders(splits, 32, meta["resize_size"], meta["mean"], meta["std"], 4, 0, args.seed)
    compute = Compute(torch.device("cpu"), dist=DistInfo())
    return trainer.Fitter(
        model,
        head,
        splits,
        loaders,
        compute,
        train.fit_config(args),
        meta,
        args.model_fn,
        tmp_path / "m_last.pth",
        tmp_path / "run",
        lambda *a: None,
    )


@pytest.mark.parametrize("mode", [[], ["--freeze"]])
def test_the_range_test_trains_with_rising_rates_then_restores_the_model(tiny_data, tmp_path, mode):
    fitter = build_fitter(tiny_data, tmp_path, *mode)
    before = {k: v.clone() for k, v in fitter.model.state_dict().items()}
    seen, backbone = [], []
    fitter.model.get_submodule(fitter.head).register_forward_hook(
        lambda m, i, o: seen.append(m.weight.detach().clone())
    )
    fitter.model.conv1.register_forward_hook(  # the backbone's first layer, as each step finds it
        lambda m, i, o: backbone.append((m.weight.detach().clone(), m.weight.requires_grad))
    )
    test = lr_finder.range_test(fitter, 4)
    assert 10 <= len(test.lrs) <= lr_finder.MAX_STEPS and len(test.losses) == len(test.lrs)
    ratios = [b / a for a, b in zip(test.lrs, test.lrs[1:])]
    assert test.lrs[0] == pytest.approx(lr_finder.START_LR) and max(ratios) == pytest.approx(min(ratios))
    assert not torch.equal(seen[-1], before[f"{fitter.head}.weight"])  # it did train
    after = fitter.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics included
    assert fitter.optimizer.state_dict()["state"] == {}
    if mode:  # --freeze: the steps ran on the cache, the backbone untouched
        assert fitter.cache is not None
        assert not any(grad for _, grad in backbone)  # (the cache's pass runs a folded copy of it)
    else:  # the whole model: the backbone trains too
        assert len(backbone) == len(test.lrs) and all(grad for _, grad in backbone)
        assert not torch.equal(backbone[-1][0], before["conv1.weight"])


def test_find_lr_writes_the_curve_and_prints_a_suggestion_without_training(tiny_data, tmp_path, capsys):
    result = train.main(
        train.parse_args(
            [
                str(a)
                for a in (
                    "--data_dir",
                    tiny_data,
                    "--model_name",
                    "resnet18",
                    "--input_size",
                    "32",
                    "--batch_size",
                    "4",
                    "--freeze",
                    "--num_workers",
                    "0",
                    "--model_fn",
                    tmp_path / "m.pth",
                    "--log_dir",
                    tmp_path / "run",
                    "--find_lr",
                    "--verbose",
                    "0",
                )
            ]
        )
    )
    out = capsys.readouterr().out
    rows = read_csv(tmp_path / "run" / "lr_find.csv")
    lrs, smoothed = [float(r["lr"]) for r in rows], [float(r["smoothed"]) for r in rows]
    assert len(rows) == len(result.lrs) and lrs[0] == pytest.approx(1e-7, rel=1e-4)
    assert smoothed == pytest.approx(lr_finder.smooth([float(r["loss"]) for r in rows]), rel=1e-4)
    suggested = lr_finder.suggest(lrs, smoothed)[lr_finder.SUGGESTION]
    assert f"suggested --lr {suggested:.1e} ({lr_finder.SUGGESTION}" in out
    assert (tmp_path / "run" / "lr_find.png").stat().st_size > 10_000
    assert not (tmp_path / "m.pth").exists() and not (tmp_path / "run" / "metrics.csv").exists()
    assert math.isfinite(suggested)


def test_find_lr_with_too_few_batches_suggests_nothing(tiny_data, tmp_path, capsys):
    result = train.main(
        train.parse_args(
            [
                str(a)
                for a in (
                    "--data_dir",
                    tiny_data,
                    "--model_name",
                    "resnet18",
                    "--input_size",
                    "32",
                    "--batch_size",
                    "16",
                    "--num_workers",
                    "0",
                    "--model_fn",
                    tmp_path / "m.pth",
                    "--log_dir",
                    tmp_path / "run",
                    "--find_lr",
                    "--verbose",
                    "0",
                )
            ]
        )
    )
    out = capsys.readouterr().out
    assert result is None and "make 3 batches of 16" in out and "no learning rate is suggested" in out
    assert not (tmp_path / "run" / "lr_find.png").exists() and not (tmp_path / "m.pth").exists()


def test_the_range_test_stops_once_the_smoothed_loss_passes_four_times_its_lowest(tiny_data, tmp_path, monkeypatch):
    """A scripted curve (each step's loss stands in for the mini-batch's): it falls to 0.1, then grows tenfold a
    step; the test ends at the first step whose smoothed loss exceeds DIVERGE x the lowest smoothed one."""
    fitter = build_fitter(tiny_data, tmp_path, "--freeze")
    curve = [1.0 - 0.03 * i for i in range(30)] + [0.1 * 10**i for i in range(1, 40)]

    def scripted_step(model, x, y, optimizer, schedule, scaler, criterion, compute, meter, whole=False):
        optimizer.step()  # (no gradients: nothing moves; the schedule expects it first)
        schedule.step()
        meter.loss, meter.count = curve[len(seen)], 1
        seen.append(1)

    seen = []
    monkeypatch.setattr(trainer, "train_step", scripted_step)
    test = lr_finder.range_test(fitter, 4)
    smoothed = lr_finder.smooth(curve)
    first = next(i for i in range(1, len(curve)) if smoothed[i] > lr_finder.DIVERGE * min(smoothed[: i + 1]))
    assert test.stopped == f"the loss passed {lr_finder.DIVERGE:g}x its lowest" and len(test.losses) == first + 1
    assert test.losses == pytest.approx(curve[: first + 1]) and first < len(curve) - 1


def test_find_lr_without_a_clear_descent_warns_why_and_suggests_nothing(tiny_data, tmp_path, monkeypatch):
    fitter = build_fitter(tiny_data, tmp_path, "--freeze")
    curve = [1.1 + 0.05 * (-1) ** i for i in range(100)]  # flat: noise around the start

    def scripted_step(model, x, y, optimizer, schedule, scaler, criterion, compute, meter, whole=False):
        optimizer.step()  # (no gradients: nothing moves; the schedule expects it first)
        schedule.step()
        meter.loss, meter.count = curve[len(said)], 1
        said.append("")

    said = []
    monkeypatch.setattr(trainer, "train_step", scripted_step)
    test = lr_finder.find_lr(fitter, tmp_path / "run", said.append)
    lines = [s for s in said if s]
    assert test.suggestions == {} and len(test.losses) == 100
    assert (
        lines[0].startswith(
            "warning: --find_lr: no learning rate is suggested: the smoothed loss shows no clear descent"
        )
        and len(lines) == 1
        and "suggested --lr" not in lines[0]
    )
    assert (tmp_path / "run" / "lr_find.png").is_file() and len(read_csv(tmp_path / "run" / "lr_find.csv")) == 100


def test_no_rule_suggests_a_rate_from_beyond_where_the_loss_diverged():
    """A curve that falls, explodes past 4x its lowest, then has one very low mini-batch loss among the exploding
    ones (a false, steep fall): every rule's rate comes from before the divergence."""
    lrs = [lr_finder.lr_at(i, 100) for i in range(100)]
    losses = [2.0 - 0.015 * i for i in range(70)] + [1.0 * 1.6**i for i in range(1, 31)]
    losses[85] = 0.01  # past the divergence
    diverged = lr_finder.diverging_from(losses)
    assert 70 <= diverged < 85
    found = lr_finder.suggest(lrs, losses)
    assert set(found) == {"valley", "steepest", "minimum"}
    assert all(lr <= lrs[diverged] for lr in found.values()), (found, lrs[diverged])
