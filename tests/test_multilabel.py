"""Several labels per image (tasks.py MultiLabel; train.py --labels_csv FILE --multi_label): the loss, thresholds and
report against hand-computed numbers, the CSV's label sets, and one tiny run end to end (train, predict,
export, resume, the label check) on two-object images built by data/prepare.py pairs from the shipped sample."""

import math
import sys

import pytest
import torch

import calibration
import data_loader
import export
import exported_model
import metrics
import model_loader
import predict
import prediction_figure
import tasks
import train
from conftest import ROOT, run_in_process
from helpers import read_csv, tiny_pairs, write_csv

# ----------------------------------------------------------------------------- hand-computed numbers


def test_a_label_cell_is_a_sorted_set_of_classes():
    assert tasks.split_labels("dog  cat dog") == ["cat", "dog"]
    assert tasks.split_labels("a|b| a", "|") == ["a", "b"]
    assert tasks.split_labels("") == [] and tasks.split_labels(" ", "|") == []
    assert (
        tasks.MultiLabel("|").text((1, 0, 1), ["a", "b", "c"]) == "a|c"
        and tasks.SingleLabel().text(2, ["a", "b", "c"]) == "c"
    )


def test_the_loss_weighs_each_classs_positives_by_negatives_over_positives():
    samples = [("a", (1, 0)), ("b", (1, 1)), ("c", (0, 0)), ("d", (0, 0))]
    assert tasks.MultiLabel().loss_weights(samples, 2) == [1.0, 3.0]
    criterion = tasks.MultiLabel().criterion([2.0, 1.0])
    loss = criterion(torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.0]]))
    # class 0 present: 2 x log(1 + e^0); class 1 absent: log(1 + e^2); mean over the two
    assert float(loss) == pytest.approx((2 * math.log(2) + math.log(1 + math.e**2)) / 2, abs=1e-6)


def test_the_threshold_maximises_f1_halfway_to_the_next_probability():
    probs = torch.tensor([0.9, 0.8, 0.6, 0.4, 0.2])
    positive = torch.tensor([1, 0, 1, 1, 0])
    # top-k positive: F1 = 2TP / (k + 3) = 0.5, 0.4, 0.667, 0.857, 0.75 -> k = 4, halfway between 0.4 and 0.2
    assert metrics.best_f1_threshold(probs, positive) == pytest.approx(0.3)
    # tied probabilities are cut together: 0.9 and 0.9 both in (F1 2/3) or both out (F1 0)
    assert metrics.best_f1_threshold(torch.tensor([0.9, 0.9, 0.1]), torch.tensor([1, 0, 0])) == pytest.approx(0.5)
    assert metrics.best_f1_threshold(torch.tensor([0.3, 0.2]), torch.tensor([0, 0])) == metrics.DEFAULT_THRESHOLD


def test_a_class_in_every_validation_image_is_predicted_whenever_plausible():
    """No image without it bounds the threshold from below: the lowest probability (0.867 here, which missed 2 of
    40 test images), or 0.5 when lower."""
    assert metrics.best_f1_threshold(torch.tensor([0.95, 0.9, 0.867]), torch.tensor([1, 1, 1])) == 0.5
    assert metrics.best_f1_threshold(torch.tensor([0.9, 0.4, 0.3]), torch.tensor([1, 1, 1])) == pytest.approx(0.3)


def test_the_summary_warns_of_a_class_in_every_validation_image_and_of_one_in_none():
    labels = torch.tensor([[1, 0, 1], [1, 0, 0], [1, 0, 1], [1, 0, 0]], dtype=torch.float32)
    logits = torch.tensor([[3.0, -2.0, 1.0], [2.5, -1.0, -1.0], [4.0, -3.0, 2.0], [2.0, -2.0, 0.5]])
    cal = tasks.MultiLabel().calibrate(logits, labels, ["always", "never", "some"])
    assert cal.thresholds[:2] == [0.5, 0.5] and cal.always == {"always": 0.5} and cal.absent == ["never"]
    assert cal.warnings() == [
        "warning: always is in every validation image, so no threshold can be fitted against images without it: "
        "the lowest validation probability, or 0.5 if lower, is used ([0.500])",
        "warning: no validation image shows never: threshold 0.5, not fitted (give the validation images some, e.g. "
        "with a split column)",
    ]
    assert tasks.MultiLabel().calibrate(logits[:, 2:], labels[:, 2:], ["some"]).warnings() == []


def test_a_probability_equal_to_its_threshold_is_taken():
    probs = torch.tensor([[0.5, 0.25, 0.75], [0.5 - 1e-7, 0.25, 0.7]])
    assert calibration.decide_sets(probs, [0.5, 0.25, 0.75]).tolist() == [[True, True, True], [False, True, False]]


def test_each_class_gets_the_temperature_that_minimises_its_own_loss():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 2, generator=g) * 2
    labels = (torch.rand(4000, 2, generator=g) < z.sigmoid()).float()
    logits = z * torch.tensor([3.0, 0.5])  # over- and under-confident by known factors
    cal = tasks.MultiLabel().calibrate(logits, labels, ["a", "b"])
    assert cal.temperatures[0] == pytest.approx(3.0, rel=0.1) and cal.temperatures[1] == pytest.approx(0.5, rel=0.1)
    for c, t in enumerate(cal.temperatures):
        best = metrics.bce(logits[:, c], labels[:, c], t)
        assert best <= min(metrics.bce(logits[:, c], labels[:, c], t * f) for f in (0.97, 1.03))
    assert cal.metrics["valid_bce_after"] < cal.metrics["valid_bce_before"]


def test_a_class_temperature_that_would_not_lower_its_bce_is_not_kept(monkeypatch):
    """The search finds each column's minimum; a search answering 3 (right for the over-confident class a) and 0.3
    (wrong for the calibrated class b) stands in for one that does not: b keeps 1.0, and the summary says so."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2000, 2, generator=g) * 2
    labels = (torch.rand(2000, 2, generator=g) < z.sigmoid()).float()
    logits = z * torch.tensor([3.0, 1.0])
    monkeypatch.setattr(
        metrics, "fit_temperature", lambda column, y, loss=None: 3.0 if torch.equal(column, logits[:, 0]) else 0.3
    )
    cal = tasks.MultiLabel().calibrate(logits, labels, ["a", "b"])
    assert cal.temperatures == [3.0, 1.0] and cal.no_better == ["b"] and cal.unfitted == []
    assert "; temperature stays 1.0 for b: a fitted one would not lower its validation BCE" in cal.summary()
    assert cal.metrics["valid_bce_after"] == pytest.approx(
        (metrics.bce(logits[:, 0], labels[:, 0], 3.0) + metrics.bce(logits[:, 1], labels[:, 1])) / 2
    )


def test_the_report_matches_hand_computed_precision_recall_ap_and_exact_match():
    labels = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0]])
    preds = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 1]])
    probs = torch.tensor([[0.9, 0.2], [0.4, 0.7], [0.6, 0.8], [0.1, 0.5]])
    table, summary = tasks.MultiLabel().set_report(labels, preds, probs, ["a", "b"])
    rows = {r["class"]: r for r in table.to_dict("records")}
    # a: predicted on images 0 and 2, present on 0 and 1 -> TP 1 of 2 predicted, 1 of 2 present
    assert (rows["a"]["precision"], rows["a"]["recall"], rows["a"]["f1"], rows["a"]["support"]) == (0.5, 0.5, 0.5, 2)
    # b: predicted on 1, 2, 3, present on 1 and 2 -> precision 2/3, recall 1, F1 0.8
    assert rows["b"]["precision"] == pytest.approx(2 / 3) and rows["b"]["recall"] == 1.0
    assert rows["b"]["f1"] == pytest.approx(0.8)
    # a ranked 0.9 (+), 0.6 (-), 0.4 (+), 0.1 (-): AP = 1/2 x 1 + 1/2 x 2/3; b: both positives first: 1
    assert rows["a"]["average_precision"] == pytest.approx(5 / 6)
    assert rows["b"]["average_precision"] == pytest.approx(1.0)
    # micro: TP 3 of 5 predicted and 4 present
    assert rows["micro avg"]["precision"] == pytest.approx(0.6) and rows["micro avg"]["recall"] == pytest.approx(0.75)
    assert rows["micro avg"]["f1"] == pytest.approx(2 / 3)
    assert rows["macro avg"]["f1"] == pytest.approx(0.65) and rows["macro avg"]["support"] == 4
    assert summary["mAP"] == pytest.approx((5 / 6 + 1) / 2)
    assert summary["exact_match"] == pytest.approx(1 / 4) and summary["count"] == 4


def test_a_multi_label_csv_gives_multi_hot_labels_and_allows_an_empty_cell(tmp_path, capsys):
    for name in ("x.png", "y.png", "z.png"):
        (tmp_path / name).write_bytes(b"")
    path = write_csv(tmp_path / "l.csv", [("x.png", "dog cat"), ("y.png", ""), ("z.png", "cat")])
    splits = data_loader.build_splits(None, 0.5, 0, path, task=tasks.MultiLabel(" "))
    assert splits.class_names == ["cat", "dog"]
    samples = sorted(splits.train + splits.valid)
    assert [s[1] for s in samples] == [(1, 1), (0, 0), (1, 0)]
    assert tasks.MultiLabel().tensor(s[1] for s in samples).shape == (3, 2)
    err = run_in_process(train, ["--labels_csv", path], capsys)  # one label per image: an empty cell is refused
    assert "line 3: empty label" in err


def test_the_label_check_flags_a_missing_and_a_spurious_label_per_class():
    import label_check

    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([[i % 2, (i // 2) % 2] for i in range(60)], dtype=torch.float32)
    features = (labels * 4 + torch.randn(60, 2, generator=g) * 0.5)[None]  # (views, images, dim)
    given = labels.clone()
    given[0, 1] = 1  # image 0 shows neither class: class 1 given too many
    given[3, 0] = 0  # image 3 shows both: class 0 missing
    present, flags, folds = label_check.per_label_check(features, given, seed=0)
    assert flags[0].tolist() == [False, True] and flags[3].tolist() == [True, False]
    assert int(flags.sum()) == 2 and folds == [5, 5]
    files = [f"f{i}" for i in range(60)]
    rows = label_check.multi_label_rows(
        files, given, ["train"] * 60, present, flags, ["cat", "dog"], tasks.MultiLabel()
    )
    by_file = {r["file"]: r for r in rows}
    assert by_file["f0"]["given"] == "dog" and by_file["f0"]["suggested"] == "(none)" and by_file["f0"]["flagged"]
    assert by_file["f3"]["given"] == "dog" and by_file["f3"]["suggested"] == "cat dog"
    assert {rows[0]["file"], rows[1]["file"]} == {"f0", "f3"}  # the lowest scores first


def test_labels_read_the_wrong_way_are_warned_about(tmp_path):
    rows = [(f"{i}.png", label) for i, label in enumerate(["bag", "sneaker", "bag sneaker", "bag", "sneaker", "bag"])]
    for name, _ in rows:
        (tmp_path / name).write_bytes(b"")
    path = write_csv(tmp_path / "l.csv", rows)
    said = []
    data_loader.build_splits(None, 0.5, 0, path, warn=said.append)  # one label per image: 'bag sneaker' is a class
    assert len(said) == 1 and "'bag sneaker' look like several classes in one cell" in said[0]
    said.clear()
    data_loader.build_splits(None, 0.5, 0, path, warn=said.append, task=tasks.MultiLabel("|"))  # the wrong separator
    assert len(said) == 1 and "no train row lists more than one class with --label_delim '|'" in said[0]
    said.clear()
    data_loader.build_splits(None, 0.5, 0, path, warn=said.append, task=tasks.MultiLabel(" "))
    assert said == []
    plain = write_csv(tmp_path / "plain.csv", [(n, "bag" if i % 2 else "ankle boot") for i, (n, _) in enumerate(rows)])
    data_loader.build_splits(None, 0.5, 0, plain, warn=said.append)  # a class name with a space: no alarm
    assert said == []


# ----------------------------------------------------------------------------- a tiny run, end to end


def run_args(root, csv_path, *flags):
    return [
        str(a)
        for a in (
            "--labels_csv",
            csv_path,
            "--multi_label",
            "--model_name",
            "resnet18",
            "--input_size",
            "32",
            "--num_workers",
            "0",
            "--verbose",
            "0",
            "--batch_size",
            "16",
            "--model_fn",
            root / "m.pth",
            "--log_dir",
            root / "run",
            *flags,
        )
    ]


@pytest.fixture(scope="module")
def pairs_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    csv_path = tiny_pairs(root / "data")
    result = train.main(train.parse_args(run_args(root, csv_path, "--freeze", "--n_epochs", "3", "--lr", "0.01")))
    return root, csv_path, result


def test_training_stores_per_class_temperatures_and_thresholds_and_reports_map(pairs_run):
    root, csv_path, result = pairs_run
    ckpt = model_loader.load_checkpoint(root / "m.pth")
    assert ckpt["multi_label"] is True and ckpt["class_names"] == ["ankle_boot", "bag", "sneaker", "trouser"]
    assert len(ckpt["temperatures"]) == 4 and len(ckpt["thresholds"]) == 4
    assert all(0 < t < 1 for t in ckpt["thresholds"])
    history = read_csv(root / "run" / "metrics.csv")
    assert len(history) == 3 and all(0 <= float(r["valid_map"]) <= 1 for r in history)
    report = {r["class"]: r for r in read_csv(root / "run" / "test_report.csv")}
    assert set(report) == set(ckpt["class_names"]) | {"micro avg", "macro avg"}
    assert float(report["macro avg"]["average_precision"]) == pytest.approx(result.test_metrics["map"], abs=1e-6)
    from helpers import scalar_tags

    assert "Validation/mAP" in scalar_tags(root / "run").Tags()["scalars"]


def test_training_warns_of_thresholds_the_validation_images_cannot_fit(tiny_data, tmp_path, capsys):
    """Every image shows x; rare is only on two training images: both said in the summary."""
    rows = []
    for i, f in enumerate(sorted((tiny_data / "train").rglob("*.png"))):
        rows.append(
            (str(f), f"{f.parent.name} x" + (" rare" if i in (1, 2) else ""), "valid" if i % 4 == 0 else "train")
        )
    csv_path = write_csv(tmp_path / "labels.csv", rows, ("file", "label", "split"))
    train.main(train.parse_args(run_args(tmp_path, csv_path, "--freeze", "--n_epochs", "1")))
    out = capsys.readouterr().out.splitlines()
    ckpt = model_loader.load_checkpoint(tmp_path / "m.pth")
    x, rare = ckpt["class_names"].index("x"), ckpt["class_names"].index("rare")
    assert ckpt["thresholds"][x] <= 0.5 and ckpt["thresholds"][rare] == 0.5
    assert (
        f"warning: x is in every validation image, so no threshold can be fitted against images without it: the "
        f"lowest validation probability, or 0.5 if lower, is used ([{ckpt['thresholds'][x]:.3f}])" in out
    )
    assert (
        "warning: no validation image shows rare: threshold 0.5, not fitted (give the validation images some, "
        "e.g. with a split column)" in out
    )


def test_predict_writes_the_classes_above_their_thresholds_and_the_report(pairs_run, tmp_path, capsys):
    root, csv_path, result = pairs_run
    ckpt = model_loader.load_checkpoint(root / "m.pth")
    names = ckpt["class_names"]
    out = tmp_path / "r.csv"
    predict.main(
        predict.parse_args(
            [
                str(a)
                for a in (
                    "--model_fn",
                    root / "m.pth",
                    "--output",
                    out,
                    "--plot",
                    tmp_path / "p.png",
                    "--unknown_label",
                    "nothing",
                )
            ]
        )
    )
    printed = capsys.readouterr().out
    rows = read_csv(out)
    assert len(rows) == 17 and "confidence" not in rows[0]
    assert [r["label"] for r in rows if "blank" in r["file_dir"]] == [""]  # shows none of the classes
    labels, preds, probs = [], [], []
    for r in rows:
        p = [float(r[f"prob_{c}"]) for c in names]
        chosen = [c for c, v, t in zip(names, p, ckpt["thresholds"]) if v >= t]
        if min(abs(v - t) for v, t in zip(p, ckpt["thresholds"])) > 1e-5:  # written to 6 decimals
            assert r["predict"] == (" ".join(chosen) or "nothing")
        labels.append([int(c in r["label"].split()) for c in names])
        preds.append([int(c in chosen) for c in names])
        probs.append(p)
    _, summary = tasks.MultiLabel().set_report(torch.tensor(labels), torch.tensor(preds), torch.tensor(probs), names)
    assert f"mAP {summary['mAP']:.4f}, exact match {summary['exact_match']:.4f}" in printed
    # the same images and decisions as train.py's own test pass
    assert summary["exact_match"] == pytest.approx(result.test_metrics["accuracy"], abs=1e-6)
    assert read_csv(tmp_path / "r_report.csv")[-1]["class"] == "macro avg"


def test_predict_on_a_csv_with_a_split_column_takes_its_test_rows(pairs_run, tmp_path):
    root, csv_path, _ = pairs_run
    out = tmp_path / "r.csv"
    predict.main(
        predict.parse_args(
            [
                str(a)
                for a in ("--model_fn", root / "m.pth", "--labels_csv", csv_path, "--output", out, "--n_images", "0")
            ]
        )
    )
    test = sorted(str(csv_path.parent / r["file"]) for r in read_csv(csv_path) if r["split"] == "test")
    assert [r["file_dir"] for r in read_csv(out)] == test and len(test) == 17


def test_the_onnx_export_carries_the_thresholds_and_predicts_the_same_rows(pairs_run, tmp_path, capsys):
    root, _, _ = pairs_run
    export.main(export.parse_args(["--model_fn", str(root / "m.pth"), "--output", str(tmp_path / "m.onnx")]))
    assert f"of {pairs_run[1]}: max probability difference" in capsys.readouterr().out
    ckpt = model_loader.load_checkpoint(root / "m.pth")
    meta = exported_model.OnnxModel(tmp_path / "m.onnx").metadata()
    assert (
        meta["multi_label"] == "1"
        and [float(t) for t in __import__("json").loads(meta["thresholds"])] == ckpt["thresholds"]
    )
    rows = {}
    for model in (root / "m.pth", tmp_path / "m.onnx"):
        out = tmp_path / f"{model.suffix[1:]}.csv"
        predict.main(predict.parse_args([str(a) for a in ("--model_fn", model, "--output", out, "--n_images", "0")]))
        rows[model.suffix] = read_csv(out)
    assert [r["predict"] for r in rows[".pth"]] == [r["predict"] for r in rows[".onnx"]]
    for a, b in zip(rows[".pth"], rows[".onnx"]):
        assert max(abs(float(a[k]) - float(b[k])) for k in a if k.startswith("prob_")) < 1e-4


def test_the_export_check_compares_the_decided_label_sets_not_only_the_top_class():
    ckpt = {"multi_label": True, "class_names": ["a", "b"], "temperatures": [1.0, 1.0], "thresholds": [0.5, 0.5]}
    images = torch.zeros(1, 3, 8, 8)
    same_top = export.compare(
        lambda x: torch.tensor([[3.0, 0.1]]), lambda x: torch.tensor([[3.0, -0.1]]), images, *export.reading_of(ckpt)
    )
    assert same_top[1] == 0  # {a, b} against {a}: the top class agrees, the answer does not
    assert (
        export.compare(
            lambda x: torch.tensor([[3.0, 0.1]]), lambda x: torch.tensor([[3.0, 0.2]]), images, *export.reading_of(ckpt)
        )[1]
        == 1
    )


def test_a_plain_onnxruntime_consumer_from_the_docs_decides_the_same_label_sets(pairs_run, tmp_path):
    """docs/export.md's preprocessing, then docs/labels.md's multi-label lines, exactly, without torch: the
    same sets as predict.py on the checkpoint."""
    import re
    import subprocess

    from helpers import readme_deploy_snippet

    root, csv_path, _ = pairs_run
    head = readme_deploy_snippet().split("logits = session.run")[0]
    found = re.search(
        r"<!-- deploy_multi\.py: tests/test_multilabel\.py runs this block[^>]*-->\n```python\n(.*?)```",
        (ROOT / "docs" / "labels.md").read_text(),
        re.S,
    )
    (tmp_path / "deploy_multi.py").write_text(head + found.group(1))
    export.main(export.parse_args(["--model_fn", str(root / "m.pth"), "--output", str(tmp_path / "m.onnx")]))
    out = tmp_path / "r.csv"
    predict.main(
        predict.parse_args([str(a) for a in ("--model_fn", root / "m.pth", "--output", out, "--n_images", "0")])
    )
    rows = read_csv(out)
    assert any(len(r["predict"].split()) >= 2 for r in rows)  # sets of several classes are compared too
    runner = (
        "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path('deploy_multi.py'); print('torch' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", runner, "deploy_multi.py", str(tmp_path / "m.onnx"), *[r["file_dir"] for r in rows]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    *lines, used_torch = proc.stdout.strip().splitlines()
    assert used_torch == "False" and [line.split(",") for line in lines] == [
        [r["file_dir"], r["predict"]] for r in rows
    ]


def test_fine_tuning_with_positive_weights_resumes_as_multi_label(pairs_run, tmp_path, capsys):
    _, csv_path, _ = pairs_run
    broken = csv_path.parent / "images" / "broken.png"
    broken.write_bytes(b"not a png")
    table = tmp_path / "with_broken.csv"
    table.write_text(csv_path.read_text() + "images/broken.png,bag sneaker,train\n")
    flags = ("--n_epochs", "1", "--class_weights", "auto", "--image_root", csv_path.parent)
    train.main(train.parse_args(run_args(tmp_path, table, *flags)))
    resumed = train.main(train.parse_args(["--resume", str(tmp_path / "m_last.pth"), "--n_epochs", "2"]))
    assert resumed.state.epoch == 2 and "map" in resumed.test_metrics
    assert resumed.skipped_per_class == {"bag sneaker": 1}  # the unreadable image, remembered across the resume
    ckpt = model_loader.load_checkpoint(tmp_path / "m.pth")
    assert ckpt["multi_label"] is True and ckpt["args"]["class_weights"] == "auto"
    last = model_loader.safe_load(tmp_path / "m_last.pth")
    del last["multi_label"]  # as a single-label run's would be
    torch.save(last, tmp_path / "single_last.pth")
    assert "trained without --multi_label" in run_in_process(train, ["--resume", tmp_path / "single_last.pth"], capsys)


def test_a_multi_label_figure_title_names_the_likeliest_classes_and_fits_its_cell(tmp_path, monkeypatch):
    import utils

    names = ["ankle_boot", "bag", "coat", "dress", "pullover", "sandal", "shirt", "sneaker"]
    probs = torch.tensor([0.55, 0.91, 0.62, 0.88, 0.70, 0.05, 0.97, 0.10])
    pred = tuple(int(p > 0.5) for p in probs)  # six classes
    label = (1, 0, 1, 0, 1, 1, 0, 1)  # five others
    title, color = prediction_figure.figure_title(label, pred, probs, False, names, "unknown", tasks.MultiLabel())
    assert title == "shirt (0.97), bag (0.91),\ndress (0.88), +3 more\ntrue: ankle_boot, coat,\npullover, +2 more"
    assert color == "red"
    assert (
        prediction_figure.figure_title(pred, pred, probs, True, names, "unknown", tasks.MultiLabel())[0]
        == "shirt (0.97), bag (0.91),\ndress (0.88), +3 more\nunlike training"
    )
    # what --plot draws: every title inside its own cell of the saved figure, none wider than it
    files = sorted((ROOT / "data" / "fashion_sample" / "test" / "bag").glob("*.png"))[:6]
    samples = [((str(f), label), pred if i % 2 else (0,) * 8, probs, i == 3, None) for i, f in enumerate(files)]
    drawn = []
    monkeypatch.setattr(
        prediction_figure,
        "save_image_grid",
        lambda images, titles, colors, path, show: (
            drawn.append((images, titles, colors)) or utils.save_image_grid(images, titles, colors, path, show)
        ),
    )
    prediction_figure.plot_predictions(
        samples,
        names,
        {"input_size": 28, "resize_size": 28},
        tmp_path / "multi.png",
        False,
        "unknown",
        tasks.MultiLabel(),
    )
    images, titles, colors = drawn[0]
    assert (tmp_path / "multi.png").stat().st_size > 5000 and titles[1] == title
    assert titles[0] == "unknown (shirt 0.97)\ntrue: ankle_boot, coat,\npullover, +2 more"
    fig = utils.image_grid_figure(images, titles, colors)
    fig.canvas.draw()
    renderer, (width, height) = fig.canvas.get_renderer(), fig.get_window_extent().size
    cell = width / len(images)
    for i, ax in enumerate(fig.axes):
        box = ax.title.get_window_extent(renderer)
        assert cell * i <= box.x0 and box.x1 <= cell * (i + 1) and box.y1 <= height + 2, titles[i]  # not cut off


def test_a_multi_label_result_has_every_probability_even_past_twenty_classes():
    import predictor

    names = [f"c{i}" for i in range(25)]
    for multi, expected in ((True, 25), (False, 0)):
        ckpt = {"class_names": names, "multi_label": multi, "input_size": 32, "resize_size": 36}
        columns = predictor.Predictor(ckpt, None, None, predictor.Reading(topk=5)).columns(labelled=False)
        assert sum(c.startswith("prob_") for c in columns) == expected and "top5_prob" in columns


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--multi_label"], "give --labels_csv"),
        (["--balanced_sampler"], "--balanced_sampler is for single-label"),
        (["--label_smoothing", "0.1"], "--label_smoothing is for single-label"),
        (["--ood_method", "msp"], "--ood_method msp is for single-label"),
        (["--label_delim", "|"], "--label_delim goes with --multi_label"),
    ],
)
def test_what_multi_label_cannot_do_is_one_error_line(pairs_run, tmp_path, capsys, flags, message):
    _, csv_path, _ = pairs_run
    argv = (
        ["--multi_label"]
        if flags == ["--multi_label"]
        else ["--labels_csv", str(csv_path), *flags]
        if "--label_delim" in flags
        else ["--labels_csv", str(csv_path), "--multi_label", *flags]
    )
    assert message in run_in_process(train, argv + ["--model_fn", str(tmp_path / "m.pth")], capsys)


def test_check_data_checks_each_label_of_a_multi_label_csv(pairs_run, tmp_path, capsys):
    root, csv_path, _ = pairs_run
    with pytest.raises(SystemExit) as stopped:
        train.main(
            train.parse_args(
                [
                    str(a)
                    for a in (
                        "--labels_csv",
                        csv_path,
                        "--multi_label",
                        "--check_data",
                        "--weights",
                        root / "m.pth",
                        "--model_name",
                        "resnet18",
                        "--input_size",
                        "32",
                        "--num_workers",
                        "0",
                        "--verbose",
                        "0",
                        "--log_dir",
                        tmp_path,
                    )
                ]
            )
        )
    out = capsys.readouterr().out
    # the fixture's blank, unlabelled image sits in train, valid and test alike: a leak, which fails the check
    assert stopped.value.code == 1
    assert "near-duplicates: 1 groups (1 leak)" in out and "blank_train.png" in out.split("  leak: ")[1].splitlines()[0]
    assert "two-class logistic regression per class" in out and "train: 49 images; ankle_boot" in out
    # a clean set (every label right) and a weak backbone: many flags, about as many as the printed estimate
    flagged = int(out.split("flagged: ")[1].split()[0])
    expected = float(out.split("a clean set of 74 images would get about ")[1].split()[0])
    assert flagged > 10 and flagged / 2 <= expected <= flagged * 2, (flagged, expected)
    listed = out.split("most suspicious, flagged first")[1].splitlines()[1:11]
    assert [line.endswith("flagged") for line in listed] == sorted(
        (line.endswith("flagged") for line in listed), reverse=True
    )
    given = {str(csv_path.parent / r["file"]): set(r["label"].split()) for r in read_csv(csv_path)}
    rows = read_csv(tmp_path / "label_issues.csv")
    assert len(rows) == 49 + 25
    for r in rows:
        assert set(r["given"].split()) - {"(none)"} == given[r["file"]]


def test_training_accuracy_of_several_labels_is_the_exact_match_over_all_classes():
    """The epochs' accuracy (trainer.Meter) of a multi-label task: a row counts only when every class is decided
    right at probability 0.5, as metrics.exact_match says."""
    import metrics
    import trainer

    logits = torch.tensor([[2.0, -1.0, 3.0], [2.0, 1.0, -3.0], [-2.0, -1.0, -3.0], [1.0, 1.0, 1.0]])
    labels = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    meter = trainer.Meter(tasks.MultiLabel())
    meter.update(torch.tensor(0.5), logits[:2], labels[:2])
    meter.update(torch.tensor(0.5), logits[2:], labels[2:])
    assert meter.result()["accuracy"] == metrics.exact_match(logits.sigmoid() >= 0.5, labels.bool()) == 0.5
