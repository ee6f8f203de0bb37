"""export.py: ONNX and .pt2 files that agree with the PyTorch model, carry the checkpoint's metadata, refuse
to be written when they disagree; predict.py on an .onnx file; the README's onnxruntime-only deployment."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from PIL import Image

import export
import exported_model
import model_loader
import predict
from cli import CLIError
from conftest import run_in_process
from helpers import earlier_onnx, read_csv, readme_deploy_snippet

FAMILIES = ["resnet18", "mobilenet_v2", "densenet121", "squeezenet1_0"]
SIZE = 32  # px: every family runs at this size, and exports in seconds


def onednn(name):
    """oneDNN compiles a kernel for each of DenseNet's ~120 distinct convolution shapes, which at 32 px costs
    far more (tens of seconds) than the convolutions; PyTorch's own kernels run it in a few (MobileNet's
    depthwise convolutions need oneDNN, on the other hand)."""
    import contextlib
    import warnings

    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.filterwarnings("ignore", "TF32 acceleration on top of oneDNN")  # said on every flags() change
    stack.enter_context(torch.backends.mkldnn.flags(enabled=name != "densenet121"))
    return stack


def real_batch(folder, n):
    from data_loader import build_transforms, list_images, load_rgb

    tf = build_transforms(
        SIZE,
        36,
        model_loader.model_defaults("resnet18")["mean"],
        model_loader.model_defaults("resnet18")["std"],
        train=False,
    )
    return torch.stack([tf(load_rgb(f)) for f in list_images(folder)[:n]])


def make_ckpt(name, data, path, temperature=None):
    """A checkpoint of train.py's format from a randomly initialised model whose BatchNorm statistics were
    measured on real images (train mode, cumulative average) and whose head was drawn at a larger scale, so
    that the probabilities are far from uniform and a wrong export shows."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=3)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model.train()(real_batch(data / "train", 8))
        head = model.get_submodule(model_loader.find_head(model, 3))
        head.weight.normal_(0, 3 / head.weight[0].numel() ** 0.5)  # logits of a few units, as trained heads give
        head.bias.uniform_(0, 1)  # SqueezeNet's head ends in a ReLU: keep some logits above zero
    defaults = model_loader.model_defaults("resnet18")
    ckpt = model_loader.make_checkpoint(
        model.eval(),
        name,
        ["bag", "sneaker", "trouser"],
        SIZE,
        36,
        defaults["mean"],
        defaults["std"],
        1,
        {"valid_loss": 1.0},
        {"data_dir": str(data), "dataset_name": None},
    )
    if temperature is not None:
        ckpt["temperature"] = temperature
    model_loader.save_checkpoint(ckpt, path)
    return ckpt, model


@pytest.fixture(scope="module")
def ckpts(tiny_data, tmp_path_factory):
    """{family: (path, checkpoint, model)}; resnet18's checkpoint has a temperature, the others none."""
    folder = tmp_path_factory.mktemp("ckpts")
    out = {}
    for name in FAMILIES:
        path = folder / f"{name}.pth"
        with onednn(name):
            ckpt, model = make_ckpt(name, tiny_data, path, temperature=1.5 if name == "resnet18" else None)
        out[name] = (path, ckpt, model)
    return out


@pytest.fixture(scope="module")
def exported(ckpts, tmp_path_factory):
    """{family: (its .onnx file, what export.py printed, the folder)}: each family exported once."""
    import contextlib
    import io

    out = {}
    for name, (path, _, _) in ckpts.items():
        folder = tmp_path_factory.mktemp(f"onnx_{name}")
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), onednn(name):
            export.main(
                export.parse_args(
                    ["--model_fn", str(path), "--output", str(folder / f"{name}.onnx"), "--check_images", "8"]
                )
            )
        out[name] = (folder / f"{name}.onnx", printed.getvalue(), folder)
    return out


def run_export(capsys, *argv):
    export.main(export.parse_args([str(a) for a in argv]))
    return capsys.readouterr().out


def check_line(out):
    """(max probability difference, agreeing, checked) from export.py's check line."""
    found = re.search(r"max probability difference (\S+), top-1 agreement (\d+)/(\d+)", out)
    assert found, out
    return float(found.group(1)), int(found.group(2)), int(found.group(3))


def probs(logits, temperature=1.0):
    return (torch.as_tensor(logits).float() / temperature).softmax(1)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


@pytest.mark.parametrize("name", FAMILIES)
def test_onnx_round_trip_metadata_and_dynamic_batch(ckpts, exported, tiny_data, name):
    path, ckpt, model = ckpts[name]
    onnx_path, out, folder = exported[name]
    diff, agree, n = check_line(out)
    assert n == 8 and f"8 images of {tiny_data / 'test'}" in out  # the training data's test folder
    assert diff <= 1e-4 and agree == n
    assert f"exported {name} (3 classes, 32 px) as onnx" in out
    assert sorted(p.name for p in folder.iterdir()) == [onnx_path.name]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert onnx_path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable by others as open() leaves it, not 0600

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"] and [o.name for o in session.get_outputs()] == ["logits"]
    assert session.get_inputs()[0].type == "tensor(float)"
    meta = session.get_modelmeta().custom_metadata_map
    assert set(meta) == set(exported_model.EXPORT_KEYS) | {"metrics"}  # the figures: optional, for the model card
    assert json.loads(meta["metrics"]) == ckpt["metrics"]
    assert json.loads(meta["class_names"]) == ["bag", "sneaker", "trouser"]
    assert json.loads(meta["mean"]) == ckpt["mean"] and json.loads(meta["std"]) == ckpt["std"]
    assert (meta["input_size"], meta["resize_size"], meta["model_name"]) == ("32", "36", name)
    assert float(meta["temperature"]) == (1.5 if name == "resnet18" else 1.0)
    assert meta["format_version"] == "1" and meta["torch_version"] == torch.__version__
    assert meta["torchvision_version"] == torchvision.__version__
    assert json.loads(meta["args"])["data_dir"] == str(tiny_data)

    images = real_batch(tiny_data / "test", 7)
    with torch.no_grad(), onednn(name):
        expected = probs(model(images))
    for batch in (images[:1], images):  # the batch axis is dynamic: 1 and 7 both run
        got = probs(session.run(["logits"], {"input": batch.numpy()})[0])
        assert got.shape == (len(batch), 3)
        assert torch.allclose(got, expected[: len(batch)], atol=1e-4, rtol=0)
    assert expected.max(1).values.mean() > 0.5  # far from uniform (1/3): a wrong export would show


def test_self_check_catches_a_wrong_export_and_writes_nothing(ckpts, tmp_path, capsys, monkeypatch):
    path = ckpts["squeezenet1_0"][0]
    target = tmp_path / "m.onnx"
    earlier = earlier_onnx(target)
    real_write = export.write_onnx

    def tampered(model, example, out, meta, opset, exporter):  # the file's head bias shifted by 1
        real_write(model, example, out, meta, opset, exporter)
        proto = onnx.load(str(out))
        bias = next(t for t in proto.graph.initializer if t.name == "classifier.1.bias")
        values = onnx.numpy_helper.to_array(bias).copy()
        values[0] += 1.0
        bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
        onnx.save(proto, str(out))

    monkeypatch.setattr(export, "write_onnx", tampered)
    with pytest.raises(
        CLIError,
        match=r"disagrees with the PyTorch model: probabilities differ by up to .*nothing "
        r"was written; try --exporter dynamo, or --format pt2$",
    ):  # the other exporter may agree
        run_export(capsys, "--model_fn", path, "--output", target, "--check_images", "4")
    assert target.read_bytes() == earlier and leftovers(tmp_path) == []
    dynamo = export.parse_args(["--exporter", "dynamo"])
    assert export.other_ways("onnx", dynamo) == "try --exporter torchscript, or --format pt2"
    assert export.other_ways("pt2", dynamo) == "try --format onnx"


def test_pt2_loads_without_this_project_and_agrees(ckpts, tiny_data, tmp_path, capsys):
    path, ckpt, model = ckpts["resnet18"]
    out = run_export(capsys, "--model_fn", path, "--output", tmp_path / "m.pt2", "--check_images", "4")
    diff, agree, n = check_line(out)
    assert diff <= 1e-4 and agree == n == 4
    images = real_batch(tiny_data / "test", 7)
    np.save(tmp_path / "images.npy", images.numpy())
    script = f"""
import json, sys, numpy as np, torch
keys = {list(exported_model.EXPORT_KEYS)!r}
extra = dict.fromkeys(keys, "")
module = torch.export.load("m.pt2", extra_files=extra).module()
images = torch.from_numpy(np.load("images.npy"))
one, seven = module(images[:1]), module(images)
print(json.dumps({{"meta": extra, "one": one.tolist(), "seven": seven.tolist(),
                  "project": [m for m in ("model_loader", "export", "utils") if m in sys.modules]}}))
"""
    proc = subprocess.run(
        [sys.executable, "-I", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["project"] == [] and result["meta"] == exported_model.export_metadata(ckpt)
    with torch.no_grad():
        expected = probs(model(images))
    assert torch.allclose(probs(result["seven"]), expected, atol=1e-4, rtol=0)
    assert torch.allclose(probs(result["one"]), expected[:1], atol=1e-4, rtol=0)


def test_dynamo_exporter_and_opset(ckpts, tmp_path, capsys):
    path = ckpts["squeezenet1_0"][0]
    out = run_export(
        capsys,
        "--model_fn",
        path,
        "--output",
        tmp_path / "d.onnx",
        "--exporter",
        "dynamo",
        "--opset",
        "18",
        "--check_images",
        "5",
    )
    diff, agree, n = check_line(out)
    assert diff <= 1e-4 and agree == n == 5
    proto = onnx.load(str(tmp_path / "d.onnx"))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [18]
    assert {p.key for p in proto.metadata_props} == set(exported_model.EXPORT_KEYS) | {"metrics"}


def test_random_tensors_when_the_training_data_is_gone(ckpts, tmp_path, capsys):
    """The check falls back to random tensors, and says why in one line."""
    ckpt = dict(ckpts["squeezenet1_0"][1], args={"data_dir": str(tmp_path / "gone"), "dataset_name": None})
    model_loader.save_checkpoint(ckpt, tmp_path / "m.pth")
    export.main(export.parse_args(["--model_fn", str(tmp_path / "m.pth"), "--check_images", "3"]))  # -> m.onnx
    out, err = capsys.readouterr()
    assert "check on 3 random tensors" in out and check_line(out)[0] <= 1e-4
    assert err == (
        f"warning: the check runs on random tensors, not on images: the training data's test folder "
        f"{str(tmp_path / 'gone' / 'test')!r} does not exist (--data_dir DIR checks on yours)\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.pth"]
    ckpt["args"] = {"labels_csv": str(tmp_path / "labels.csv")}  # trained on a CSV that is not there
    model_loader.save_checkpoint(ckpt, tmp_path / "m.pth")
    export.main(export.parse_args(["--model_fn", str(tmp_path / "m.pth"), "--check_images", "3"]))
    out, err = capsys.readouterr()
    assert "check on 3 random tensors" in out and err.count("\n") == 1
    assert err.startswith(
        "warning: the check runs on random tensors, not on images: the CSV the model was trained "
        f"with: --labels_csv {str(tmp_path / 'labels.csv')!r}"
    ), err


def test_verbose_as_train_and_predict_take_it(ckpts, tmp_path, capsys):
    """export.py accepts --verbose like train.py and predict.py; 0 prints the result line only."""
    path = ckpts["resnet18"][0]
    out = run_export(
        capsys, "--model_fn", path, "--output", tmp_path / "m.onnx", "--check_images", "2", "--verbose", "0"
    )
    assert len(out.splitlines()) == 1 and out.startswith("exported resnet18 (3 classes, 32 px) as onnx"), out
    assert (tmp_path / "m.onnx").stat().st_size > 1000


def test_predict_on_onnx_equals_pth(ckpts, exported, tmp_path, capsys):
    path = ckpts["resnet18"][0]
    for model_fn, name in (
        (path, "pth"),
        (exported["resnet18"][0], "onnx"),
    ):  # default inputs: the training test folder
        predict.main(
            predict.parse_args(
                [
                    str(a)
                    for a in (
                        "--model_fn",
                        model_fn,
                        "--output",
                        tmp_path / f"{name}.csv",
                        "--plot",
                        tmp_path / f"{name}.png",
                        "--num_workers",
                        "0",
                        "--verbose",
                        "0",
                    )
                ]
            )
        )
    out = capsys.readouterr().out
    assert out.count("accuracy") == 2 and (tmp_path / "onnx_confusion.png").stat().st_size > 1000
    pth, onnx_rows = read_csv(tmp_path / "pth.csv"), read_csv(tmp_path / "onnx.csv")
    assert len(pth) == 18 and [r["file_dir"] for r in pth] == [r["file_dir"] for r in onnx_rows]
    assert list(pth[0]) == list(onnx_rows[0])
    assert [r["predict"] for r in pth] == [r["predict"] for r in onnx_rows]
    assert len({r["predict"] for r in pth}) > 1  # not a constant model
    for a, b in zip(pth, onnx_rows):
        for key in ("confidence", "prob_bag", "prob_sneaker", "prob_trouser"):
            assert abs(float(a[key]) - float(b[key])) <= 1e-4, (key, a, b)


def test_readme_deployment_snippet_matches_predict(ckpts, exported, tiny_data, tmp_path, capsys):
    """docs/export.md's code, exactly, on images of several shapes (the resize and crop arithmetic): against
    predict.py's result.csv (a model without temperature), and against predict.py's preprocessing run by
    onnxruntime with the logits divided by the temperature (resnet18's checkpoint has T = 1.5). It runs
    without torch."""
    from data_loader import build_transforms, load_rgb

    code = readme_deploy_snippet()
    assert 15 <= len([ln for ln in code.splitlines() if ln.strip()]) <= 30
    (tmp_path / "deploy.py").write_text(code)
    images = tmp_path / "images"
    images.mkdir()
    sources = sorted((tiny_data / "test").rglob("*.png"))
    shapes = [(28, 28), (50, 37), (37, 50), (101, 64), (33, 97), (300, 200), (36, 36), (35, 36)]
    for i, (source, shape) in enumerate(zip(sources[::2], shapes)):
        Image.open(source).convert("RGB").resize(shape, Image.BICUBIC).save(images / f"img{i}.png")
    files = [str(p) for p in sorted(images.iterdir())]

    def deploy(onnx_path):
        runner = (
            "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path('deploy.py', run_name='__main__'); "
            "print('torch' in sys.modules)"
        )
        proc = subprocess.run(
            [sys.executable, "-c", runner, "deploy.py", str(onnx_path), *files],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        *lines, used_torch = proc.stdout.strip().splitlines()
        assert used_torch == "False" and len(lines) == len(files)
        return [line.rsplit(",", 2) for line in lines]

    plain_onnx = exported["squeezenet1_0"][0]
    predict.main(
        predict.parse_args(
            [
                str(a)
                for a in (
                    "--model_fn",
                    plain_onnx,
                    "--data_dir",
                    images,
                    "--output",
                    tmp_path / "r.csv",
                    "--n_images",
                    "0",
                    "--num_workers",
                    "0",
                    "--verbose",
                    "0",
                )
            ]
        )
    )
    rows = read_csv(tmp_path / "r.csv")
    assert [r["file_dir"] for r in rows] == files
    for (path, cls, confidence), row in zip(deploy(plain_onnx), rows):
        assert path == row["file_dir"] and cls == row["predict"]
        assert abs(float(confidence) - float(row["confidence"])) <= 1e-4, (path, confidence, row)

    calibrated = exported["resnet18"][0]
    ckpt = ckpts["resnet18"][1]
    assert ckpt["temperature"] == 1.5
    tf = build_transforms(ckpt["input_size"], ckpt["resize_size"], ckpt["mean"], ckpt["std"], train=False)
    batch = torch.stack([tf(load_rgb(f)) for f in files]).numpy()
    logits = ort.InferenceSession(str(calibrated)).run(["logits"], {"input": batch})[0]
    expected = probs(logits, 1.5)
    assert float(expected.max(1).values.min()) < float(probs(logits).max(1).values.min())  # T matters here
    for (path, cls, confidence), p in zip(deploy(calibrated), expected):
        assert cls == ckpt["class_names"][int(p.argmax())]
        assert abs(float(confidence) - float(p.max())) <= 1e-4, (path, confidence, p)


# ----------------------------------------------------------------------------- bad input


def test_export_bad_input_is_one_line_and_leaves_nothing(ckpts, tmp_path, capsys):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    bare = tmp_path / "bare.pth"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), bare)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    (tmp_path / "empty").mkdir()
    good = ckpts["resnet18"][0]
    cases = [
        (["--model_fn", tmp_path / "missing.pth"], "does not exist"),
        (["--model_fn", text, "--output", tmp_path / "t.onnx"], "PyTorch checkpoint"),
        (["--model_fn", bare, "--output", tmp_path / "b.onnx"], "not a checkpoint of this tool"),
        (["--model_fn", good, "--format", "tflite"], "invalid choice"),
        (["--model_fn", good, "--output", tmp_path / "m.bin"], "cannot tell the format"),
        (["--model_fn", good, "--output", tmp_path / "m.onnx", "--format", "pt2"], "has the extension of onnx"),
        (["--model_fn", good, "--output", blocker / "m.onnx"], "cannot write --output"),
        (["--model_fn", good, "--output", tmp_path / "m.onnx", "--data_dir", tmp_path / "nowhere"], "does not exist"),
        (["--model_fn", good, "--output", tmp_path / "m.onnx", "--data_dir", tmp_path / "empty"], "no readable images"),
        (["--model_fn", good, "--output", tmp_path / "m.pt2", "--opset", "17"], "not the pt2 format"),
        (
            ["--model_fn", good, "--output", good, "--format", "onnx"],
            "is the checkpoint --model_fn, which this run reads",
        ),
        (["--model_fn", good, "--check_images", "0"], "must be a positive number"),
    ]
    for argv, message in cases:
        assert message in run_in_process(export, argv, capsys), argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.pth", "empty", "file", "notes.pth"]
    assert sorted(p.name for p in good.parent.iterdir()) == sorted(f"{name}.pth" for name in FAMILIES)


def test_predict_refuses_bad_onnx_files(tiny_data, tmp_path, capsys):
    text = tmp_path / "text.onnx"
    text.write_text("not a model")
    graph = onnx.helper.make_graph(  # a valid ONNX model that export.py did not write
        [onnx.helper.make_node("Identity", ["input"], ["logits"])],
        "g",
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 3])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 3])],
    )
    onnx.save(
        onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), tmp_path / "foreign.onnx"
    )
    base = ["--data_dir", tiny_data / "test", "--output", tmp_path / "r.csv", "--num_workers", "0"]
    for model_fn, message in (
        (tmp_path / "missing.onnx", "does not exist"),
        (text, "is not an ONNX model onnxruntime can load"),
        (tmp_path / "foreign.onnx", "was not written by export.py: its metadata lacks"),
    ):
        assert message in run_in_process(predict, ["--model_fn", model_fn] + base, capsys), model_fn
    assert not (tmp_path / "r.csv").exists()


def test_int8_of_a_model_whose_classifier_is_a_convolution(ckpts, tmp_path, capsys):
    """SqueezeNet's classifier is a 1x1 convolution: the int8 build reads no features from it and is held against
    fp32 on its logits alone (a review found it crashing, its candidate file left behind)."""
    path = ckpts["squeezenet1_0"][0]
    out = tmp_path / "s.int8.onnx"
    argv = ["--model_fn", path, "--int8", "--output", out, "--calibration", "minmax", "--calibration_images", 12]
    with onednn("squeezenet1_0"):
        export.main(export.parse_args([str(a) for a in [*argv, "--max_drop", 100, "--min_agreement", 0]]))
    assert "top-1 agreement" in capsys.readouterr().out and out.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no candidate file left


def test_a_zero_pad_before_a_convolution_becomes_its_own_padding():
    """fold_pads_into_convs: an uneven zero Pad of height and width read by one Conv alone is folded into the Conv,
    with the same outputs; a Pad of another value, of the channels, or read twice is left as it is."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((2, 1, 3, 3)).astype(np.float32), "w")
    x = rng.standard_normal((1, 1, 9, 8)).astype(np.float32)

    def model(pads, fill=None, second_reader=False):
        inits = [weight, numpy_helper.from_array(np.array(pads, np.int64), "p")]
        if fill is not None:
            inits.append(numpy_helper.from_array(np.array(fill, np.float32), "v"))
        nodes = [
            helper.make_node("Pad", ["x", "p"] + (["v"] if fill is not None else []), ["xp"], mode="constant"),
            helper.make_node("Conv", ["xp", "w"], ["y"], strides=[2, 2]),
        ]
        outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
        if second_reader:
            nodes.append(helper.make_node("Relu", ["xp"], ["z"]))
            outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 9, 8])]
        graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)

    def run(proto):
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x})[0]

    folded = model([0, 0, 1, 0, 0, 0, 2, 1])
    before = run(folded)
    assert export.fold_pads_into_convs(folded) == 1 and [n.op_type for n in folded.graph.node] == ["Conv"]
    assert [list(a.ints) for a in folded.graph.node[0].attribute if a.name == "pads"] == [[1, 0, 2, 1]]
    assert np.allclose(run(folded), before, atol=1e-6)
    for kept in (
        model([0, 0, 1, 0, 0, 0, 2, 1], fill=1.0),
        model([0, 1, 1, 0, 0, 0, 2, 1]),
        model([0, 0, 1, 0, 0, 0, 2, 1], second_reader=True),
    ):
        assert export.fold_pads_into_convs(kept) == 0 and "Pad" in [n.op_type for n in kept.graph.node]
