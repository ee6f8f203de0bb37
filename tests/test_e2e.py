"""End to end: the real commands as subprocesses, and every command the README shows."""
import csv
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

TB_TAGS = {"Train/Loss", "Train/Accuracy", "Validation/Loss", "Validation/Accuracy"}


def scalar_tags(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return acc


def test_train_then_predict_end_to_end(tiny_data, tmp_path):
    run = tmp_path / "run"
    proc = run_script("train.py", "--data_dir", tiny_data, "--model_name", "resnet18", "--input_size", "32",
                      "--n_epochs", "2", "--num_workers", "1", "--model_fn", tmp_path / "out" / "model.pth",
                      "--log_dir", run, "--verbose", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stdout and "epoch 2/2" in proc.stdout
    ckpt = torch.load(tmp_path / "out" / "model.pth", weights_only=True)
    assert set(ckpt) == {"format_version", "model_name", "state_dict", "class_names", "input_size", "resize_size",
                         "mean", "std", "epoch", "metrics", "args", "torch_version", "torchvision_version"}
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

    proc = run_script("predict.py", "--model_fn", tmp_path / "out" / "model.pth", "--num_workers", "0",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "accuracy" in proc.stdout and "recall per class" in proc.stdout
    with open(tmp_path / "result.csv", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["file_dir", "predict", "confidence", "prob_bag", "prob_sneaker", "prob_trouser",
                             "label", "error"]
    expected = sorted(str(p) for p in (tiny_data / "test").rglob("*.png"))
    assert [r["file_dir"] for r in rows] == expected
    for r in rows:
        probs = [float(r[f"prob_{c}"]) for c in ckpt["class_names"]]
        assert sum(probs) == pytest.approx(1, abs=1e-4) and r["predict"] == ckpt["class_names"][probs.index(max(probs))]
        assert r["label"] == Path(r["file_dir"]).parent.name and r["error"] == ""
    for png in ("predictions.png", "predictions_confusion.png"):
        with Image.open(tmp_path / png) as img:
            assert img.format == "PNG" and img.size[0] > 100


def test_predict_single_file_unlabelled_folder_and_topk(tiny_data, tmp_path):
    import train

    train.main(train.parse_args([str(a) for a in (
        "--data_dir", tiny_data, "--model_name", "resnet18", "--input_size", "32", "--n_epochs", "1",
        "--num_workers", "0", "--freeze", "--model_fn", tmp_path / "m.pth", "--log_dir", tmp_path / "run",
        "--verbose", "0")]))
    loose = tmp_path / "loose dir é"
    loose.mkdir()
    for i, f in enumerate(sorted((tiny_data / "test" / "bag").glob("*.png"))[:3]):
        shutil.copy(f, loose / f"image {i} ü.png")
    (loose / "readme.txt").write_text("ignored")
    proc = run_script("predict.py", "--model_fn", tmp_path / "m.pth", "--data_dir", loose, "--topk", "2",
                      "--output", tmp_path / "o.csv", "--plot", tmp_path / "o.png", "--num_workers", "0",
                      "--show")  # headless here: the figure is saved, and show() has no window to open
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "o.csv", encoding="utf-8-sig")))
    assert len(rows) == 3 and "label" not in rows[0] and rows[0]["top1_class"] == rows[0]["predict"]
    assert float(rows[0]["top1_prob"]) >= float(rows[0]["top2_prob"])
    assert not (tmp_path / "o_confusion.png").exists() and (tmp_path / "o.png").stat().st_size > 1000
    single = loose / "image 0 ü.png"
    proc = run_script("predict.py", "--model_fn", tmp_path / "m.pth", "--data_dir", single, "--n_images", "0",
                      "--output", tmp_path / "one.csv", "--num_workers", "0")
    assert proc.returncode == 0, proc.stderr
    assert [r["file_dir"] for r in csv.DictReader(open(tmp_path / "one.csv", encoding="utf-8-sig"))] == [str(single)]


# ----------------------------------------------------------------------------- the README's commands


def readme_commands():
    """Every command line of the README's ```bash blocks, in order."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.strip().startswith("#"):
                commands.append(line.strip())
    return commands


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
    for i, t in enumerate(tokens):
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
        tokens += ["--data_dir", str(work / "my_images"), "--input_size", "32", "--weights", str(weights),
                   "--epochs", "2", "--uncached_epochs", "1", "--finetune_images", "16", "--skip_rss",
                   "--gpu_id", "0" if torch.cuda.is_available() else "-1"]  # the device flag reaches every run
    if script == "data/prepare.py" and "--zip" in tokens:
        tokens = replace_flag(tokens, "--zip", str(work / "train.zip")) + ["--out", str(work / "catdog")]
    if "--gpu_id" in tokens and not torch.cuda.is_available():
        tokens = replace_flag(tokens, "--gpu_id", "-1")
    return tokens


def load_script(relative):
    """A script of this repository as a module (data/prepare.py, bench/bench.py are not packages)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(relative).stem + "_script", ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    torch_home = tmp_path / "torch_home"
    weights = torch_home / "hub" / "checkpoints" / "resnet34-b627a593.pth"
    weights.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet34().state_dict(), weights)  # a real resnet34 file, torchvision's name
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(work)
    bin_dir = Path(sys.executable).parent
    ran, by_torchrun = [], set()
    for command in readme_commands():
        tokens = shlex.split(command)
        if "--model_fn" in tokens and tokens[tokens.index("--model_fn") + 1] in by_torchrun:
            continue  # predicts from a torchrun checkpoint: tests/test_distributed.py runs the pair
        if command.startswith("python3 -m venv") or command == "pytest":
            ci = (ROOT / ".ci" / "run").read_text()
            assert "-m venv" in ci and "pip install" in ci and "-r requirements.txt" in ci and "pytest" in ci
            continue  # .ci/run itself runs these steps, in a fresh virtual environment
        if command.startswith("torchrun"):
            by_torchrun.add(tokens[tokens.index("--model_fn") + 1])
            continue  # tests/test_distributed.py runs the torchrun commands
        if command.startswith("tensorboard"):
            argv = [str(bin_dir / "tensorboard"), "--inspect"] + tokens[1:]
            proc = subprocess.run(argv, cwd=work, capture_output=True, text=True, timeout=600)
            code, out, err = proc.returncode, proc.stdout, proc.stderr
            assert "Train/Loss" in out and "Validation/Accuracy" in out
        else:
            code, out, err = run_python_command(adapt(command, work, weights), capsys)
        assert code == 0, f"{command}\n{out}\n{err}"
        assert "Traceback" not in err
        if "bench.py" in command:
            assert "ceiling =" in out and "speed-up from the cache" in out and "predict.py" in out
        ran.append(command)
    assert any(c.startswith("python train.py") for c in ran) and any(c.startswith("python predict.py") for c in ran)
    for produced in ("model.pth", "models/mine.pth", "mine.csv", "mine.png", "catdog.pth", "resnet.pth",
                     "catdog_ft.pth", "result.csv", "predictions.png", "catdog/test/cat", "catdog/train/dog",
                     "model.onnx", "model.pt2"):
        assert (work / produced).exists(), produced


def test_prepare_fashion_rebuilds_the_shipped_sample(tmp_path):
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist is not installed")
    proc = subprocess.run([sys.executable, str(ROOT / "data" / "prepare.py"), "fashion", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.png"))
    shipped = sorted(p.relative_to(SAMPLE) for p in SAMPLE.rglob("*.png"))
    assert made == shipped and len(made) == 520
    for rel in made[::97]:
        assert list(Image.open(tmp_path / rel).getdata()) == list(Image.open(SAMPLE / rel).getdata())


def test_prepare_hymenoptera_offline_fails_clearly(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "data" / "prepare.py"), "hymenoptera", "--out",
                           str(tmp_path / "h")], capture_output=True, text=True, timeout=120)
    if proc.returncode == 0:
        pytest.skip("this machine is online")
    assert_clean_error(proc, "could not download", "needs internet")
