"""int8.py and export.py --int8: the int8 build, calibrated on the model's training images, held against fp32 by the
gate before anything is written; predict.py runs it like any ONNX file."""

import json

import onnx
import pytest
import torch

import data_loader as dl
import export
import int8
import model_loader as ml
import predict
import train
from conftest import copy_subset, run_in_process
from helpers import earlier_onnx, read_csv, run_predict


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A frozen resnet18 (one epoch, 32 px, an out-of-distribution reference) and its int8 build."""
    root = tmp_path_factory.mktemp("int8")
    data = copy_subset(root / "data", ["bag", "sneaker", "trouser"], 16, 6)
    train.main(
        train.parse_args(
            [
                str(a)
                for a in [
                    "--data_dir",
                    data,
                    "--model_name",
                    "resnet18",
                    "--input_size",
                    "32",
                    "--n_epochs",
                    "1",
                    "--freeze",
                    "--model_fn",
                    root / "m.pth",
                    "--log_dir",
                    root / "run",
                    "--num_workers",
                    "0",
                    "--verbose",
                    "0",
                ]
            ]
        )
    )
    return root, data


def test_the_int8_build_is_written_with_its_figures_and_predicts_like_fp32(trained, tmp_path, capsys):
    root, data = trained
    capsys.readouterr()
    export.main(export.parse_args(["--model_fn", str(root / "m.pth"), "--int8", "--calibration_images", "24"]))
    out = capsys.readouterr().out
    assert "quantized the backbone; kept in fp32: the classifier layer and the out-of-distribution score" in out
    assert ("int8: 7-bit weights: this x86 CPU has no VNNI" in out) == (int8.weight_format() == "s7")  # says why
    line = [ln for ln in out.splitlines() if ln.startswith("int8 (")][0]
    assert (
        "on 24 training images, " in line and "held against fp32 on 18 images" in line and "top-1 agreement" in line
    ), out
    path = root / "m.int8.onnx"
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    figures = json.loads(meta["int8"])
    assert figures["gate_images"] == 18 and figures["labelled"] and 0 <= figures["agreement"] <= 1
    assert figures["calibration"] in int8.METHODS and figures["int8_mb"] < figures["fp32_mb"]
    assert figures["weights"] == int8.weight_format() and f"{int8.WEIGHT_WORDS[figures['weights']]} weights" in line
    printed = run_predict(capsys, "--model_fn", path, "--data_dir", data / "test", "--output", tmp_path / "q.csv")
    run_predict(capsys, "--model_fn", root / "m.pth", "--data_dir", data / "test", "--output", tmp_path / "f.csv")
    assert "int8 (" in printed and "speed-up" in printed  # one line with the gate's figures
    import serve
    from predictor import Predictor

    card = serve.model_card(Predictor.load(path, log=lambda *a: None), serve.Settings(model_fn=str(path)))
    assert card["int8"]["agreement"] == figures["agreement"] and card["int8"]["calibration"] == figures["calibration"]
    q, f = read_csv(tmp_path / "q.csv"), read_csv(tmp_path / "f.csv")
    assert list(q[0]) == list(f[0]) and [r["file_dir"] for r in q] == [r["file_dir"] for r in f]
    # the out-of-distribution flag on the gate images (the test folder), counted as predict.py writes it
    assert float(meta["ood_threshold"]) == figures["ood_threshold"] and "out-of-distribution flag agreement" in line
    unlike = [[r["in_distribution"] == "0" for r in rows] for rows in (f, q)]
    assert [sum(u) for u in unlike] == [figures["ood_flagged_fp32"], figures["ood_flagged_int8"]]
    assert sum(a == b for a, b in zip(*unlike)) / len(q) == pytest.approx(figures["ood_agreement"])


def test_per_channel_weights_and_the_head_in_fp32(trained):
    """Every convolution's weight has one scale per output channel (per-tensor scales break depthwise
    convolutions); the classifier and the out-of-distribution graph read fp32 weights."""
    root, _ = trained
    graph = onnx.load(root / "m.int8.onnx").graph
    producer = {o: n for n in graph.node for o in n.output}
    sizes = {i.name: list(i.dims) for i in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs
    for conv in convs:
        dequantize = producer[conv.input[1]]
        assert dequantize.op_type == "DequantizeLinear", conv.name
        scale = sizes[dequantize.input[1]]
        assert scale and scale[0] > 1, (conv.name, scale)  # per output channel
    gemm = [n for n in graph.node if n.op_type == "Gemm"][0]
    assert gemm.input[1] in sizes and gemm.input[1] not in producer  # its weight is a plain fp32 initializer


def test_calibration_uses_the_training_images_through_the_eval_transform(trained):
    root, data = trained
    ckpt = ml.load_checkpoint(root / "m.pth")
    chosen = int8.training_files(ckpt, 9)
    assert sorted(dl.Path(f).parent.name for f in chosen) == ["bag"] * 3 + ["sneaker"] * 3 + ["trouser"] * 3
    assert all("/train/" in f for f in chosen)
    pre = dl.Preprocess.of(ckpt)
    batch = int8.load_batch(chosen, pre)
    expected = torch.stack([pre.transform()(dl.load_rgb(f)) for f in chosen])
    assert batch.shape == (9, 3, 32, 32) and torch.allclose(batch, expected)


def test_the_gate_refuses_and_writes_nothing(trained, tmp_path, capsys):
    """An impossible --max_drop: one error line naming the figure and what to try, status 2, an earlier file of the
    same name untouched."""
    root, _ = trained
    earlier = tmp_path / "old.int8.onnx"
    old = earlier_onnx(earlier)
    err = run_in_process(
        export,
        [
            "--model_fn",
            root / "m.pth",
            "--int8",
            "--output",
            earlier,
            "--max_drop",
            "-1",
            "--calibration",
            "minmax",
            "--calibration_images",
            "12",
        ],
        capsys,
    )
    assert "int8 loses" in err and "more than --max_drop -1" in err and "nothing was written" in err, err
    assert "or train the model for int8 first with --qat 6" in err  # what to try
    assert earlier.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == [earlier.name]
    err = run_in_process(
        export,
        ["--model_fn", root / "m.pth", "--int8", "--output", tmp_path / "x.int8.onnx", "--min_agreement", "1.5"],
        capsys,
    )
    assert "--min_agreement must be in [0, 1]" in err
    err = run_in_process(
        export,
        ["--model_fn", root / "m.pth", "--int8", "--output", tmp_path / "x.int8.onnx", "--min_ood_agreement", "-0.1"],
        capsys,
    )
    assert "--min_ood_agreement must be in [0, 1]" in err


def test_auto_calibration_says_why_each_method_was_refused_before_the_next(trained, tmp_path, capsys):
    from cli import CLIError

    root, _ = trained
    capsys.readouterr()
    argv = ["--model_fn", root / "m.pth", "--int8", "--output", tmp_path / "a.int8.onnx", "--max_drop", -1]
    with pytest.raises(CLIError, match="more than --max_drop -1"):
        export.main(export.parse_args([str(a) for a in [*argv, "--calibration_images", 16]]))
    refused = [ln for ln in capsys.readouterr().out.splitlines() if "calibration refused by the gate" in ln]
    assert [ln.split(" calibration")[0] for ln in refused] == ["int8, minmax", "int8, percentile"], refused
    assert all("int8 loses" in ln and ln.endswith("; trying the next method") for ln in refused), refused
    assert list(tmp_path.iterdir()) == []


def test_without_labels_only_the_agreement_is_gated(trained, tmp_path, capsys):
    root, data = trained
    loose = tmp_path / "loose"
    loose.mkdir()
    for f in sorted((data / "test").rglob("*.png")):
        (loose / f"{f.parent.name}_{f.name}").write_bytes(f.read_bytes())
    capsys.readouterr()
    export.main(
        export.parse_args(
            [
                "--model_fn",
                str(root / "m.pth"),
                "--int8",
                "--data_dir",
                str(loose),
                "--output",
                str(tmp_path / "u.int8.onnx"),
                "--calibration_images",
                "12",
                "--min_agreement",
                "0",
            ]
        )
    )
    out = capsys.readouterr().out
    assert "only the agreement was gated" in out and "no labelled images: accuracy not measured" in out


def test_the_out_of_distribution_threshold_is_refitted_where_int8_moves_the_score():
    """Quantization noise raises the knn score (on solar cells fp32's threshold flagged 56 of 160 held-out cells
    for int8, 13 for fp32): fit_ood keeps the candidate whose flags agree best with fp32's, and the gate holds it."""
    fp32 = torch.linspace(0, 1, 40)
    ckpt = {"ood": {"method": "knn", "threshold": 0.8, "k": 3}}
    outputs = (
        torch.zeros(40, 3),
        fp32 + 0.3,
        torch.zeros(40, 8),
    )  # every score moved up: fp32's threshold flags 20, not 8
    figures = int8.Figures("minmax", 24, 40, True, 1.0, 1.0, 1.0, 0.0)
    int8.fit_ood(figures, None, None, ckpt, fp32, outputs)
    assert figures.ood_refit == "threshold" and figures.ood_agreement == 1.0
    assert figures.ood_flagged_both == 8  # halfway between the highest score unflagged and the lowest flagged:
    assert figures.ood_flagged_fp32 == figures.ood_flagged_int8 == 8 and figures.ood_threshold == pytest.approx(
        31.5 / 39 + 0.3
    )
    assert float(int8.metadata(figures)["ood_threshold"]) == figures.ood_threshold  # predict.py reads it there
    int8.fit_ood(figures, None, None, ckpt, fp32, (outputs[0], fp32.clone(), outputs[2]))  # nothing moved
    assert figures.ood_refit == "" and figures.ood_threshold == 0.8 and figures.ood_agreement == 1.0
    assert int8.metadata(figures)["ood_threshold"] == "0.8"
    figures.speedup_batch1, figures.speedup_batch32 = 0.57, 1.15  # timed where it was built: said, not refused
    note = int8.speed_note(figures)
    assert note.startswith("note: on this CPU the int8 file ran slower than fp32 (0.57x at batch 1)"), note
    figures.speedup_batch1 = 1.2
    assert int8.speed_note(figures) == ""
    figures.ood_agreement = 0.9
    reason = int8.failure(figures, 1.0, 0.98, 0.95)
    assert "out-of-distribution flag (in_distribution) agrees with fp32's on 90.00%" in reason
    assert "under --min_ood_agreement 0.95" in reason and not int8.failure(figures, 1.0, 0.98, 0.9)


def test_a_rebuilt_knn_reference_replaces_the_graph_constant(trained, tmp_path):
    """replace_knn_bank swaps the reference rows inside an exported file (another row count included): the file then
    scores as ood.score does with the new rows, and a constant that is not there is not replaced."""
    import ood

    root, _ = trained
    ckpt = ml.load_checkpoint(root / "m.pth")
    path = tmp_path / "m.onnx"  # the fp32 export holds the same constant as the int8 build
    export.main(export.parse_args(["--model_fn", str(root / "m.pth"), "--output", str(path), "--verbose", "0"]))
    images = int8.load_batch(int8.training_files(ckpt, 30), dl.Preprocess.of(ckpt))
    logits, before, features = int8.run_model(path, images)
    bank = ood.knn_bank(features[:20], ood.MAX_REFERENCE_MB, seed=0)
    assert bank.shape[0] != ckpt["ood"]["features"].shape[0]
    assert not int8.replace_knn_bank(path, bank, bank)  # not the file's constant
    assert int8.replace_knn_bank(path, ckpt["ood"]["features"], bank)
    _, after, _ = int8.run_model(path, images)
    expected = ood.score({**ckpt["ood"], "features": bank}, 1.0, features, logits)
    assert torch.allclose(after, expected, atol=1e-3) and not torch.allclose(after, before, atol=1e-3)


def test_the_reference_rebuilt_from_int8_features_is_kept_where_it_flags_as_fp32_does(trained, tmp_path):
    """fit_ood on a real int8 file, with the fp32 scores standing where the rebuilt reference puts them: the rebuilt
    candidate is kept, written into the file, and the figures are the file's own."""
    import copy

    import ood

    root, data = trained
    ckpt = ml.load_checkpoint(root / "m.pth")
    pre = dl.Preprocess.of(ckpt)
    fp32, path = tmp_path / "m.onnx", tmp_path / "m.int8.onnx"
    export.main(export.parse_args(["--model_fn", str(root / "m.pth"), "--output", str(fp32), "--verbose", "0"]))
    training = int8.load_batch(int8.training_files(ckpt, 48), pre)
    int8.quantize(fp32, path, training, "minmax", int8.weight_format())
    gate = int8.load_batch(sorted(str(f) for f in (data / "test").rglob("*.png")), pre)
    outputs = int8.run_model(path, gate)
    bank = ood.knn_bank(int8.run_model(path, training)[2], ood.MAX_REFERENCE_MB, seed=0)
    rebuilt = ood.score({**ckpt["ood"], "features": bank}, ckpt.get("temperature", 1.0), outputs[2], outputs[0])
    order_rebuilt, order_built = rebuilt.argsort(descending=True), outputs[1].argsort(descending=True)
    k = next(k for k in range(1, 9) if set(order_rebuilt[:k].tolist()) != set(order_built[:k].tolist()))
    stand_in = copy.deepcopy(ckpt)  # fp32's threshold flags the k images the rebuilt reference scores highest
    stand_in["ood"]["threshold"] = float(rebuilt.sort(descending=True).values[k - 1 : k + 1].mean())
    figures = int8.Figures("minmax", 48, len(gate), True, 1.0, 1.0, 1.0, 0.0)
    int8.fit_ood(figures, path, gate, stand_in, rebuilt, outputs, training)
    assert figures.ood_refit == "reference" and figures.ood_reference_images == len(bank) == 48
    assert figures.ood_agreement == 1.0 and figures.ood_flagged_fp32 == figures.ood_flagged_int8 == k
    assert torch.allclose(int8.run_model(path, gate)[1], rebuilt, atol=1e-4)  # the file scores with the new rows
    assert "reference rebuilt from int8 features of 48 training images" in figures.ood_words()


def test_seven_bit_weights_where_eight_bit_ones_can_saturate(tmp_path, monkeypatch):
    """x86 without VNNI adds pairs of uint8 x int8 products in 16 bits: the build takes 7 bits of range there, and
    where the flags cannot be read."""
    x86, arm = tmp_path / "x86", tmp_path / "arm"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\n")
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp\n")
    assert int8.cpu_flags(str(x86)) == {"fpu", "sse2", "avx2", "fma"} and "asimddp" in int8.cpu_flags(str(arm))
    assert int8.cpu_flags(str(tmp_path / "missing")) is None
    assert int8.saturates("x86_64", int8.cpu_flags(str(x86))) is True
    assert int8.saturates("AMD64", {"avx512f", "avx512bw"}) is True
    assert (
        int8.saturates("x86_64", {"avx2", "avx512_vnni"}) is False and int8.saturates("x86_64", {"avx_vnni"}) is False
    )
    assert int8.saturates("aarch64", set()) is False
    for found, weights in ((True, "s7"), (None, "s7"), (False, "s8")):
        monkeypatch.setattr(int8, "saturates", lambda *a, found=found: found)
        assert int8.weight_format() == weights


def test_the_warning_for_8_bit_weights_where_they_saturate(monkeypatch):
    old = int8.Figures.from_metadata(
        {
            "calibration": "minmax",
            "calibration_images": 1,
            "gate_images": 1,
            "labelled": True,
            "accuracy_fp32": 1.0,
            "accuracy_int8": 1.0,
            "agreement": 1.0,
            "max_prob_diff": 0.0,
        }
    )  # a file from before the weights
    assert old.weights == "s8" and old.built_saturating is None
    monkeypatch.setattr(int8, "saturates", lambda *a: True)
    assert "can saturate" in int8.cpu_warning(old) and not int8.cpu_warning(old, "cuda")
    for weights, built_saturating, warns in (("s8", False, True), ("s8", True, False), ("s7", False, False)):
        figures = int8.Figures(**{**vars(old), "weights": weights, "built_saturating": built_saturating})
        assert bool(int8.cpu_warning(figures)) == warns, (weights, built_saturating)
    monkeypatch.setattr(int8, "saturates", lambda *a: False)
    assert not int8.cpu_warning(old)


def conv_weights(path):
    """The int8 values of every convolution's weight in an int8 QDQ file."""
    import numpy as np
    from onnx import numpy_helper

    graph = onnx.load(path).graph
    producer = {o: n for n in graph.node for o in n.output}
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    return np.concatenate([values[producer[c.input[1]].input[0]].ravel() for c in convs])


def test_the_weights_range_is_kept_and_8_bit_weights_warn_where_they_saturate(trained, tmp_path, capsys, monkeypatch):
    root, data = trained
    built = {}
    monkeypatch.setattr(int8, "saturates", lambda *a: False)  # built on a CPU with VNNI
    for weights in ("s7", "s8"):
        built[weights] = tmp_path / f"m.{weights}.int8.onnx"
        argv = ["--model_fn", root / "m.pth", "--int8", "--int8_weights", weights, "--calibration", "minmax"]
        argv += ["--calibration_images", "12", "--max_drop", "100", "--min_agreement", "0"]
        export.main(export.parse_args([str(a) for a in [*argv, "--output", built[weights]]]))
    assert "int8: 7-bit weights: this x86 CPU" not in capsys.readouterr().out  # asked for, not chosen for this CPU
    s7, s8 = conv_weights(built["s7"]), conv_weights(built["s8"])
    assert abs(s7.astype(int)).max() == 64  # +-64: two products of 255 x 64 add up within 16 bits
    assert abs(s8.astype(int)).max() == 127
    monkeypatch.setattr(int8, "saturates", lambda *a: True)  # a CPU without VNNI
    for weights, warned in (("s8", True), ("s7", False)):
        argv = ["--model_fn", built[weights], "--data_dir", data / "test", "--output", tmp_path / "p.csv"]
        predict.main(predict.parse_args([str(a) for a in [*argv, "--num_workers", "0"]]))
        err = capsys.readouterr().err
        assert ("8-bit weights, and this CPU has no VNNI" in err) == warned, (weights, err)
    import serve
    from predictor import Predictor

    card = serve.model_card(Predictor.load(built["s8"], log=lambda *a: None), serve.Settings(model_fn="m.onnx"))
    assert card["int8"]["weights"] == "s8" and "can saturate" in card["int8_warning"]


# ----------------------------------------------------------------------------- --qat: quantization-aware training


def int8_logits(trained, tmp_path):
    """(calibration images, held-out images, fp32 model, head, the int8 file's logits on the held-out images)."""
    root, data = trained
    ckpt = ml.load_checkpoint(root / "m.pth")
    pre = dl.Preprocess.of(ckpt)
    calibration = int8.load_batch(int8.training_files(ckpt, 24), pre)
    held_out = int8.load_batch([str(f) for f in sorted((data / "test").rglob("*.png"))], pre)
    export.main(export.parse_args(["--model_fn", str(root / "m.pth"), "--output", str(tmp_path / "f.onnx")]))
    int8.quantize(tmp_path / "f.onnx", tmp_path / "q.onnx", calibration, "minmax", int8.weight_format())
    model, head = ml.model_from_checkpoint(ckpt)
    return calibration, held_out, model.eval(), head, int8.run_model(tmp_path / "q.onnx", held_out)[0]


@pytest.mark.parametrize("which", ["trained", "lite0"])  # ResNet-18's blocks, EfficientNet-Lite0's
def test_the_simulation_rounds_as_the_int8_file_does(which, request, tmp_path):
    """qat.simulate's logits are far closer to onnxruntime's int8 file's than the fp32 model's are: it rounds the
    weights and activations where the file does. Outside it, the model is fp32 again."""
    calibration, held_out, model, head, q = int8_logits(request.getfixturevalue(which), tmp_path)
    import qat

    ranges = qat.activation_ranges(model, head, calibration)
    with torch.no_grad():
        fp32 = model(held_out)
        with qat.simulate(model, head, ranges, int8.QMAX[int8.weight_format()]):
            simulated = model(held_out)
        assert torch.equal(model(held_out), fp32)
    off, noise = float((simulated - q).abs().mean()), float((fp32 - q).abs().mean())
    print(f"simulated against int8 {off:.4f}, fp32 against int8 {noise:.4f}")
    assert noise > 0 and off < 0.3 * noise, (off, noise)


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    """A frozen ImageNet backbone (EfficientNet-Lite0 from its pip package) at 64 px with a head on 3 classes:
    quantization-aware training is for pretrained features (on a random backbone it has nothing to keep)."""
    root = tmp_path_factory.mktemp("qat")
    data = copy_subset(root / "data", ["bag", "sneaker", "trouser"], 16, 6)
    flags = ["--model_name", "efficientnet_lite0", "--use_pretrained", "--input_size", 64, "--n_epochs", 3]
    flags += ["--freeze", "--num_workers", 0, "--verbose", 0, "--log_dir", root / "run"]
    train.main(train.parse_args([str(a) for a in ["--data_dir", data, *flags, "--model_fn", root / "m.pth"]]))
    return root, data


def test_qat_trains_toward_the_fp32_answers_and_can_be_stopped(lite0):
    import qat

    ckpt = ml.load_checkpoint(lite0[0] / "m.pth")
    model, head = ml.model_from_checkpoint(ckpt)
    model.eval()
    calibration = int8.load_batch(int8.training_files(ckpt, 24), dl.Preprocess.of(ckpt))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmax = int8.QMAX[int8.weight_format()]
    student, losses = qat.distill(model, head, calibration, 3, qmax, log=lambda *a: None)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))

    def gap(net):  # how far its int8 logits are from the fp32 model's, on the images it was calibrated on
        with torch.no_grad(), qat.simulate(net, head, qat.activation_ranges(net, head, calibration), qmax):
            return float(((net(calibration) - fp32) ** 2).mean())

    with torch.no_grad():
        fp32 = model(calibration)
    assert gap(student) < 0.5 * gap(model), (gap(student), gap(model))  # measured: 1.61 -> 0.35
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the fp32 model is untouched
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and not any(k.startswith(head + ".") for k in changed)  # the backbone learns, the head is kept
    assert not any(p.requires_grad for p in student.parameters())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in (*model.modules(), *student.modules()))
    assert qat.distill(model, head, calibration, 3, qmax, stop=lambda: True, log=lambda *a: None) == (None, [])
    _, one = qat.distill(model, head, calibration[:1], 1, qmax, log=lambda *a: None)  # one image: no NaN variance
    assert len(one) == 1 and torch.isfinite(torch.tensor(one)).all(), one


def test_qat_counts_the_layers_it_does_not_simulate():
    import torchvision

    import qat

    with torch.device("meta"):
        vit, resnet = torchvision.models.vit_b_16(), torchvision.models.resnet18()
    assert qat.unsimulated(vit, "heads.head") > 40 and qat.unsimulated(resnet, "fc") == 0


def test_export_qat_builds_from_the_trained_weights_held_against_the_original(lite0, tmp_path, capsys):
    root, _ = lite0
    common = ["--model_fn", root / "m.pth", "--int8", "--calibration", "minmax", "--calibration_images", 24]
    common += ["--max_drop", 100, "--min_agreement", 0]
    figures = {}
    for epochs in (0, 2):
        path = tmp_path / f"q{epochs}.int8.onnx"
        capsys.readouterr()
        export.main(export.parse_args([str(a) for a in [*common, "--qat", epochs, "--output", path]]))
        out = capsys.readouterr().out
        figures[epochs] = json.loads({p.key: p.value for p in onnx.load(path).metadata_props}["int8"])
        assert ("after 2 epochs of quantization-aware training;" in out) == (epochs == 2), out
        assert ("quantization-aware training, epoch 2/2: loss" in out) == (epochs == 2), out
    assert figures[0]["qat_epochs"] == 0 and figures[2]["qat_epochs"] == 2
    assert figures[2]["accuracy_fp32"] == figures[0]["accuracy_fp32"]  # held against the same fp32 model
    q0, q2 = (conv_weights(tmp_path / f"q{e}.int8.onnx") for e in (0, 2))
    assert q0.shape == q2.shape and (q0 != q2).any()  # the trained weights were quantized
    for argv, words in (
        (["--model_fn", root / "m.pth", "--qat", 2], "--qat EPOCHS trains for the int8 build: give it with --int8"),
        ([*common, "--qat", -1], "--qat EPOCHS trains for the int8 build"),
    ):
        err = run_in_process(export, argv, capsys)
        assert words in err, err


def test_ctrl_c_during_qat_writes_nothing(trained, tmp_path, capsys):
    root, _ = trained
    ckpt = ml.load_checkpoint(root / "m.pth")
    args = export.parse_args(["--model_fn", str(root / "m.pth"), "--int8", "--qat", "1"])
    images = int8.load_batch(int8.training_files(ckpt, 8), dl.Preprocess.of(ckpt))

    class Stopped:
        requested = True

    path = tmp_path / "qat.onnx"
    assert not export.quantization_aware(path, images[:2], {}, images, ckpt, args, Stopped())
    assert not path.exists()


def test_ctrl_c_during_qat_in_export_py_writes_nothing(trained, tmp_path):
    """SIGINT while export.py --qat trains (the flag is checked after every batch): one line, status 130, no output
    and no temporary file left beside it."""
    import os
    import signal
    import subprocess
    import sys

    root, _ = trained
    out = tmp_path / "q.int8.onnx"
    command = [sys.executable, str(export.__file__), "--model_fn", str(root / "m.pth"), "--int8", "--qat", "200"]
    command += ["--calibration_images", "24", "--output", str(out)]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        for line in proc.stdout:
            if "quantization-aware training, epoch 1/200" in line:
                proc.send_signal(signal.SIGINT)
                break
        rest, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "epoch 2/200" not in rest  # it stopped within the batch it was in, not after the training
    assert f"interrupted; {out} was not written" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []
