"""train.py under torchrun on the CPU (gloo): two processes against one, and the README's commands."""

import csv
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, copy_subset, run_script
from helpers import readme_commands

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
FAST = ["--model_name", "resnet18", "--input_size", "32", "--patience", "0", "--verbose", "1", "--num_workers", "0"]


def env():
    return dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg", OMP_NUM_THREADS="1")


def torchrun(*args, cwd, nproc=2, timeout=600):
    argv = [TORCHRUN, "--standalone", "--nproc_per_node", str(nproc), str(ROOT / "train.py"), *map(str, args)]
    return subprocess.run(argv, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def one_then_two_processes(args, tmp_path):
    """train.py alone into tmp_path/one with a batch of 16, then under torchrun with 2 processes of 8 into
    tmp_path/two: the same global batch, so each step sees the same images (the sampler shards each
    16-image window of one shared order), and only per-process BatchNorm statistics differ."""
    single = run_script(
        "train.py",
        *args,
        "--batch_size",
        "16",
        "--model_fn",
        tmp_path / "one" / "m.pth",
        "--log_dir",
        tmp_path / "one" / "run",
        env={"OMP_NUM_THREADS": "1"},
    )
    assert single.returncode == 0, single.stderr
    proc = torchrun(
        *args,
        "--batch_size",
        "8",
        "--model_fn",
        tmp_path / "two" / "m.pth",
        "--log_dir",
        tmp_path / "two" / "run",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def history(path):
    return torch.load(path, weights_only=True)["train_state"]["history"]


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory):
    return copy_subset(tmp_path_factory.mktemp("ddp"), ["bag", "sneaker", "trouser"], 24, 6)


def test_two_processes_match_one(ddp_data, tmp_path):
    args = ["--data_dir", ddp_data, *FAST, "--n_epochs", "3", "--lr", "2e-3"]
    proc = one_then_two_processes(args, tmp_path)
    assert proc.stdout.count("best epoch") == 1 and proc.stdout.count("epoch 1/3") == 1  # rank 0 alone prints
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["m.pth", "m_last.pth", "run"]
    assert len(list((tmp_path / "two" / "run").glob("events.out.tfevents.*"))) == 1
    one, two = history(tmp_path / "one" / "m_last.pth"), history(tmp_path / "two" / "m_last.pth")
    assert [r["valid_count"] for r in two] == [r["valid_count"] for r in one] == [15] * 3
    calibrated = torch.load(tmp_path / "two" / "m.pth", weights_only=True)
    assert calibrated["metrics"]["calibration_count"] == 15 and calibrated["temperature"] != 1.0  # all ranks' logits
    reference = calibrated["ood"]  # fine-tuned: one eval pass, each process its share, gathered
    assert reference["features"].shape == (57, 512) and reference["valid_count"] == 15
    assert reference["features"].float().norm(dim=1).min() > 0.99  # every row filled, none left at zero
    print(
        "valid accuracy per epoch, 1 process:",
        [r["valid_accuracy"] for r in one],
        "2 processes:",
        [r["valid_accuracy"] for r in two],
    )
    assert abs(two[-1]["valid_accuracy"] - one[-1]["valid_accuracy"]) <= 0.2
    assert two[-1]["valid_accuracy"] >= 0.5  # chance is 0.33
    ckpt = torch.load(tmp_path / "two" / "m.pth", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
    pred = run_script(
        "predict.py",
        "--model_fn",
        tmp_path / "two" / "m.pth",
        "--data_dir",
        ddp_data / "test",
        "--output",
        tmp_path / "r.csv",
        "--plot",
        tmp_path / "p.png",
        cwd=tmp_path,
    )
    assert pred.returncode == 0, pred.stderr
    assert "accuracy" in pred.stdout
    exported = run_script("export.py", "--model_fn", tmp_path / "two" / "m.pth", cwd=tmp_path)  # -> two/m.onnx
    assert exported.returncode == 0, exported.stderr
    assert f"16 images of {ddp_data / 'test'}" in exported.stdout and "top-1 agreement 16/16" in exported.stdout
    # no --data_dir: the training data's test folder, named in the ONNX file's metadata
    pred = run_script(
        "predict.py",
        "--model_fn",
        tmp_path / "two" / "m.onnx",
        "--output",
        tmp_path / "o.csv",
        "--n_images",
        "0",
        cwd=tmp_path,
    )
    assert pred.returncode == 0, pred.stderr
    rows = [list(csv.DictReader(open(tmp_path / f, encoding="utf-8-sig"))) for f in ("r.csv", "o.csv")]
    assert [r["predict"] for r in rows[0]] == [r["predict"] for r in rows[1]] and len(rows[0]) == 18


def test_frozen_cache_under_torchrun_equals_one_process_and_resumes(ddp_data, tmp_path):
    args = ["--data_dir", ddp_data, *FAST, "--freeze", "--n_epochs", "3"]
    proc = one_then_two_processes(args, tmp_path)
    assert "feature cache: 1 view(s) x 57 train + 15 valid" in proc.stdout
    one, two = history(tmp_path / "one" / "m_last.pth"), history(tmp_path / "two" / "m_last.pth")
    for a, b in zip(one, two):  # the same features and the same head updates: equal within float noise
        assert b["valid_loss"] == pytest.approx(a["valid_loss"], rel=1e-3, abs=1e-4)
        assert b["valid_accuracy"] == pytest.approx(a["valid_accuracy"])
    ref_one, ref_two = (torch.load(tmp_path / run / "m.pth", weights_only=True)["ood"] for run in ("one", "two"))
    assert torch.allclose(ref_one["features"].float(), ref_two["features"].float(), atol=2e-3)  # the same reference
    assert ref_two["threshold"] == pytest.approx(ref_one["threshold"], rel=1e-3)
    resumed = torchrun("--resume", tmp_path / "two" / "m_last.pth", "--n_epochs", "5", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert [r["epoch"] for r in history(tmp_path / "two" / "m_last.pth")] == [1, 2, 3, 4, 5]


def test_readme_torchrun_commands(tmp_path):
    """The README's torchrun lines, as written (shorter runs), the multi-machine one as two 'machines'."""
    commands = [c for c in readme_commands() if c.startswith("torchrun") and "train.py" in c]
    assert len(commands) == 2
    data = copy_subset(tmp_path / "data", ["bag", "trouser"], 12, 4)
    extra = ["--data_dir", str(data), "--n_epochs", "1", "--input_size", "32", "--num_workers", "0", "--verbose", "0"]
    single = shlex.split(commands[0])
    argv = [TORCHRUN] + single[1 : single.index("train.py")] + [str(ROOT / "train.py")]
    argv += single[single.index("train.py") + 1 :] + extra
    proc = subprocess.run(argv, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "ddp.pth").exists()
    follow = [c for c in readme_commands() if "predict.py --model_fn ddp.pth" in c]
    assert follow
    pred = subprocess.run(
        [sys.executable, str(ROOT / "predict.py")] + shlex.split(follow[0])[2:],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pred.returncode == 0, pred.stderr

    multi = shlex.split(commands[1])
    argv = [TORCHRUN] + multi[1 : multi.index("train.py")] + [str(ROOT / "train.py")]
    argv += multi[multi.index("train.py") + 1 :] + extra
    nodes = [
        subprocess.Popen(argv, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [n.communicate(timeout=600) for n in nodes]
    for node, (_, err) in zip(nodes, outs):
        assert node.returncode == 0, err[-3000:]
    assert sum("best epoch" in out for out, _ in outs) == 1  # one global rank 0 over both machines
    ckpt = torch.load(tmp_path / "multi.pth", weights_only=True)
    assert ckpt["class_names"] == ["bag", "trouser"] and ckpt["args"]["model_name"] == "resnet18"


def test_multi_label_under_torchrun_gathers_every_validation_image_for_the_map(tmp_path):
    """Fine-tuned, each process evaluates its share: the validation mAP of the best epoch is the one of all
    validation images, computed here again in one process. SqueezeNet has no BatchNorm, whose running
    statistics would differ slightly between the processes (each updates its own after DDP's broadcast)."""
    import data_loader
    import metrics
    import model_loader
    from helpers import tiny_pairs

    labels_csv = tiny_pairs(tmp_path / "pairs")
    proc = torchrun(
        "--labels_csv",
        labels_csv,
        "--multi_label",
        *FAST,
        "--model_name",
        "squeezenet1_1",
        "--input_size",
        "64",
        "--n_epochs",
        "2",
        "--batch_size",
        "8",
        "--ood_method",
        "none",
        "--model_fn",
        tmp_path / "m.pth",
        "--log_dir",
        tmp_path / "run",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test mAP" in proc.stdout and proc.stdout.count("best epoch") == 1
    ckpt = model_loader.load_checkpoint(tmp_path / "m.pth")
    assert ckpt["multi_label"] and [r["valid_count"] for r in history(tmp_path / "m_last.pth")] == [25, 25]
    model, _ = model_loader.model_from_checkpoint(ckpt, tmp_path / "m.pth")
    tf = data_loader.build_transforms(ckpt["input_size"], ckpt["resize_size"], ckpt["mean"], ckpt["std"], train=False)
    rows = list(csv.DictReader(open(tmp_path / "run" / "valid_files.csv")))
    images = torch.stack([tf(data_loader.load_rgb(r["path"])) for r in rows])
    labels = torch.tensor([[float(c in r["class"].split()) for c in ckpt["class_names"]] for r in rows])
    with torch.no_grad():
        probs = model.eval()(images).sigmoid()
    best = history(tmp_path / "m_last.pth")[ckpt["metrics"]["best_epoch"] - 1]  # the epoch's own evaluation
    assert best["valid_map"] == pytest.approx(metrics.mean_average_precision(probs, labels), abs=1e-6)


def test_unfreezing_under_torchrun_keeps_every_rank_identical(tiny_data, tmp_path):
    """A head-only epoch through the frozen backbone, then every layer: the DDP wrapper is rebuilt when the trainable
    set grows, so the backbone's gradients are averaged too and both processes end with the same weights."""
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import torch, train, trainer\n"
        "from cli import run_cli\n"
        "real = trainer.Fitter.fit\n"
        "def fit(self):\n"
        "    result = real(self)\n"
        "    weights = {k: v.detach().clone() for k, v in self.model.named_parameters()}\n"
        f"    torch.save(weights, os.path.join({str(tmp_path)!r}, 'rank' + os.environ['RANK'] + '.pt'))\n"
        "    return result\n"
        "trainer.Fitter.fit = fit\n"
        "run_cli(lambda: train.main(train.parse_args(sys.argv[1:])))\n"
    )
    argv = [
        TORCHRUN,
        "--standalone",
        "--nproc_per_node",
        "2",
        str(driver),
        "--data_dir",
        str(tiny_data),
        *FAST,
        "--n_epochs",
        "2",
        "--unfreeze_after",
        "1",
        "--no_feature_cache",
        "--batch_size",
        "8",
        "--model_fn",
        str(tmp_path / "m.pth"),
        "--log_dir",
        str(tmp_path / "run"),
    ]
    proc = subprocess.run(argv, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    start = torch.load(tmp_path / "m_last.pth", weights_only=True)["train_state"]["history"]
    assert len(start) == 2 and set(first) == set(second)
    for name in first:
        assert torch.allclose(first[name], second[name], atol=1e-6), name
    backbone = [n for n in first if not n.startswith("fc.")]
    assert backbone  # the backbone trained in the second epoch, and stayed the same on both ranks
