"""Shared fixtures: a tiny real ImageFolder cut from the shipped Fashion-MNIST sample, and a runner for
the real command-line scripts as subprocesses (no network, a private TORCH_HOME)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest.ini's two workers share the cores: one thread each (and their
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocesses), not two apiece fighting over them

    import torch

    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "fashion_sample"
sys.path.insert(0, str(ROOT))


def copy_subset(dst, classes, n_train, n_test):
    for split, n in (("train", n_train), ("test", n_test)):
        for c in classes:
            (dst / split / c).mkdir(parents=True, exist_ok=True)
            for f in sorted((SAMPLE / split / c).glob("*.png"))[:n]:
                shutil.copy(f, dst / split / c / f.name)
    return dst


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """3 classes x 16 train / 6 test real 28 px images."""
    return copy_subset(tmp_path_factory.mktemp("tiny"), ["bag", "sneaker", "trouser"], 16, 6)


@pytest.fixture(scope="session")
def tuning_data(tmp_path_factory):
    """tiny_data's classes with a valid/ folder of 3 images per class, one of them also in another class's folder:
    validation
    accuracy stays below 1, so a default fine-tune fine-tunes (it skips fine-tuning when its head already gets
    every validation image right, which these easy classes allow)."""
    root = copy_subset(tmp_path_factory.mktemp("tuning"), ["bag", "sneaker", "trouser"], 16, 6)
    for c in ("bag", "sneaker", "trouser"):
        (root / "valid" / c).mkdir(parents=True)
        for f in sorted((SAMPLE / "train" / c).glob("*.png"))[16:19]:
            shutil.copy(f, root / "valid" / c / f.name)
    twice = sorted((root / "valid" / "bag").glob("*.png"))[0]  # the same picture labelled bag and sneaker:
    shutil.copy(twice, root / "valid" / "sneaker" / f"copy_{twice.name}")  # one of the two is always wrong
    return root


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory):
    """A resnet18 state_dict standing in for pretrained weights (--weights makes a run pretrained)."""
    import torch
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


@pytest.fixture(scope="session")
def torch_home(tmp_path_factory):
    return tmp_path_factory.mktemp("torch_home")


def run_script(script, *args, cwd=None, env=None, timeout=600):
    """Run train.py / predict.py as a user would; returns the CompletedProcess (never raises on failure)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_in_process(module, argv, capsys):
    """`python SCRIPT ARGV` in this process, expected to fail on its input: one 'error: ...' line, status 2."""
    from cli import run_cli

    with pytest.raises(SystemExit) as e:
        run_cli(lambda: module.main(module.parse_args([str(a) for a in argv])))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def assert_clean_error(proc, *fragments):
    """A non-zero exit with one 'error: ...' line and no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
