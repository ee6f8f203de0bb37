"""Calibration, ECE, the per-class report, and how both scripts use them (temperature, --threshold, --tta)."""

import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import calibration
import evaluation
import metrics
import predict
import tasks
import train
from conftest import SAMPLE, run_in_process
from helpers import read_csv, run_predict

# ----------------------------------------------------------------------------- the math


def synthetic_logits(scale, n=4000, classes=4, seed=0):
    """Labels drawn from softmax(z); the model reports z * scale (scale > 1: over-confident, so the best
    temperature is about `scale`; scale < 1: under-confident)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g) * 2
    labels = torch.multinomial(z.softmax(1), 1, generator=g)[:, 0]
    return z * scale, labels


@pytest.mark.parametrize("scale", [3.0, 1 / 3])
def test_temperature_fit_undoes_over_and_under_confidence(scale):
    logits, labels = synthetic_logits(scale)
    calibration = tasks.SingleLabel().calibrate(logits, labels)
    t, m = calibration.temperature, calibration.metrics
    assert t == pytest.approx(scale, rel=0.1)  # T > 1 for the over-confident model, T < 1 for the other
    assert m["valid_nll_after"] < m["valid_nll_before"] - 0.05
    assert m["valid_ece_after"] < m["valid_ece_before"] and m["valid_ece_after"] < 0.03
    if scale > 1:
        for nearby in (t / 1.01, t * 1.01):  # the minimum, not just an improvement
            assert metrics.nll(logits, labels, nearby) > m["valid_nll_after"]
    else:  # sharper: it stops where the mean confidence reaches the (smoothed) accuracy, near the minimum
        right = int((logits.argmax(1) == labels).sum())
        assert metrics.mean_confidence(logits, t) <= (right + 1) / (len(labels) + 2) + 1e-6
        assert m["valid_nll_after"] < metrics.nll(logits, labels, metrics.fit_temperature(logits, labels)) + 1e-3


def test_no_temperature_is_fitted_when_the_nll_has_no_minimum():
    """Every validation image right: the NLL falls as T -> 0, and that T would make every prediction certain
    (seen with a frozen ImageNet backbone on 80 easy validation images: T = 0.05, test ECE 0.038 -> 0.063).
    Every one wrong: it falls as T -> infinity. Both keep T = 1.0 and say why. One wrong image among right ones
    gives a minimum again, but a sharper T may raise the mean confidence only to (right + 1) / (n + 2)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (80,), generator=g)
    logits = torch.randn(80, 3, generator=g)
    logits[torch.arange(80), labels] += 4
    assert (logits.argmax(1) == labels).all()
    calibration = tasks.SingleLabel().calibrate(logits, labels)
    assert calibration.temperature == 1.0 and "every validation image is predicted right" in calibration.unfitted
    m = calibration.metrics
    assert m["valid_nll_after"] == m["valid_nll_before"] and m["valid_ece_after"] == m["valid_ece_before"]
    assert calibration.summary().startswith("temperature stays 1.0: every validation image")
    wrong = tasks.SingleLabel().calibrate(-logits, labels)
    assert wrong.temperature == 1.0 and "grows" in wrong.unfitted
    logits[0] = torch.roll(logits[0], 1)  # one image now wrong
    assert logits[0].argmax() != labels[0]
    one_wrong = tasks.SingleLabel().calibrate(logits, labels)  # a minimum, sharper than 79 right of 80 allow
    sharpest = metrics.fit_temperature(logits, labels)
    assert one_wrong.unfitted == "" and 0.06 < sharpest < one_wrong.temperature < 1.0
    assert metrics.mean_confidence(logits, one_wrong.temperature) == pytest.approx(80 / 82, abs=1e-6)
    assert one_wrong.metrics["valid_nll_after"] < one_wrong.metrics["valid_nll_before"]
    assert (
        f"(limited from the NLL's minimum, T = {sharpest:.3f}, so that the mean validation confidence stays 0.976"
        in (one_wrong.summary())
    )
    # a new user's 12 validation images, one wrong by a hair, gave T = 0.055: every test confidence 1.000
    few_labels, few_logits = torch.arange(12) % 3, torch.zeros(12, 3)
    few_logits[torch.arange(12), few_labels] = 4.0
    few_logits[0] = torch.tensor([0.0, 0.1, 0.0])  # label 0, predicted 1
    few_sharpest = metrics.fit_temperature(few_logits, few_labels)
    few = tasks.SingleLabel().calibrate(few_logits, few_labels)  # confidence 0.92 at T = 1, above 12 / 14
    assert few_sharpest < 1 and few.temperature == 1.0, (few_sharpest, few)
    assert "is above 0.857 (the accuracy of one more right and one more wrong" in few.unfitted
    assert few.unfitted.endswith(f"at T = 1 already, so the NLL's minimum, T = {few_sharpest:.3f}, is not kept")


def test_a_temperature_that_would_not_lower_the_validation_nll_is_not_kept(monkeypatch):
    """The search finds the minimum, so it only happens where the NLL is flat; a search that answers T = 2.5 on a
    calibrated model (whose best T is 1) stands in for it: T stays 1.0, and the summary says why."""
    logits, labels = synthetic_logits(1.0)
    monkeypatch.setattr(metrics, "fit_temperature", lambda logits, labels, loss=None: 2.5)
    calibration = tasks.SingleLabel().calibrate(logits, labels)
    assert calibration.temperature == 1.0 and calibration.metrics["valid_nll_after"] == metrics.nll(logits, labels)
    assert calibration.summary().startswith(
        f"temperature stays 1.0: T = 2.500 would not lower the validation NLL "
        f"(it gives {metrics.nll(logits, labels, 2.5):.4f}) (validation NLL"
    )
    monkeypatch.setattr(metrics, "fit_temperature", lambda logits, labels, loss=None: 1.1)  # a better T: kept
    assert tasks.SingleLabel().calibrate(*synthetic_logits(1.2)).temperature == 1.1


def test_the_test_figures_are_those_of_the_raw_and_the_calibrated_logits():
    logits, labels = synthetic_logits(3.0, n=300)
    fitted = calibration.Calibration(2.0, {})
    found, _ = tasks.SingleLabel().test_results(logits, labels, fitted, ["a", "b", "c", "d"])
    assert found["loss"] == pytest.approx(metrics.nll(logits, labels))
    assert found["loss_calibrated"] == pytest.approx(metrics.nll(logits, labels, 2.0))
    assert found["ece"] == pytest.approx(metrics.ece(*calibration.Calibration().confidence_correct(logits, labels)))
    assert found["ece_calibrated"] == pytest.approx(
        metrics.ece(*calibration.Calibration(2.0).confidence_correct(logits, labels))
    )


def test_no_validation_logits_means_no_calibration():
    assert tasks.SingleLabel().calibrate(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)) is None


def test_ece_equals_a_hand_computation():
    confidence = torch.tensor([0.95, 0.97, 0.50, 0.52, 0.10], dtype=torch.float64)
    correct = torch.tensor([True, False, True, True, False])
    # bins of width 1/15: (14/15, 1] holds 0.95, 0.97 (accuracy 0.5, confidence 0.96); (7/15, 8/15] holds 0.50,
    # 0.52 (accuracy 1, confidence 0.51); (1/15, 2/15] holds 0.10 (accuracy 0, confidence 0.10)
    hand = 2 / 5 * abs(0.5 - 0.96) + 2 / 5 * abs(1 - 0.51) + 1 / 5 * abs(0 - 0.10)
    assert metrics.ece(confidence, correct) == pytest.approx(hand, abs=1e-9)
    count, _, _ = metrics.reliability_bins(
        torch.tensor([2 / 15, 1.0, 1 / 15 + 1e-6], dtype=torch.float64), torch.ones(3, dtype=torch.bool)
    )
    assert count.tolist() == [0, 2] + [0] * 12 + [1]  # bins are (lo, hi]: 2/15 is in the second bin, 1.0 in the last


def test_the_reliability_panel_shows_the_accuracy_whole_and_the_gap_between_it_and_the_confidence():
    """An under-confident bin (confidence 0.55, accuracy 1) and an over-confident one (0.95, 0.5): the gap is an
    unfilled, hatched red outline from the lower to the higher of the two, never a fill over the accuracy bar."""
    from matplotlib.colors import to_rgba

    from utils import new_figure

    confidence = torch.tensor([0.54, 0.56, 0.94, 0.96], dtype=torch.float64)
    correct = torch.tensor([True, True, True, False])
    ax = new_figure().add_subplot(1, 1, 1)
    evaluation.draw_reliability(ax, confidence, correct, "before")
    accuracy, gap = ax.containers
    assert [round(r.get_height(), 6) for r in accuracy] == [1.0, 0.5] and all(r.get_fill() for r in accuracy)
    assert [(round(r.get_y(), 6), round(r.get_height(), 6)) for r in gap] == [(0.55, 0.45), (0.5, 0.45)]
    assert [round(r.get_x() + r.get_width() / 2, 6) for r in gap] == [
        round(r.get_x() + r.get_width() / 2, 6) for r in accuracy
    ]
    assert all(not r.get_fill() and r.get_hatch() and r.get_edgecolor() == to_rgba("red") for r in gap)
    legend = {t.get_text(): h for t, h in zip(ax.get_legend().get_texts(), ax.get_legend().legend_handles)}
    assert legend["gap to confidence"].get_edgecolor() == to_rgba("red") and not legend["gap to confidence"].get_fill()
    assert legend["accuracy"].get_facecolor() == accuracy[0].get_facecolor()
    assert ax.get_title() == f"before: ECE {metrics.ece(confidence, correct):.3f}"


def test_temperature_one_leaves_probabilities_unchanged_and_others_follow_the_formula():
    logits = torch.randn(7, 5)
    assert torch.equal(calibration.Calibration(1.0).probabilities(logits), logits.softmax(1))
    assert torch.allclose(calibration.Calibration(2.5).probabilities(logits), (logits / 2.5).softmax(1))


def test_flips_average_the_two_views():
    images = torch.randn(3, 3, 8, 8)
    both = calibration.with_flips(images)
    assert torch.equal(both[3:], images.flip(-1))
    logits = torch.randn(6, 4)
    expected = (logits[:3].softmax(1) + logits[3:].softmax(1)) / 2
    assert torch.allclose(calibration.Calibration(1.0).probabilities(logits, views=2), expected)


def test_threshold_marks_rows_below_it_unknown():
    probs = torch.tensor([[0.9, 0.1], [0.55, 0.45], [0.3, 0.7], [0.5, 0.5]])
    assert calibration.Calibration().decide(probs).tolist() == [0, 0, 1, 0]
    assert calibration.Calibration().decide(probs, 0.6).tolist() == [0, calibration.UNKNOWN, 1, calibration.UNKNOWN]
    assert calibration.Calibration().decide(probs, 0.7).tolist() == [
        0,
        -1,
        1,
        -1,
    ]  # exactly at the threshold is accepted
    assert calibration.Calibration().decide(probs, 1.0).tolist() == [-1] * 4


def test_roc_auc_and_average_precision_equal_hand_computations():
    scores, positive = [0.9, 0.8, 0.7, 0.6], [True, False, True, False]
    assert metrics.roc_auc(scores, positive) == pytest.approx(3 / 4)  # 3 of the 4 (pos, neg) pairs ordered
    assert metrics.average_precision(scores, positive) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    tied, positive = [0.8, 0.8, 0.3], [True, False, True]
    assert metrics.roc_auc(tied, positive) == pytest.approx((0.5 + 0) / 2)  # a tie counts half
    # one threshold at 0.8 (precision 1/2, recall 1/2), then 0.3 (precision 2/3, recall 1)
    assert metrics.average_precision(tied, positive) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert math.isnan(metrics.roc_auc([0.1, 0.2], [True, True]))
    assert math.isnan(metrics.average_precision([0.1, 0.2], [False, False]))


def test_report_counts_unknown_rows_wrong_for_recall_and_leaves_them_out_of_precision():
    labels = [0, 0, 0, 1, 1, 2]
    preds = [0, 1, calibration.UNKNOWN, 1, calibration.UNKNOWN, 0]
    probs = torch.tensor(
        [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.4, 0.3, 0.3], [0.1, 0.8, 0.1], [0.3, 0.4, 0.3], [0.6, 0.1, 0.3]]
    )
    table = tasks.SingleLabel().report(labels, preds, probs, ["a", "b", "c"]).set_index("class")
    assert list(table.index) == ["a", "b", "c", "macro avg", "weighted avg"]
    assert table.loc["a", "precision"] == pytest.approx(1 / 2)  # predicted a twice (rows 0 and 5), right once
    assert table.loc["a", "recall"] == pytest.approx(1 / 3)  # 3 a's: one right, one wrong, one unknown
    assert table.loc["b", "precision"] == pytest.approx(1 / 2) and table.loc["b", "recall"] == pytest.approx(1 / 2)
    assert table.loc["c", "precision"] == 0 and table.loc["c", "recall"] == 0 and table.loc["c", "f1"] == 0
    assert table.loc["a", "f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert table.support.tolist() == [3, 2, 1, 6, 6]
    assert table.loc["macro avg", "recall"] == pytest.approx((1 / 3 + 1 / 2 + 0) / 3)
    assert table.loc["weighted avg", "recall"] == pytest.approx((3 * 1 / 3 + 2 * 1 / 2 + 0) / 6)
    # class c: its only image (row 5) has score .3; negatives .1 .1 .3 .1 .3 -> 3 below, 2 ties: (3 + 1) / 5
    assert table.loc["c", "roc_auc"] == pytest.approx(4 / 5)
    # a folder of one class predicted right: the classes neither labelled nor predicted stay out of the macro avg
    one = tasks.SingleLabel().report([1, 1], [1, 1], torch.tensor([[0.1, 0.8, 0.1]] * 2), ["a", "b", "c"])
    one = one.set_index("class")
    assert one.loc["macro avg", ["precision", "recall", "f1"]].tolist() == [1.0, 1.0, 1.0]
    assert one.loc["a", "recall"] == 0 and one.loc["macro avg", "support"] == 2
    wrong = tasks.SingleLabel().report([1, 1], [1, 0], torch.tensor([[0.1, 0.8, 0.1]] * 2), ["a", "b", "c"])
    assert wrong.set_index("class").loc["macro avg", "recall"] == pytest.approx((0 + 1 / 2) / 2)  # a predicted: in


# ----------------------------------------------------------------------------- the scripts


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One frozen run on 3 classes (shared by the tests below): the calibrated checkpoint and its run folder."""
    import contextlib
    import io

    from conftest import copy_subset

    root = tmp_path_factory.mktemp("evaluation")
    data = copy_subset(root / "data", ["bag", "sneaker", "trouser"], 20, 8)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        result = train.main(
            train.parse_args(
                [
                    str(a)
                    for a in (
                        "--data_dir",
                        data,
                        "--model_name",
                        "resnet18",
                        "--input_size",
                        "32",
                        "--n_epochs",
                        "4",
                        "--freeze",
                        "--lr",
                        "3e-3",
                        "--num_workers",
                        "0",
                        "--model_fn",
                        root / "m.pth",
                        "--log_dir",
                        root / "run",
                        "--verbose",
                        "0",
                        "--no_probe",
                    )
                ]
            )
        )  # SGD's softer probabilities: the temperature's effect shows
    (root / "train_output.txt").write_text(out.getvalue())  # what train.py printed
    return root, data, result


def test_train_stores_the_temperature_metrics_diagram_and_test_report(trained):
    root, data, result = trained
    ckpt = torch.load(root / "m.pth", weights_only=True)
    t = ckpt["temperature"]
    assert isinstance(t, float) and t != 1.0 and t == result.calibration.temperature
    m = ckpt["metrics"]
    assert (
        m["valid_nll_after"] <= m["valid_nll_before"]
        and m["calibration_count"] == len(list((root / "run").glob("valid_files.csv"))[0].read_text().splitlines()) - 1
    )
    with Image.open(root / "run" / "reliability.png") as img:
        assert img.format == "PNG" and img.size[0] > 400
    report = read_csv(root / "run" / "test_report.csv")
    assert [r["class"] for r in report] == ["bag", "sneaker", "trouser", "macro avg", "weighted avg"]
    assert [int(r["support"]) for r in report] == [8, 8, 8, 24, 24]
    # without a threshold, weighted recall is the accuracy
    assert float(report[-1]["recall"]) == pytest.approx(result.test_metrics["accuracy"], abs=1e-6)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(root / "run"))
    acc.Reload()
    assert acc.Scalars("hparam/temperature")[0].value == pytest.approx(t, rel=1e-6)
    assert acc.Scalars("hparam/valid_ece_after")[0].value == pytest.approx(m["valid_ece_after"], rel=1e-5)


def test_train_prints_the_calibration_on_the_validation_and_on_the_test_images(trained):
    root, _, result = trained
    out = (root / "train_output.txt").read_text().splitlines()
    m, t = result.calibration.metrics, result.test_metrics
    valid = [line for line in out if line.startswith("calibration: ")]
    assert (
        len(valid) == 1
        and (
            f"validation NLL {m['valid_nll_before']:.4f} -> {m['valid_nll_after']:.4f}, validation "
            f"ECE (15 bins) {m['valid_ece_before']:.4f} -> {m['valid_ece_after']:.4f}"
        )
        in valid[0]
    )
    assert (
        f"calibration on the test images: NLL {t['loss']:.4f} -> {t['loss_calibrated']:.4f}, ECE (15 bins) "
        f"{t['ece']:.4f} -> {t['ece_calibrated']:.4f}" in out
    )
    assert t["loss_calibrated"] != t["loss"] and t["ece_calibrated"] != t["ece"]


def with_temperature(src, dst, temperature):
    ckpt = torch.load(src, weights_only=True)
    if temperature is None:
        del ckpt["temperature"]
    else:
        ckpt["temperature"] = temperature
    torch.save(ckpt, dst)
    return dst


def probs_of(rows, classes):
    return np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])


def test_predict_honours_the_temperature_and_old_checkpoints_predict_as_before(trained, tmp_path, capsys):
    root, data, _ = trained
    classes = ["bag", "sneaker", "trouser"]
    out = {}
    for name, t in (("old", None), ("one", 1.0), ("two", 2.0), ("calibrated", "as trained")):
        model = root / "m.pth" if t == "as trained" else with_temperature(root / "m.pth", tmp_path / f"{name}.pth", t)
        run_predict(
            capsys,
            "--model_fn",
            model,
            "--data_dir",
            data / "test",
            "--output",
            tmp_path / f"{name}.csv",
            "--n_images",
            "0",
        )
        out[name] = read_csv(tmp_path / f"{name}.csv")
    assert out["old"] == out["one"]  # no key = T of 1, no message
    p1, p2, pc = (probs_of(out[k], classes) for k in ("one", "two", "calibrated"))
    expected = np.sqrt(p1) / np.sqrt(p1).sum(1, keepdims=True)  # softmax(z / 2) from softmax(z)
    assert np.allclose(p2, expected, atol=2e-6)
    t = torch.load(root / "m.pth", weights_only=True)["temperature"]
    powered = p1 ** (1 / t)
    assert np.allclose(pc, powered / powered.sum(1, keepdims=True), atol=1e-5)
    assert [r["predict"] for r in out["two"]] == [r["predict"] for r in out["one"]]  # T never changes the class


def test_report_and_threshold_equal_a_hand_count_on_a_labelled_folder(trained, tmp_path, capsys):
    root, data, _ = trained
    classes = ["bag", "sneaker", "trouser"]
    run_predict(
        capsys,
        "--model_fn",
        root / "m.pth",
        "--data_dir",
        data / "test",
        "--output",
        tmp_path / "all.csv",
        "--n_images",
        "0",
    )
    confidences = sorted(float(r["confidence"]) for r in read_csv(tmp_path / "all.csv"))
    threshold = round((confidences[7] + confidences[8]) / 2, 6)  # 8 of the 24 rows fall below it
    printed = run_predict(
        capsys,
        "--model_fn",
        root / "m.pth",
        "--data_dir",
        data / "test",
        "--output",
        tmp_path / "cut.csv",
        "--threshold",
        threshold,
        "--unknown_label",
        "not sure",
        "--plot",
        tmp_path / "cut.png",
        "--n_images",
        "12",
    )
    rows = read_csv(tmp_path / "cut.csv")
    unsure = [r for r in rows if r["predict"] == "not sure"]
    assert len(unsure) == 8 and all(float(r["confidence"]) < threshold for r in unsure)
    assert all(float(r["confidence"]) >= threshold for r in rows if r["predict"] != "not sure")
    for r in unsure:  # probabilities kept
        assert sum(float(r[f"prob_{c}"]) for c in classes) == pytest.approx(1, abs=1e-5)
    report = {r["class"]: r for r in read_csv(tmp_path / "cut_report.csv")}
    probs = probs_of(rows, classes)
    for i, c in enumerate(classes):
        hit = sum(r["predict"] == c and r["label"] == c for r in rows)
        predicted = sum(r["predict"] == c for r in rows)
        support = sum(r["label"] == c for r in rows)
        assert float(report[c]["precision"]) == pytest.approx(hit / predicted if predicted else 0, abs=1e-6)
        assert float(report[c]["recall"]) == pytest.approx(hit / support, abs=1e-6)
        assert int(report[c]["support"]) == support == 8
        pos = [probs[k, i] for k, r in enumerate(rows) if r["label"] == c]
        neg = [probs[k, i] for k, r in enumerate(rows) if r["label"] != c]
        pairs = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))
        assert float(report[c]["roc_auc"]) == pytest.approx(pairs, abs=1e-6)
    accepted = [r for r in rows if r["predict"] != "not sure"]
    right = sum(r["predict"] == r["label"] for r in accepted)
    assert "16/24 accepted (66.7%)" in printed
    assert f"accuracy on accepted rows {right / 16:.4f} ({right}/16; 66.7% of the labelled images accepted)" in printed
    best = sum(max(classes, key=lambda c: float(r[f"prob_{c}"])) == r["label"] for r in rows)
    assert (
        f"accuracy {right / 24:.4f} ({right}/24 labelled images; the 8 predicted as unknown count as wrong)" in printed
    )
    assert f"the best class of every row: {best / 24:.4f}" in printed and right < best  # the rows differ from it
    assert "weighted avg" in printed and "roc_auc" in printed
    with Image.open(tmp_path / "cut_confusion.png") as img:
        assert img.format == "PNG"


def test_tta_averages_the_image_and_its_mirror_and_changes_nothing_on_a_symmetric_image(trained, tmp_path, capsys):
    root, _, _ = trained
    folder = tmp_path / "images"
    folder.mkdir()
    src = np.asarray(Image.open(sorted((SAMPLE / "test" / "sneaker").glob("*.png"))[0]).convert("RGB"))
    Image.fromarray(src).save(folder / "a.png")
    Image.fromarray(src[:, ::-1].copy()).save(folder / "a_mirrored.png")
    half = src[:, :14]
    Image.fromarray(np.concatenate([half, half[:, ::-1]], 1)).save(folder / "symmetric.png")
    for name, extra in (("plain", []), ("tta", ["--tta"])):
        run_predict(
            capsys,
            "--model_fn",
            root / "m.pth",
            "--data_dir",
            folder,
            "--output",
            tmp_path / f"{name}.csv",
            "--n_images",
            "0",
            *extra,
        )
    classes = ["bag", "sneaker", "trouser"]
    plain = dict(zip(["a", "mirrored", "symmetric"], probs_of(read_csv(tmp_path / "plain.csv"), classes)))
    tta = dict(zip(["a", "mirrored", "symmetric"], probs_of(read_csv(tmp_path / "tta.csv"), classes)))
    assert np.allclose(tta["symmetric"], plain["symmetric"], atol=2e-6)
    assert not np.allclose(plain["a"], plain["mirrored"], atol=1e-4)  # the flip matters for this image...
    assert np.allclose(tta["a"], (plain["a"] + plain["mirrored"]) / 2, atol=2e-6)  # ...and TTA averages both
    assert np.allclose(tta["mirrored"], tta["a"], atol=2e-6)


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2", "nan"])
def test_a_threshold_outside_zero_one_is_a_one_line_error(trained, capsys, value):
    root, data, _ = trained
    err = run_in_process(predict, ["--model_fn", root / "m.pth", "--threshold", value], capsys)
    assert "--threshold must be in (0, 1]" in err


def test_an_unknown_label_that_is_a_class_is_refused(trained, capsys):
    root, _, _ = trained
    err = run_in_process(
        predict, ["--model_fn", root / "m.pth", "--threshold", "0.5", "--unknown_label", "bag"], capsys
    )
    assert "--unknown_label 'bag' is one of the classes" in err


def test_no_readable_validation_image_keeps_temperature_one_and_says_so(tmp_path, capsys):
    from conftest import copy_subset

    data = copy_subset(tmp_path / "data", ["bag", "trouser"], 8, 0)
    shutil.rmtree(data / "test")
    for c in ("bag", "trouser"):
        (data / "valid" / c).mkdir(parents=True)
        (data / "valid" / c / "broken.png").write_bytes(b"not an image")
    train.main(
        train.parse_args(
            [
                str(a)
                for a in (
                    "--data_dir",
                    data,
                    "--model_name",
                    "resnet18",
                    "--input_size",
                    "32",
                    "--n_epochs",
                    "1",
                    "--freeze",
                    "--num_workers",
                    "0",
                    "--model_fn",
                    tmp_path / "m.pth",
                    "--log_dir",
                    tmp_path / "run",
                    "--verbose",
                    "0",
                )
            ]
        )
    )
    assert "calibration: no validation images could be read; temperature stays 1.0" in capsys.readouterr().out
    ckpt = torch.load(tmp_path / "m.pth", weights_only=True)
    assert ckpt["temperature"] == 1.0 and "valid_nll_after" not in ckpt["metrics"]
    assert not (tmp_path / "run" / "reliability.png").exists()
