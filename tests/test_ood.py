"""'None of my classes' (ood.py): the scores against hand computations, the reference train.py keeps, and what
predict.py and export.py do with it."""

import numpy as np
import pytest
import torch
from PIL import Image

import export
import model_loader
import ood
import predict
import prediction_figure
import train
from conftest import copy_subset, run_in_process
from helpers import read_csv, run_predict

# ----------------------------------------------------------------------------- the math


def test_knn_score_is_one_minus_the_cosine_to_the_kth_nearest_training_feature():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])
    reference = {"method": "knn", "k": 2, "features": bank.half()}
    query = torch.tensor([[2.0, 0.0], [0.0, -3.0]])
    # row 0, direction (1, 0): cosines 1, 0, 0.6, -1 -> 2nd largest 0.6; row 1, (0, -1): 0, -1, -0.8, 0 -> 0
    scores = ood.Scorer(reference)(query, torch.zeros(2, 3))
    assert scores.tolist() == pytest.approx([1 - 0.6, 1 - 0.0], abs=1e-3)
    reference["k"] = 1
    assert ood.Scorer(reference)(query, torch.zeros(2, 3)).tolist() == pytest.approx([0.0, 1.0], abs=1e-3)


def test_mahalanobis_energy_and_msp_follow_their_formulas():
    g = torch.Generator().manual_seed(0)
    features, labels = torch.randn(60, 4, generator=g), torch.arange(60) % 3
    features[labels == 1] += 3
    means, precision = ood.class_gaussians(features, labels, 3)
    assert torch.allclose(means[1], features[labels == 1].mean(0), atol=1e-5)
    query, logits = torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)
    hand = torch.stack([torch.stack([(q - m) @ precision @ (q - m) for m in means]).min() for q in query])
    reference = {"method": "mahalanobis", "means": means, "precision": precision}
    assert torch.allclose(ood.Scorer(reference)(query, logits), hand, rtol=1e-4)
    energy = ood.Scorer({"method": "energy"}, temperature=2.0)(query, logits)
    assert torch.allclose(energy, -2.0 * torch.logsumexp(logits / 2.0, 1))
    msp = ood.Scorer({"method": "msp"}, temperature=0.5)(query, logits)
    assert torch.allclose(msp, 1 - (logits / 0.5).softmax(1).max(1).values)
    _, few = ood.class_gaussians(features[:10, :2].repeat(1, 8), labels[:10], 3)  # rank 2 in 16 dims: shrunk
    assert torch.isfinite(few).all() and few.abs().max() < 1e6


def test_the_score_stays_float32_under_autocast():
    """predict.py --amp runs the model under bf16/fp16 autocast; the threshold was fitted in float32."""
    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(200, 64, generator=g), dim=1).half()
    scorer = ood.Scorer({"method": "knn", "k": 3, "features": bank})
    query = torch.randn(32, 64, generator=g)
    exact = scorer(query, torch.zeros(32, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = scorer(query, torch.zeros(32, 2))
    assert mixed.dtype == torch.float32 and torch.allclose(mixed, exact, atol=1e-6)


def test_threshold_keeps_the_asked_share_of_validation_scores():
    scores = torch.tensor([0.5, 0.1, 0.4, 0.2, 0.3, 0.9, 0.8, 0.7, 0.6, 1.0])
    assert ood.fit_threshold(scores, 0.95) == pytest.approx(1.0)  # 9.5 of 10: all ten must stay
    assert ood.fit_threshold(scores, 0.9) == pytest.approx(0.9)  # nine stay, the 1.0 is out
    assert ood.fit_threshold(scores, 0.5) == pytest.approx(0.5)
    assert ood.fit_threshold(torch.tensor([0.3]), 0.95) is None and ood.fit_threshold(torch.zeros(0), 0.95) is None
    g = torch.Generator().manual_seed(1)
    train_f, valid_f = torch.randn(50, 8, generator=g), torch.randn(37, 8, generator=g)
    reference = ood.build_reference(
        "knn", train_f, torch.zeros(50, dtype=torch.long), 2, valid_f, torch.zeros(37, 2), 1.0, 0.8
    )
    kept = (ood.score(reference, 1.0, valid_f, torch.zeros(37, 2)) <= reference["threshold"]).double().mean()
    assert reference["valid_kept"] == pytest.approx(float(kept)) and 0.8 <= kept < 0.8 + 2 / 37


def test_a_large_reference_is_a_seeded_sample_within_the_budget():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(3000, 256, generator=g) * 5
    bank = ood.knn_bank(features, max_mb=0.5, seed=3)  # 0.5 MB of float16 rows of 256: 1024 rows
    assert bank.shape == (1024, 256) and bank.dtype == torch.float16
    assert torch.allclose(bank.float().norm(dim=1), torch.ones(1024), atol=1e-3)
    assert torch.equal(bank, ood.knn_bank(features, max_mb=0.5, seed=3))
    assert not torch.equal(bank, ood.knn_bank(features, max_mb=0.5, seed=4))
    assert ood.knn_bank(features[:100], max_mb=0.5, seed=3).shape == (100, 256)  # under budget: every row
    reference = ood.build_reference(
        "knn", features, torch.zeros(3000, dtype=torch.long), 2, features[:1], torch.zeros(1, 2), 1.0, 0.95, max_mb=0.5
    )
    assert ood.reference_bytes(reference) <= 0.5 * 2**20 and reference["threshold"] is None
    assert "1024 of 3000 training features" in ood.describe(reference)
    assert "no threshold: 1 readable validation image(s)" in ood.describe(reference)


# ----------------------------------------------------------------------------- the scripts


def far_images(folder, n=12, seed=0):
    """Pictures unlike any Fashion-MNIST photo: coloured stripes and checkerboards with noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        x = np.arange(64)
        pattern = (x[:, None] // (4 + i) + (x[None, :] // (4 + i)) * (i % 2)) % 2
        colour = rng.integers(0, 256, 3)
        pixels = pattern[..., None] * colour + rng.integers(0, 60, (64, 64, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"far_{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    """A frozen ImageNet backbone (EfficientNet-Lite0 from its pip package) with a head on 3 classes."""
    root = tmp_path_factory.mktemp("ood")
    data = copy_subset(root / "data", ["bag", "sneaker", "trouser"], 30, 8)
    train.main(
        train.parse_args(
            [
                str(a)
                for a in (
                    "--data_dir",
                    data,
                    "--model_name",
                    "efficientnet_lite0",
                    "--use_pretrained",
                    "--input_size",
                    "64",
                    "--n_epochs",
                    "3",
                    "--freeze",
                    "--num_workers",
                    "0",
                    "--model_fn",
                    root / "m.pth",
                    "--log_dir",
                    root / "run",
                    "--verbose",
                    "0",
                )
            ]
        )
    )
    return root, data


def split_files(run_dir, name):
    return [row["path"] for row in read_csv(run_dir / f"{name}_files.csv")]


def final_features(ckpt_path, files):
    """Penultimate features and logits of `files` through the checkpoint's model, computed afresh."""
    import data_loader
    from utils import Compute, DistInfo

    ckpt = model_loader.load_checkpoint(ckpt_path)
    model, head = model_loader.model_from_checkpoint(ckpt, ckpt_path)
    tf = data_loader.build_transforms(ckpt["input_size"], ckpt["resize_size"], ckpt["mean"], ckpt["std"], train=False)
    loader = data_loader.make_loader(data_loader.ImageDataset([(f, 0) for f in files], tf), 16, None, 0)
    features, logits, _ = ood.collect_features(model, head, loader, Compute(torch.device("cpu"), dist=DistInfo()), "f")
    return ckpt, features, logits


def test_train_keeps_the_final_models_training_features_and_a_validation_threshold(frozen, capsys):
    root, _ = frozen
    ckpt, features, _ = final_features(root / "m.pth", split_files(root / "run", "train"))
    reference = ckpt["ood"]
    assert reference["method"] == "knn" and reference["dim"] == 1280 and reference["train_count"] == 72
    assert torch.allclose(reference["features"].float(), torch.nn.functional.normalize(features, dim=1), atol=2e-3)
    _, valid_features, valid_logits = final_features(root / "m.pth", split_files(root / "run", "valid"))
    scores = ood.score(reference, ckpt["temperature"], valid_features, valid_logits)
    assert reference["threshold"] == pytest.approx(ood.fit_threshold(scores, 0.95), abs=1e-3)
    assert reference["valid_count"] == 18 and reference["valid_kept"] >= 0.95


def far_and_test(frozen):
    root, data = frozen
    folder = root / "mixed"
    if not folder.exists():
        far_images(folder / "far")
        copy_subset(folder / "in", ["bag", "sneaker", "trouser"], 0, 8)
    return folder


def test_predict_scores_every_row_and_rejects_far_images(frozen, tmp_path, capsys, monkeypatch):
    root, _ = frozen
    folder = far_and_test(frozen)
    shown = []
    monkeypatch.setattr(
        prediction_figure,
        "save_image_grid",
        lambda images, titles, colors, path, show: shown.append((titles, colors)) or True,
    )
    out = run_predict(
        capsys,
        "--model_fn",
        root / "m.pth",
        "--data_dir",
        folder,
        "--output",
        tmp_path / "r.csv",
        "--plot",
        tmp_path / "p.png",
        "--n_images",
        36,
    )
    rows = read_csv(tmp_path / "r.csv")
    threshold = torch.load(root / "m.pth", weights_only=True)["ood"]["threshold"]
    assert all(r["in_distribution"] == str(int(float(r["ood_score"]) <= threshold)) for r in rows)
    far = [r for r in rows if "/far/" in r["file_dir"]]
    known = [r for r in rows if "/in/" in r["file_dir"]]
    assert len(far) == 12 and len(known) == 24
    assert sum(r["in_distribution"] == "0" for r in far) >= 11  # at most one stripe picture passes
    assert sum(r["in_distribution"] == "1" for r in known) >= 18  # 95% of 18 validation images: a rough cut
    assert min(float(r["ood_score"]) for r in far) > np.median([float(r["ood_score"]) for r in known])
    n_unlike = sum(r["in_distribution"] == "0" for r in rows)
    assert f"out-of-distribution: {n_unlike}/36 images" in out
    assert all(r["predict"] != "unknown" for r in rows)  # flagged, not rejected, without --reject_ood
    titles, colors = shown[0]
    assert sum("unlike training" in t for t in titles) == n_unlike and colors.count("purple") == n_unlike

    out = run_predict(
        capsys,
        "--model_fn",
        root / "m.pth",
        "--data_dir",
        folder,
        "--output",
        tmp_path / "j.csv",
        "--n_images",
        0,
        "--reject_ood",
        "--threshold",
        0.5,
    )
    rejected = read_csv(tmp_path / "j.csv")
    for plain, r in zip(rows, rejected):
        expect_unknown = r["in_distribution"] == "0" or float(r["confidence"]) < 0.5
        assert (r["predict"] == "unknown") == expect_unknown and (expect_unknown or r["predict"] == plain["predict"])
    accepted = sum(r["predict"] != "unknown" for r in rejected)
    assert f"threshold 0.5 and --reject_ood: {accepted}/36 accepted" in out

    run_predict(
        capsys,
        "--model_fn",
        root / "m.pth",
        "--data_dir",
        folder,
        "--output",
        tmp_path / "t.csv",
        "--n_images",
        0,
        "--tta",
    )  # the score is the image's own view's, the mirror's dropped
    mirrored = read_csv(tmp_path / "t.csv")
    assert max(abs(float(a["ood_score"]) - float(b["ood_score"])) for a, b in zip(rows, mirrored)) < 1e-5
    assert any(a["confidence"] != b["confidence"] for a, b in zip(rows, mirrored))  # the probabilities did average


def test_report_counts_rejected_labelled_rows_wrong_for_recall(frozen, tmp_path, capsys):
    root, data = frozen
    ckpt = torch.load(root / "m.pth", weights_only=True)
    scores = [float(r["ood_score"]) for r in read_csv(predict_once(root, data, tmp_path, capsys))]
    ckpt["ood"]["threshold"] = float(np.median(scores))  # half of the test images now count as unlike
    model_loader.save_checkpoint(ckpt, tmp_path / "strict.pth")
    out = run_predict(
        capsys,
        "--model_fn",
        tmp_path / "strict.pth",
        "--data_dir",
        data / "test",
        "--output",
        tmp_path / "s.csv",
        "--n_images",
        0,
        "--reject_ood",
    )
    rows = read_csv(tmp_path / "s.csv")
    report = {r["class"]: r for r in read_csv(tmp_path / "s_report.csv")}
    for name in ("bag", "sneaker", "trouser"):
        mine = [r for r in rows if r["label"] == name]
        right = sum(r["predict"] == name for r in mine)
        assert float(report[name]["recall"]) == pytest.approx(right / len(mine))
    assert sum(r["predict"] == "unknown" for r in rows) == sum(r["in_distribution"] == "0" for r in rows) >= 11
    assert "accuracy on accepted rows" in out


def predict_once(root, data, tmp_path, capsys):
    run_predict(
        capsys,
        "--model_fn",
        root / "m.pth",
        "--data_dir",
        data / "test",
        "--output",
        tmp_path / "once.csv",
        "--n_images",
        0,
    )
    return tmp_path / "once.csv"


def test_onnx_export_computes_the_score_in_the_graph(frozen, tmp_path, capsys):
    import onnx

    root, _ = frozen
    folder = far_and_test(frozen)
    export.main(
        export.parse_args(
            [
                "--model_fn",
                str(root / "m.pth"),
                "--output",
                str(tmp_path / "m.onnx"),
                "--data_dir",
                str(folder),
                "--check_images",
                "8",
            ]
        )
    )
    assert "max relative ood_score difference" in capsys.readouterr().out
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert [o.name for o in proto.graph.output] == ["logits", "ood_score"]
    meta = {p.key: p.value for p in proto.metadata_props}
    ckpt = torch.load(root / "m.pth", weights_only=True)
    assert meta["ood_method"] == "knn" and float(meta["ood_threshold"]) == ckpt["ood"]["threshold"]
    run_predict(
        capsys, "--model_fn", root / "m.pth", "--data_dir", folder, "--output", tmp_path / "pth.csv", "--n_images", 0
    )
    out = run_predict(
        capsys,
        "--model_fn",
        tmp_path / "m.onnx",
        "--data_dir",
        folder,
        "--output",
        tmp_path / "onnx.csv",
        "--n_images",
        0,
    )
    assert "out-of-distribution:" in out
    a, b = read_csv(tmp_path / "pth.csv"), read_csv(tmp_path / "onnx.csv")
    assert [r["in_distribution"] for r in a] == [r["in_distribution"] for r in b]
    assert max(abs(float(x["ood_score"]) - float(y["ood_score"])) for x, y in zip(a, b)) < 1e-4

    export.main(
        export.parse_args(
            [
                "--model_fn",
                str(root / "m.pth"),
                "--output",
                str(tmp_path / "m.pt2"),
                "--data_dir",
                str(folder),
                "--check_images",
                "4",
            ]
        )
    )
    assert "max relative ood_score difference" in capsys.readouterr().out
    logits, scores = torch.export.load(str(tmp_path / "m.pt2")).module()(torch.randn(3, 3, 64, 64))
    assert logits.shape == (3, 3) and scores.shape == (3,)

    del meta["ood_method"]  # an ood_score output without its metadata: not a file of export.py
    proto.ClearField("metadata_props")
    onnx.helper.set_model_props(proto, meta)
    onnx.save(proto, str(tmp_path / "odd.onnx"))
    err = run_in_process(predict, ["--model_fn", tmp_path / "odd.onnx", "--data_dir", folder], capsys)
    assert "its ood_score output and its ood_method metadata do not come together" in err
    err = run_in_process(predict, ["--model_fn", tmp_path / "m.pt2", "--data_dir", folder], capsys)
    assert "is a torch.export program" in err


def test_the_export_check_catches_a_wrong_score_and_writes_nothing(frozen, tmp_path, capsys, monkeypatch):
    import onnx

    root, _ = frozen
    real_write = export.write_onnx

    def tampered(model, example, out, meta, opset, exporter):  # the reference's rows negated in the file
        real_write(model, example, out, meta, opset, exporter)
        proto = onnx.load(str(out))
        bank = next(t for t in proto.graph.initializer if sorted(t.dims) == [72, 1280])  # folded, maybe transposed
        bank.CopyFrom(onnx.numpy_helper.from_array(-onnx.numpy_helper.to_array(bank), bank.name))
        onnx.save(proto, str(out))

    monkeypatch.setattr(export, "write_onnx", tampered)
    err = run_in_process(
        export,
        [
            "--model_fn",
            root / "m.pth",
            "--output",
            tmp_path / "m.onnx",
            "--data_dir",
            far_and_test(frozen),
            "--check_images",
            "4",
        ],
        capsys,
    )
    assert "ood_score differs from the PyTorch model's" in err and not (tmp_path / "m.onnx").exists()


def test_a_reference_that_does_not_fit_the_model_is_one_error_line(frozen, tmp_path, capsys):
    root, _ = frozen
    ckpt = torch.load(root / "m.pth", weights_only=True)
    wrong_dim = dict(ckpt, ood=dict(ckpt["ood"], features=ckpt["ood"]["features"][:, :100], dim=100))
    wrong_method = dict(ckpt, ood=dict(ckpt["ood"], method="vibes"))
    for name, bad, words in (
        ("dim", wrong_dim, "dim 100, tensors of width 100) does not fit the model, whose classifier takes 1280"),
        ("method", wrong_method, "unknown method 'vibes'"),
    ):
        path = tmp_path / f"{name}.pth"
        model_loader.save_checkpoint(bad, path)
        err = run_in_process(predict, ["--model_fn", path, "--output", tmp_path / "x.csv"], capsys)
        assert words in err and not (tmp_path / "x.csv").exists()
        assert words in run_in_process(export, ["--model_fn", path, "--output", tmp_path / "x.onnx"], capsys)


def test_a_mahalanobis_reference_for_another_number_of_classes_is_refused():
    """Its class means must be one per class of the model: a reference of 3 classes does not score a 4-class model."""
    from cli import CLIError

    reference = {"method": "mahalanobis", "dim": 8, "means": torch.zeros(3, 8), "precision": torch.eye(8)}
    ood.check_reference(reference, 8, 3, "m.pth")  # fits
    with pytest.raises(CLIError, match="does not fit the model, whose classifier takes 8 features for 4 classes"):
        ood.check_reference(reference, 8, 4, "m.pth")


def test_without_a_reference_predict_works_as_before_and_says_so(frozen, tmp_path, capsys):
    root, data = frozen
    ckpt = torch.load(root / "m.pth", weights_only=True)
    del ckpt["ood"]
    model_loader.save_checkpoint(ckpt, tmp_path / "old.pth")
    out = run_predict(
        capsys,
        "--model_fn",
        tmp_path / "old.pth",
        "--data_dir",
        data / "test",
        "--output",
        tmp_path / "r.csv",
        "--n_images",
        0,
    )
    assert "has no reference" in out
    assert "ood_score" not in read_csv(tmp_path / "r.csv")[0]
    err = run_in_process(predict, ["--model_fn", tmp_path / "old.pth", "--reject_ood"], capsys)
    assert "--reject_ood" in err and "no out-of-distribution reference" in err

    ckpt = torch.load(root / "m.pth", weights_only=True)
    ckpt["ood"]["threshold"] = None  # fitted on fewer than 2 validation images
    model_loader.save_checkpoint(ckpt, tmp_path / "few.pth")
    out = run_predict(
        capsys,
        "--model_fn",
        tmp_path / "few.pth",
        "--data_dir",
        data / "test",
        "--output",
        tmp_path / "f.csv",
        "--n_images",
        0,
    )
    rows = read_csv(tmp_path / "f.csv")
    assert "has no threshold" in out and all(r["in_distribution"] == "" and float(r["ood_score"]) >= 0 for r in rows)


def test_fine_tuning_keeps_the_features_of_the_best_fine_tuned_model(tiny_data, tmp_path, capsys):
    """No cache when the backbone trains: one eval pass of the best epoch's model over the training images."""
    import data_loader

    train.main(
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
                    "--n_epochs",
                    "2",
                    "--lr",
                    "0.003",
                    "--patience",
                    "0",
                    "--num_workers",
                    "0",
                    "--model_fn",
                    tmp_path / "ft.pth",
                    "--log_dir",
                    tmp_path / "run",
                    "--verbose",
                    "0",
                    "--ood_keep",
                    "0.9",
                    "--no_amp",
                )
            ]
        )
    )  # fp32: the same trajectory on every CPU
    assert "out-of-distribution reference: knn on 39 of 39 training features (dim 512" in capsys.readouterr().out
    ckpt = model_loader.load_checkpoint(tmp_path / "ft.pth")
    assert ckpt["metrics"]["best_epoch"] == 1  # the last epoch was not the best: its weights must not be used
    model = model_loader.model_from_checkpoint(ckpt)[0].eval()
    body = torch.nn.Sequential(*list(model.children())[:-1])  # resnet18 without fc: the classifier's input
    tf = data_loader.build_transforms(32, ckpt["resize_size"], ckpt["mean"], ckpt["std"], train=False)
    with torch.no_grad():
        images = torch.stack([tf(data_loader.load_rgb(f)) for f in split_files(tmp_path / "run", "train")])
        expected = torch.nn.functional.normalize(body(images).flatten(1), dim=1)
    assert ckpt["ood"]["keep"] == 0.9
    assert torch.allclose(ckpt["ood"]["features"].float(), expected, atol=2e-3)


@pytest.mark.parametrize(
    "flags, words",
    [(["--ood_keep", "0"], "--ood_keep must be in (0, 1]"), (["--ood_method", "nope"], "invalid choice")],
)
def test_bad_ood_flags_are_one_line(flags, words, capsys):
    err = run_in_process(train, flags, capsys)
    assert words in err


def test_ood_method_none_keeps_no_reference(tiny_data, tmp_path, capsys):
    train.main(
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
                    "--ood_method",
                    "none",
                )
            ]
        )
    )
    assert "out-of-distribution" not in capsys.readouterr().out
    assert "ood" not in torch.load(tmp_path / "m.pth", weights_only=True)


def test_the_benchmark_measures_every_method_on_a_run(frozen):
    """bench/ood_bench.py's measurement (the whole script needs extra data packages): every method's AUROC,
    FPR at 95% kept and acceptance at the validation threshold, on the fixture's run and far pictures."""
    from helpers import load_script

    root, data = frozen
    bench = load_script("bench/ood_bench.py")
    results, reference = bench.measure(root / "m.pth", root / "run", data, {"far": far_and_test(frozen) / "far"})
    assert set(results) == set(ood.METHODS) | {f"knn k={k}" for k in bench.K_SWEEP} and reference["method"] == "knn"
    assert results[f"knn k={ood.K}"]["fpr95"] == results["knn"]["fpr95"] and ood.K == 3  # the sweep's k=3 row
    for method in ood.METHODS:
        r = results[method]
        assert 0 <= r["auroc"]["far"] <= 1 and 0 <= r["fpr95"]["far"] <= 1 and 0.5 <= r["test_kept"] <= 1, method
    assert results["knn"]["auroc"]["far"] > 0.95 and results["knn"]["accepted"]["far"] <= 1 / 12
    assert bench.fpr_at(
        torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.05, 0.35, 0.5]), keep=0.75
    ) == pytest.approx(1 / 3)  # cut 0.3


def test_a_stop_signal_during_the_extra_pass_keeps_the_checkpoint_without_a_reference(
    tiny_data, tmp_path, monkeypatch, capsys
):
    from helpers import interrupt_when_called

    interrupt_when_called(monkeypatch, ood, "collect_features")  # a real SIGINT as the pass starts
    with pytest.raises(SystemExit) as e:
        train.main(
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
                        "--n_epochs",
                        "1",
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
    out = capsys.readouterr().out
    assert e.value.code == 130 and "out-of-distribution reference: none kept (interrupted)" in out
    assert "interrupted at the end of training" in out
    ckpt = model_loader.load_checkpoint(tmp_path / "m.pth")
    assert "ood" not in ckpt and ckpt["epoch"] == 1 and ckpt["temperature"] > 0
