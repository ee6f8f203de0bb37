"""End to end: the real commands as subprocesses, and every command the README shows."""

import csv
import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

from conftest import ROOT, SAMPLE, assert_clean_error, copy_subset, run_script
from helpers import load_script, readme_commands, scalar_tags

TB_TAGS = {"Train/Loss", "Train/Accuracy", "Validation/Loss", "Validation/Accuracy"}


def test_train_then_predict_end_to_end(tiny_data, tmp_path):
    run = tmp_path / "run"
    proc = run_script(
        "train.py",
        "--data_dir",
        tiny_data,
        "--model_name",
        "resnet18",
        "--input_size",
        "32",
        "--n_epochs",
        "2",
        "--num_workers",
        "1",
        "--model_fn",
        tmp_path / "out" / "model.pth",
        "--log_dir",
        run,
        "--verbose",
        "1",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stdout and "epoch 2/2" in proc.stdout
    ckpt = torch.load(tmp_path / "out" / "model.pth", weights_only=True)
    assert set(ckpt) == {
        "format_version",
        "model_name",
        "state_dict",
        "class_names",
        "input_size",
        "resize_size",
        "mean",
        "std",
        "epoch",
        "metrics",
        "temperature",
        "args",
        "torch_version",
        "torchvision_version",
        "ood",
    }
    assert ckpt["ood"]["method"] == "knn" and ckpt["ood"]["features"].shape[1] == 512
    assert ckpt["class_names"] == ["bag", "sneaker", "trouser"] and ckpt["input_size"] == 32
    assert ckpt["mean"] == pytest.approx([0.485, 0.456, 0.406])
    torchvision.models.get_model("resnet18", num_classes=3).load_state_dict(ckpt["state_dict"])
    last = torch.load(tmp_path / "out" / "model_last.pth", weights_only=True)
    assert last["epoch"] == 2 and {"optimizer", "scheduler", "train_state"} <= set(last)

    assert {"metrics.csv", "train_files.csv", "valid_files.csv"} <= {p.name for p in run.iterdir()}
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    acc = scalar_tags(run)
    assert TB_TAGS | {"Train/LR"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("Validation/Accuracy")] == [1, 2]
    assert "Validation/Predictions" in acc.Tags()["images"]
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    (events_file,) = run.glob("events.out.tfevents.*")
    steps = [e.step for e in EventFileLoader(str(events_file)).Load() if e.HasField("summary")]
    assert steps == sorted(steps) and steps[-1] == 2  # hparams too: no step goes backwards

    proc = run_script("predict.py", "--model_fn", tmp_path / "out" / "model.pth", "--num_workers", "0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "accuracy" in proc.stdout and "per-class report -> result_report.csv" in proc.stdout
    assert [r["class"] for r in csv.DictReader(open(tmp_path / "result_report.csv"))][-2:] == [
        "macro avg",
        "weighted avg",
    ]
    with open(tmp_path / "result.csv", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "file_dir",
        "predict",
        "confidence",
        "prob_bag",
        "prob_sneaker",
        "prob_trouser",
        "ood_score",
        "in_distribution",
        "label",
        "error",
    ]
    threshold = ckpt["ood"]["threshold"]
    assert all(r["in_distribution"] == str(int(float(r["ood_score"]) <= threshold)) for r in rows)
    expected = sorted(str(p) for p in (tiny_data / "test").rglob("*.png"))
    assert [r["file_dir"] for r in rows] == expected
    for r in rows:
        probs = [float(r[f"prob_{c}"]) for c in ckpt["class_names"]]
        assert sum(probs) == pytest.approx(1, abs=1e-4) and r["predict"] == ckpt["class_names"][probs.index(max(probs))]
        assert r["label"] == Path(r["file_dir"]).parent.name and r["error"] == ""
    for png in ("predictions.png", "predictions_confusion.png"):
        with Image.open(tmp_path / png) as img:
            assert img.format == "PNG" and img.size[0] > 100
    readable = 0o666 & ~current_umask()  # what a plain open() gives: colleagues can read the results
    for written in ("out/model.pth", "out/model_last.pth", "result.csv", "predictions.png", "run/metrics.csv"):
        assert (tmp_path / written).stat().st_mode & 0o777 == readable, written


def current_umask():
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_predict_single_file_unlabelled_folder_and_topk(tiny_data, tmp_path):
    import train

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
                    "--freeze",
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
    loose = tmp_path / "loose dir é"
    loose.mkdir()
    for i, f in enumerate(sorted((tiny_data / "test" / "bag").glob("*.png"))[:3]):
        shutil.copy(f, loose / f"image {i} ü.png")
    (loose / "readme.txt").write_text("ignored")
    proc = run_script(
        "predict.py",
        "--model_fn",
        tmp_path / "m.pth",
        "--data_dir",
        loose,
        "--topk",
        "2",
        "--output",
        tmp_path / "o.csv",
        "--plot",
        tmp_path / "o.png",
        "--num_workers",
        "0",
        "--show",
    )  # headless here: the figure is saved, and show() has no window to open
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "o.csv", encoding="utf-8-sig")))
    assert len(rows) == 3 and "label" not in rows[0] and rows[0]["top1_class"] == rows[0]["predict"]
    assert float(rows[0]["top1_prob"]) >= float(rows[0]["top2_prob"])
    assert not (tmp_path / "o_confusion.png").exists() and (tmp_path / "o.png").stat().st_size > 1000
    assert (
        f"--show: no window can open here (no display), so the figure was only saved: {tmp_path / 'o.png'}"
        in proc.stdout
    )
    single = loose / "image 0 ü.png"
    proc = run_script(
        "predict.py",
        "--model_fn",
        tmp_path / "m.pth",
        "--data_dir",
        single,
        "--n_images",
        "0",
        "--output",
        tmp_path / "one.csv",
        "--num_workers",
        "0",
    )
    assert proc.returncode == 0, proc.stderr
    assert [r["file_dir"] for r in csv.DictReader(open(tmp_path / "one.csv", encoding="utf-8-sig"))] == [str(single)]


# ----------------------------------------------------------------------------- the README's commands


def make_catdog_zip(path):
    with zipfile.ZipFile(path, "w") as z:
        for animal, source in (("cat", "bag"), ("dog", "trouser")):
            for i, f in enumerate(sorted((SAMPLE / "train" / source).glob("*.png"))[:14]):
                jpg = path.parent / f"{animal}.{i}.jpg"
                Image.open(f).convert("RGB").save(jpg)
                z.write(jpg, f"train/{animal}.{i}.jpg")
                jpg.unlink()


def replace_flag(tokens, flag, value):
    out, skip = [], False
    for t in tokens:
        if skip:
            skip = False
            continue
        if t == flag:
            skip = True
            if value is not None:
                out += [flag, value]
            continue
        out.append(t)
    return out


def adapt(command, work, weights):
    """The README command, made to run here quickly: CPU, tiny inputs, local paths."""
    tokens = shlex.split(command)
    script = tokens[1] if tokens[0] == "python" else None
    if script == "train.py":
        if "--dataset_name" in tokens:
            name = tokens[tokens.index("--dataset_name") + 1]
            tokens = replace_flag(tokens, "--dataset_name", None) + ["--data_dir", str(work / name)]
        if "--weights" in tokens:
            tokens = replace_flag(tokens, "--weights", str(weights))
        tokens += ["--n_epochs", "1", "--input_size", "32", "--num_workers", "0", "--verbose", "0"]
    if script == "predict.py":
        tokens += ["--num_workers", "0"]
    if script == "bench/bench.py":  # the same measurements, small: tiny images, few epochs
        tokens += [
            "--data_dir",
            str(work / "my_images"),
            "--input_size",
            "32",
            "--weights",
            str(weights),
            "--epochs",
            "2",
            "--uncached_epochs",
            "1",
            "--finetune_images",
            "16",
            "--skip_rss",
            "--gpu_id",
            "0" if torch.cuda.is_available() else "-1",
        ]  # the device flag reaches every run
    if script == "bench/advice.py":  # two of its rows, one epoch each, on the tiny set, with a resnet18 file
        tokens += [
            "--data_dir",
            str(work / "my_images"),
            "--weights",
            str(work / "resnet18.pth"),
            "--epochs",
            "1",
            "--only",
            "from scratch, 5",
            "pretrained, --freeze",
            "--work",
            str(work / "advice"),
        ]
    if script == "bench/scale_bench.py":  # one part, small: two short lists of tiny images
        tokens += [
            "--parts",
            "rss",
            "--rss_counts",
            "20,40",
            "--rss_files",
            "10",
            "--work_dir",
            str(work / "scale_bench"),
        ]
    if script == "bench/label_bench.py":  # the same steps, small: 32 px, a few images, a one-epoch donor
        tokens += [
            "--work",
            str(work / "label_bench"),
            "--size",
            "32",
            "--per_class",
            "10",
            "--donor_per_class",
            "10",
            "--donor_epochs",
            "1",
            "--extra_views",
            "1",
            "--top",
            "2",
            "--seeds",
            "0,1",
        ]
    if script == "bench/serve_bench.py":  # the same parts, small: the quick start's model as the README test made it
        tokens = replace_flag(replace_flag(tokens, "--soak", "40"), "--requests", "16")
        tokens += ["--model_fn", str(work / "model.pth"), "--work", str(work / "serve_bench"), "--clients", "2"]
    if script == "data/prepare.py" and "--zip" in tokens:
        tokens = replace_flag(tokens, "--zip", str(work / "train.zip")) + ["--out", str(work / "catdog")]
    if "--gpu_id" in tokens and not torch.cuda.is_available():
        tokens = replace_flag(tokens, "--gpu_id", "-1")
    return tokens


def run_python_command(argv, capsys):
    """`python SCRIPT ARGS` in this process (the same parse_args and main; test_train_then_predict_end_to_end
    covers real processes): returns (exit status, stdout, stderr)."""
    from cli import run_cli

    module = load_script(argv[1])
    try:
        run_cli(lambda: module.main(module.parse_args(argv[2:])))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def test_every_readme_command_works(tmp_path, tiny_data, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    copy_subset(work / "my_images", ["bag", "sneaker", "trouser"], 12, 4)
    make_catdog_zip(work / "train.zip")
    with open(work / "my_labels.csv", "w") as f:  # the README's CSV: my_images' files, train and test rows
        f.write(
            "file,label,split\n"
            + "".join(
                f"{p.relative_to(work / 'my_images')},{p.parent.name},{p.parts[-3]}\n"
                for p in sorted((work / "my_images").rglob("*.png"))
            )
        )
    (work / "photos.txt").write_text(
        "".join(f"{p.relative_to(work)}\n" for p in sorted(work.glob("my_images/test/*/*")))
    )
    torch_home = tmp_path / "torch_home"
    weights = torch_home / "hub" / "checkpoints" / "resnet34-b627a593.pth"
    weights.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet34().state_dict(), weights)  # a real resnet34 file, torchvision's name
    torch.save(torchvision.models.resnet18().state_dict(), work / "resnet18.pth")
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(work)
    bin_dir = Path(sys.executable).parent
    ran, by_torchrun, servers = [], set(), []
    shipped = work / "data" / "fashion_sample" / "test" / "bag" / "t10k_00018.png"  # the README's curl and Python
    shipped.parent.mkdir(parents=True)
    shutil.copy(SAMPLE / "test" / "bag" / "t10k_00018.png", shipped)
    try:
        run_readme_commands(work, weights, bin_dir, capsys, ran, by_torchrun, servers)
    finally:
        for server in servers:
            server.stop()
    assert any(c.startswith("python train.py") for c in ran) and any(c.startswith("python predict.py") for c in ran)
    assert any(c.startswith("python serve.py") for c in ran) and any(c.startswith("curl") for c in ran)
    check_what_the_readme_commands_wrote(work)


def run_readme_commands(work, weights, bin_dir, capsys, ran, by_torchrun, servers):
    """Each command of the README and its pages, in order, as adapt() makes it run here; serve.py as a server of
    its own (on a free port, which the curl line and the Python snippet then call)."""
    from test_serve import Server

    port = None
    for command in readme_commands():
        tokens = shlex.split(command)
        if "--model_fn" in tokens and tokens[tokens.index("--model_fn") + 1] in by_torchrun:
            continue  # predicts from a torchrun checkpoint: tests/test_distributed.py runs the pair
        if command.startswith("python3 -m venv") or command in (
            "pytest",
            "python -m pytest -q",
            "pip install -r requirements.txt",
        ):
            ci = (ROOT / ".ci" / "run").read_text()
            assert "-m venv" in ci and "pip install" in ci and "-r requirements.txt" in ci and "pytest" in ci
            continue  # .ci/run itself runs these steps, in a fresh virtual environment
        if command.startswith("pip install torch torchvision --index-url"):
            continue  # PyTorch's CPU wheel index: a download, which this offline machine cannot make
        if command.startswith("torchrun"):
            if "train.py" in tokens:
                by_torchrun.add(tokens[tokens.index("--model_fn") + 1])
            continue  # tests/test_distributed.py runs train.py's torchrun commands, test_prediction_output predict.py's
        if command.startswith("python serve.py"):
            model = work / tokens[tokens.index("--model_fn") + 1]
            servers.append(Server(model, "--max_wait_ms", "2"))
            port = servers[-1].port
            ran.append(command)
            continue
        if command.startswith("curl"):
            proc = subprocess.run(
                shlex.split(command.replace("8765", str(port))), cwd=work, capture_output=True, text=True, timeout=60
            )
            answer = json.loads(proc.stdout)["results"][0]
            assert answer["file"] == "t10k_00018.png" and answer["predict"] in (
                "ankle_boot",
                "bag",
                "sneaker",
                "trouser",
            )
            snippet = readme_python_block("serve client").replace("8765", str(port))
            printed = subprocess.run(
                [sys.executable, "-c", snippet], cwd=work, capture_output=True, text=True, timeout=60
            )
            assert printed.returncode == 0 and printed.stdout.split()[0] == answer["predict"], printed.stderr
            ran.append(command)
            continue
        if command.startswith("tensorboard"):
            argv = [str(bin_dir / "tensorboard"), "--inspect"] + tokens[1:]
            proc = subprocess.run(argv, cwd=work, capture_output=True, text=True, timeout=600)
            code, out, err = proc.returncode, proc.stdout, proc.stderr
            assert "Train/Loss" in out and "Validation/Accuracy" in out
        else:
            code, out, err = run_python_command(adapt(command, work, weights), capsys)
        assert code == 0, f"{command}\n{out}\n{err}"
        assert "Traceback" not in err
        if "bench/bench.py" in command:
            assert "ceiling =" in out and "speed-up from the cache" in out and "predict.py" in out
        if "bench/advice.py" in command:
            rows = [line.split() for line in out.splitlines()[1:]]
            assert [r[:3] for r in rows] == [["from", "scratch,", "5"], ["pretrained,", "--freeze,", "20"]], out
            assert all(0 <= float(r[-4]) <= 1 and r[-2] == "1" for r in rows), out  # test accuracy; 1 epoch run
        if "bench/scale_bench.py" in command:
            assert "peak RSS 40 against 20 images" in out, out
        if "bench/serve_bench.py" in command:
            assert "concurrent clients" in out and ", 5xx 0; server RSS" in out, out
        if "bench/label_bench.py" in command:
            assert "mean over the seeds" in out and "train.py --check_data (label_issues.csv" in out
        ran.append(command)


def readme_python_block(marker):
    """The ```python block after '<!-- MARKER: ... -->' in the README."""
    text = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- " + re.escape(marker) + r":[^>]*-->\n```python\n(.*?)```", text, re.S)
    assert found, f"README: the {marker} block is missing"
    return found.group(1)


def csv_rows(path):
    with open(path, encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def check_what_the_readme_commands_wrote(work):
    import model_loader

    def ckpt(name):
        return model_loader.load_checkpoint(work / name)

    sample_classes = sorted(p.name for p in (SAMPLE / "train").iterdir())
    assert ckpt("model.pth")["class_names"] == sample_classes  # the quick start: the shipped sample
    assert ckpt("models/mine.pth")["class_names"] == ["bag", "sneaker", "trouser"]
    assert ckpt("models/mine.pth")["args"]["freeze"] is True
    for name in ("catdog.pth", "resnet.pth", "catdog_ft.pth"):
        assert ckpt(name)["class_names"] == ["cat", "dog"], name
    assert ckpt("resnet.pth")["model_name"] == "resnet34" and ckpt("resnet.pth")["args"]["use_pretrained"]
    assert ckpt("catdog_ft.pth")["args"]["unfreeze_after"] == 2
    fine_tuned = ckpt("models/mine_ft.pth")  # the README's mode 2 on my_images
    assert fine_tuned["args"]["augment"] == "light" and fine_tuned["class_names"] == ["bag", "sneaker", "trouser"]
    import probe  # the linear probe ran first and its penalty came from the grid

    assert ckpt("models/mine_ft_last.pth")["train_state"]["probe"]["l2"] in probe.L2_GRID
    lite = ckpt("model.pth")  # the quick start: ImageNet weights with no download, the pip package's file
    assert lite["model_name"] == "efficientnet_lite0" and lite["args"]["use_pretrained"]
    assert lite["class_names"] == sample_classes and lite["args"]["freeze"]
    scratch = ckpt("scratch.pth")  # the quick start's footnote: random initial weights
    assert scratch["model_name"] == "resnet18"
    assert not scratch["args"]["use_pretrained"] and not scratch["args"]["weights"]
    rows = csv_rows(work / "onnx.csv")  # one epoch at 32 px here: well above chance (0.25), 0.59 when written
    assert len(rows) == 120 and sum(r["predict"] == r["label"] for r in rows) / len(rows) >= 0.4
    # the zip's 14 cats and 14 dogs, split once: every file in exactly one of train/ and test/
    for animal in ("cat", "dog"):
        train_files = {p.name for p in (work / "catdog" / "train" / animal).iterdir()}
        test_files = {p.name for p in (work / "catdog" / "test" / animal).iterdir()}
        assert len(train_files) + len(test_files) == 14 and not train_files & test_files and test_files
    rows = csv_rows(work / "ood.csv")  # --reject_ood: the rows unlike the training images are 'unknown'
    assert len(rows) == 120 and all(r["in_distribution"] in ("0", "1") and float(r["ood_score"]) >= -1e-6 for r in rows)
    assert all((r["predict"] == "unknown") == (r["in_distribution"] == "0") for r in rows)
    rows = csv_rows(work / "explain.csv")  # --explain: a map per image at its size, keyed by file_dir
    import numpy as np

    maps = np.load(work / "heatmaps" / "heatmaps.npz")
    assert len(rows) == 120 and sorted(maps.files) == sorted(r["file_dir"] for r in rows)
    assert all(maps[r["file_dir"]].shape == (28, 28) and Path(r["heatmap"]).is_file() for r in rows)
    found = csv_rows(work / "runs" / "lr" / "lr_find.csv")  # --find_lr: the curve, and no training
    assert float(found[0]["lr"]) == pytest.approx(1e-7) and (work / "runs" / "lr" / "lr_find.png").is_file()
    assert not (work / "runs" / "lr" / "metrics.csv").exists()
    tops = [csv_rows(p) for p in (work / "runs").glob("*/top_losses.csv")]  # every training run writes one
    assert len(tops) >= 3 and 80 in [len(t) for t in tops]  # the sample's model.pth: its 80 validation images
    assert all([float(r["loss"]) for r in t] == sorted((float(r["loss"]) for r in t), reverse=True) for t in tops)
    assert ckpt("models/from_csv.pth")["class_names"] == ["bag", "sneaker", "trouser"]  # --labels_csv
    assert ckpt("models/from_csv.pth")["args"]["labels_csv"] == str(work / "my_labels.csv")  # absolute
    rows = csv_rows(work / "from_csv.csv")  # predict.py's default input: the CSV's test rows, labelled
    assert len(rows) == 12 and all(r["label"] == Path(r["file_dir"]).parent.name for r in rows)
    pairs = ckpt("models/pairs.pth")  # --multi_label on data/prepare.py pairs
    assert pairs["multi_label"] and len(pairs["thresholds"]) == 4 and pairs["class_names"] == sample_classes
    rows = csv_rows(work / "pairs.csv")  # its 200 test images, labelled with both objects' classes
    assert len(rows) == 200 and sum(len(r["label"].split()) == 2 for r in rows) > 100
    for r in rows:
        probs = [float(r[f"prob_{c}"]) for c in sample_classes]  # written to 6 decimals: not at a threshold
        if min(abs(p - t) for p, t in zip(probs, pairs["thresholds"])) > 1e-5:
            chosen = [c for c, p, t in zip(sample_classes, probs, pairs["thresholds"]) if p >= t]
            assert r["predict"] == (" ".join(chosen) or "unknown")
    rows = csv_rows(work / "labelled.csv")  # --file_list: the list's images in its order, unlabelled
    assert [str(Path(r["file_dir"])) for r in rows] == (work / "photos.txt").read_text().split()  # ./ from the list
    assert "label" not in rows[0] and all(r["predict"] in sample_classes for r in rows)
    rows = csv_rows(work / "mine.csv")
    test_files = sorted(str(p.relative_to(work)) for p in (work / "my_images" / "test").rglob("*.png"))
    assert [r["file_dir"] for r in rows] == test_files  # as given: --data_dir my_images/test
    assert all(
        r["predict"] in ("bag", "sneaker", "trouser") and r["label"] == Path(r["file_dir"]).parent.name for r in rows
    )
    rows = csv_rows(work / "onnx.csv")  # predict.py on model.onnx: the test/ of model.pth's data
    assert [r["file_dir"] for r in rows] == sorted(str(p) for p in (SAMPLE / "test").rglob("*.png"))
    assert all(r["predict"] in sample_classes for r in rows)
    import json

    import onnx

    metadata = {p.key: p.value for p in onnx.load(work / "model.onnx").metadata_props}
    assert json.loads(metadata["class_names"]) == sample_classes and metadata["input_size"] == "32"
    assert zipfile.is_zipfile(work / "model.pt2")
    rows = csv_rows(work / "trust.csv")  # --threshold 0.9: below it 'unknown', the probabilities kept
    assert rows and all((r["predict"] == "unknown") == (float(r["confidence"]) < 0.9) for r in rows)
    report = csv_rows(work / "trust_report.csv")
    assert [r["class"] for r in report][-2:] == ["macro avg", "weighted avg"]
    for png in ("predictions.png", "mine.png", "predictions_confusion.png"):
        with Image.open(work / png) as img:
            assert img.format == "PNG" and img.size[0] > 100, png


def test_prepare_fashion_rebuilds_the_shipped_sample(tmp_path):
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist is not installed")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "data" / "prepare.py"), "fashion", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.png"))
    shipped = sorted(p.relative_to(SAMPLE) for p in SAMPLE.rglob("*.png"))
    assert made == shipped and len(made) == 520
    for rel in made[::97]:
        assert list(Image.open(tmp_path / rel).getdata()) == list(Image.open(SAMPLE / rel).getdata())


def write_idx(path, array):
    """An IDX file as Fashion-MNIST ships it: magic 0,0,0x08 (uint8),ndim; big-endian sizes; the bytes."""
    import gzip
    import struct

    import numpy as np

    array = np.asarray(array, dtype=np.uint8)
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


def test_prepare_fashion_reads_idx_files(tmp_path):
    """Fashion-MNIST's format, written here (the Debian package is absent on a fresh machine): the images of
    the chosen classes, the first N of each in file order, with their exact pixels."""
    import numpy as np

    rng = np.random.default_rng(0)
    source = tmp_path / "idx"
    source.mkdir()
    labels = {"train": [1, 7, 1, 8, 7, 1, 0], "t10k": [8, 1, 7]}  # 1 trouser, 7 sneaker, 8 bag, 0 t-shirt
    pixels = {}
    for prefix, ys in labels.items():
        pixels[prefix] = rng.integers(0, 256, (len(ys), 28, 28), dtype=np.uint8)
        write_idx(source / f"{prefix}-images-idx3-ubyte.gz", pixels[prefix])
        write_idx(source / f"{prefix}-labels-idx1-ubyte.gz", ys)
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "data" / "prepare.py"),
            "fashion",
            "--source",
            str(source),
            "--out",
            str(out),
            "--classes",
            "trouser,sneaker",
            "--train_per_class",
            "2",
            "--test_per_class",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    made = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert made == [
        "test/sneaker/t10k_00002.png",
        "test/trouser/t10k_00001.png",
        "train/sneaker/train_00001.png",
        "train/sneaker/train_00004.png",
        "train/trouser/train_00000.png",
        "train/trouser/train_00002.png",
    ]
    for rel in made:
        prefix, index = Path(rel).stem.split("_")
        assert np.array_equal(np.asarray(Image.open(out / rel)), pixels[prefix][int(index)]), rel


def test_prepare_catdog_again_never_mixes_two_splits(tmp_path):
    zip_path = tmp_path / "train.zip"
    make_catdog_zip(zip_path)
    out = tmp_path / "catdog"

    def prepare(*extra):
        return subprocess.run(
            [
                sys.executable,
                str(ROOT / "data" / "prepare.py"),
                "catdog",
                "--zip",
                str(zip_path),
                "--out",
                str(out),
                *extra,
            ],
            capture_output=True,
            text=True,
        )

    assert prepare().returncode == 0
    before = sorted(out.rglob("*.jpg"))
    refused = prepare("--test_ratio", "0.5")
    assert_clean_error(refused, "already holds files", "--overwrite")
    assert sorted(out.rglob("*.jpg")) == before  # nothing touched
    proc = prepare("--test_ratio", "0.5", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    for animal in ("cat", "dog"):
        train = {p.name for p in (out / "train" / animal).iterdir()}
        test = {p.name for p in (out / "test" / animal).iterdir()}
        assert len(train) == len(test) == 7 and not train & test
        assert f"{animal}: 7 train, 7 test" in proc.stdout  # what it prints is what is on disk


def test_prepare_hymenoptera_offline_fails_clearly(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "data" / "prepare.py"), "hymenoptera", "--out", str(tmp_path / "h")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode == 0:
        pytest.skip("this machine is online")
    assert_clean_error(proc, "could not download", "needs internet")
