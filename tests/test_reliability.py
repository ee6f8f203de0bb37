"""Messy folders, killed and interrupted runs, exact resume."""

import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, copy_subset, run_script

BAD = ["zero bytes.png", "truncated.jpg", "not_an_image.jpg", "bomb.png"]


def make_corpus(root):
    """Real images in two classes plus every awkward file kind; returns {class: [bad names]}."""
    copy_subset(root, ["bag", "trouser"], 10, 3)
    bag, trouser = root / "train" / "bag", root / "train" / "trouser"
    rng = np.random.default_rng(0)
    (bag / "zero bytes.png").write_bytes(b"")
    noisy = root / "noisy.jpg"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(noisy, quality=95)
    (bag / "truncated.jpg").write_bytes(noisy.read_bytes()[:1500])
    noisy.unlink()
    (trouser / "not_an_image.jpg").write_text("this is text with a .jpg name")
    Image.new("1", (10000, 9000)).save(trouser / "bomb.png")  # 90 Mpx: over Pillow's decompression-bomb limit
    # odd but valid files
    Image.new("CMYK", (40, 40), (0, 200, 200, 0)).save(bag / "cmyk.jpg")
    Image.new("RGBA", (40, 40), (200, 10, 10, 128)).save(bag / "rgba.png")
    pal = Image.new("P", (40, 40), 1)
    pal.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    pal.save(bag / "palette transparent.png", transparency=0)
    Image.fromarray(np.full((40, 40), 40000, dtype=np.uint16)).save(trouser / "gray16.png")
    Image.new("LA", (40, 40), (120, 200)).save(trouser / "gray alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (50, 30), (20, 20, 200)).save(trouser / "exif rotated.jpg", exif=exif)
    Image.new("RGB", (2, 2), (9, 9, 9)).save(trouser / "tiny.png")
    Image.new("RGB", (40, 40), (1, 2, 3)).save(trouser / "naïve ünïcode 名前.png")
    (trouser / ".hidden.png").write_bytes(b"")
    (trouser / "notes.txt").write_text("ignored")
    (bag / ".DS_Store").write_bytes(b"\0\0")
    return {"bag": ["zero bytes.png", "truncated.jpg"], "trouser": ["not_an_image.jpg", "bomb.png"]}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    bad = make_corpus(root)
    return root, bad


def test_odd_but_valid_files_load_upright_in_true_colours(corpus):
    import data_loader as dl

    root, _ = corpus
    t = root / "train"
    assert dl.load_rgb(t / "trouser" / "gray16.png").getpixel((5, 5)) == (156, 156, 156)  # 40000/257, not white
    assert dl.load_rgb(t / "trouser" / "exif rotated.jpg").size == (30, 50)
    assert dl.load_rgb(t / "bag" / "palette transparent.png").getpixel((3, 3)) == (200, 30, 30)
    r, g, b = dl.load_rgb(t / "bag" / "rgba.png").getpixel((3, 3))
    assert r > 200 and 120 < g < 140  # half-transparent red on white
    assert dl.load_rgb(t / "trouser" / "tiny.png").size == (2, 2)
    names = {p.name for p in dl.list_images(t)}
    assert ".hidden.png" not in names and "notes.txt" not in names and "naïve ünïcode 名前.png" in names


def test_training_skips_unreadable_files_with_one_warning_each(corpus, tmp_path):
    root, bad = corpus
    proc = run_script(
        "train.py",
        "--data_dir",
        root,
        "--model_name",
        "resnet18",
        "--input_size",
        "32",
        "--n_epochs",
        "2",
        "--num_workers",
        "1",
        "--batch_size",
        "4",
        "--valid_ratio",
        "0.3",
        "--model_fn",
        tmp_path / "m.pth",
        "--log_dir",
        tmp_path / "run",
        "--verbose",
        "1",
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    for names in bad.values():
        for name in names:
            assert out.count("skipping unreadable image") >= 1
            assert sum(name in line for line in out.splitlines() if "skipping unreadable" in line) == 1, name
    assert "skipped unreadable images per class: {" in proc.stdout
    summary = [ln for ln in proc.stdout.splitlines() if ln.startswith("skipped unreadable")][0]
    assert "'bag': 2" in summary and "'trouser': 2" in summary
    assert "Traceback" not in proc.stderr


def test_prediction_has_an_error_column_for_unreadable_files(corpus, tmp_path):
    root, bad = corpus
    proc = run_script(
        "train.py",
        "--data_dir",
        root,
        "--model_name",
        "resnet18",
        "--input_size",
        "32",
        "--freeze",
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
    assert proc.returncode == 0, proc.stderr
    proc = run_script(
        "predict.py",
        "--model_fn",
        tmp_path / "m.pth",
        "--data_dir",
        root / "train",
        "--output",
        tmp_path / "r.csv",
        "--plot",
        tmp_path / "p.png",
        "--num_workers",
        "1",
    )
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "r.csv", encoding="utf-8-sig")))
    files = sorted(
        str(p)
        for p in (root / "train").rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in (".png", ".jpg")
    )
    assert [r["file_dir"] for r in rows] == files
    errors = {os.path.basename(r["file_dir"]): r["error"] for r in rows if r["error"]}
    assert set(errors) == set(BAD) and all(rows[i]["predict"] == "" for i, r in enumerate(rows) if r["error"])
    assert "DecompressionBomb" in errors["bomb.png"]
    assert "4 unreadable" in proc.stdout


def test_check_data_reports_problems_and_leaks(corpus, tmp_path):
    root, _ = corpus
    proc = run_script("train.py", "--data_dir", root, "--check_data")
    assert proc.returncode == 1 and "unreadable: 4" in proc.stdout and "tiny: 1" in proc.stdout
    text = root / "train" / "trouser" / "not_an_image.jpg"  # named by its path, not by the buffer it was read into
    assert f"  {text}: UnidentifiedImageError: cannot identify image file {str(text)!r}" in proc.stdout.splitlines()
    assert "BytesIO" not in proc.stdout
    (modes,) = [line for line in proc.stdout.splitlines() if line.startswith("image modes: ")]
    assert "{" not in modes and "CMYK" in modes and "grayscale with transparency (LA)" in modes, modes
    assert "converted to RGB" in modes
    assert "identical files in more than one of train/valid/test: 0" in proc.stdout
    import audit

    clean = copy_subset(tmp_path / "clean", ["bag", "trouser"], 5, 2)
    lines = []
    assert audit.audit_data(clean, lines.append) == 0
    assert "train: 10 images; bag 5, trouser 5; imbalance 1.0x" in lines
    leaked = sorted((clean / "train" / "bag").glob("*.png"))[0]
    (clean / "test" / "bag" / "copy.png").write_bytes(leaked.read_bytes())
    lines = []
    assert audit.audit_data(clean, lines.append) == 1
    assert "identical files in more than one of train/valid/test: 1" in lines


def test_class_weights_and_balanced_sampler_train(tmp_path, monkeypatch):
    """20 bags and 4 trousers: the balanced sampler shows the head as many trousers as bags, and the loss
    carries the inverse-frequency weights."""
    data = copy_subset(tmp_path / "imb", ["bag"], 20, 2)
    copy_subset(data, ["trouser"], 4, 2)
    import tasks
    import train
    import trainer

    seen, weights, real = [], [], trainer.train_step

    def recording_step(model, images, labels, optimizer, scheduler, scaler, criterion, *rest):
        seen.extend(labels.tolist())
        weights.append(criterion.weight)
        return real(model, images, labels, optimizer, scheduler, scaler, criterion, *rest)

    monkeypatch.setattr(trainer, "train_step", recording_step)
    args = [
        "--data_dir",
        data,
        "--model_name",
        "resnet18",
        "--input_size",
        "32",
        "--num_workers",
        "0",
        "--verbose",
        "0",
        "--n_epochs",
        "4",
        "--patience",
        "0",
        "--freeze",
        "--class_weights",
        "auto",
        "--balanced_sampler",
        "--model_fn",
        tmp_path / "m.pth",
        "--log_dir",
        tmp_path / "run",
    ]
    result = train.main(train.parse_args([str(a) for a in args]))
    assert result.state.epoch == 4
    # 16 bags + 3 trousers train (valid split 0.2): plain shuffling would give trousers 16% of the draws
    assert 0.35 <= sum(seen) / len(seen) <= 0.65 and len(seen) == 4 * 19
    assert weights[0].tolist() == pytest.approx(tasks.inverse_frequency([16, 3]))
    assert tasks.inverse_frequency([16, 4]) == pytest.approx([0.625, 2.5])


# ----------------------------------------------------------------------------- killed and interrupted runs

TRAIN_ARGS = [
    "--model_name",
    "resnet18",
    "--input_size",
    "32",
    "--batch_size",
    "8",
    "--patience",
    "0",
    "--verbose",
    "1",
]


def popen_train(data, tmp_path, *extra, wrapper=None, preexec=None):
    argv = [sys.executable] + ([str(wrapper)] if wrapper else [str(ROOT / "train.py")])
    argv += [
        str(a)
        for a in [
            "--data_dir",
            data,
            "--model_fn",
            tmp_path / "m.pth",
            "--log_dir",
            tmp_path / "run",
            *TRAIN_ARGS,
            *extra,
        ]
    ]
    return subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg"),
        start_new_session=True,
        preexec_fn=preexec,
    )


def wait_for(proc, text, timeout=180):
    """Read stdout lines until one contains `text`; returns the lines read."""
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(
        f"never saw {text!r}: {''.join(lines)} {proc.stderr.read() if proc.poll() is not None else ''}"
    )


SLOW_SAVE = """
import os, sys, time
sys.path.insert(0, {root!r})
import torch, cli
real_save, count = torch.save, [0]
def slow_save(obj, f, *a, **k):
    count[0] += 1
    real_save(obj, f, *a, **k)
    if count[0] == int(os.environ["SLOW_SAVE_AT"]):
        f.flush()
        print("SAVING", flush=True)
        time.sleep(60)
torch.save = slow_save
import train
cli.run_cli(lambda: train.main(train.parse_args()))
"""


def loads(path):
    return torch.load(path, weights_only=True)


def test_sigkill_at_any_moment_leaves_loadable_checkpoints(tiny_data, tmp_path):
    wrapper = tmp_path / "slow_save.py"
    wrapper.write_text(SLOW_SAVE.format(root=str(ROOT)))
    # saves: 1 = best after epoch 1, 2 = _last after epoch 1, 3 = best after epoch 2, 4 = _last after epoch 2
    for at in (4,):  # killed while _last is written: the earlier _last and the best model stay whole
        work = tmp_path / f"save{at}"
        work.mkdir()
        proc = subprocess.Popen(
            [sys.executable, str(wrapper)]
            + [
                str(a)
                for a in [
                    "--data_dir",
                    tiny_data,
                    "--model_fn",
                    work / "m.pth",
                    "--log_dir",
                    work / "run",
                    *TRAIN_ARGS,
                    "--n_epochs",
                    "3",
                    "--num_workers",
                    "0",
                    "--save_interval",
                    "0",
                ]
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, SLOW_SAVE_AT=str(at), PYTHONUNBUFFERED="1"),
            start_new_session=True,
        )
        wait_for(proc, "SAVING")
        os.killpg(proc.pid, signal.SIGKILL)  # in the middle of a checkpoint write (temp file half done)
        proc.wait()
        (tmp,) = work.glob(".m*.tmp.pth")  # the killed write went to a temp file in the same folder
        target = work / (tmp.name[1:].split(".pth")[0] + ".pth")
        assert loads(target)["epoch"] < loads(tmp)["epoch"]  # the file under its real name is the earlier one
        assert loads(work / "m.pth")["epoch"] >= 1 and loads(work / "m_last.pth")["epoch"] >= 1
    work = tmp_path / "start"  # killed at start-up: nothing is written, not even a temporary file
    work.mkdir()
    proc = popen_train(tiny_data, work, "--n_epochs", "3", "--num_workers", "1")
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("sig, ignored", [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True)])
def test_stop_signal_saves_and_explains_how_to_resume(tiny_data, tmp_path, sig, ignored):
    preexec = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignored else None  # a background job
    proc = popen_train(tiny_data, tmp_path, "--n_epochs", "20", "--num_workers", "1", preexec=preexec)
    wait_for(proc, "epoch 1/20")
    os.killpg(proc.pid, sig)  # like Ctrl-C in a terminal: every process of the group, workers included
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, out + err
    assert "Traceback" not in err, err
    assert f"--resume {tmp_path / 'm_last.pth'}" in out
    last = loads(tmp_path / "m_last.pth")
    assert 1 <= last["epoch"] < 20 and last["resumable"]


def final_weights(path):
    return loads(path)["state_dict"]


def test_resume_reaches_the_same_weights_and_logs_each_epoch_once(tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    n = 3
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    straight.mkdir(), broken.mkdir()
    proc = popen_train(tiny_data, straight, "--n_epochs", n, "--num_workers", "1")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err

    proc = popen_train(tiny_data, broken, "--n_epochs", n, "--num_workers", "1")
    wait_for(proc, f"epoch 1/{n}")
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert loads(broken / "m_last.pth")["epoch"] in (1, 2)
    resumed = run_script("train.py", "--resume", broken / "m_last.pth", cwd=broken)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout

    a, b = final_weights(straight / "m_last.pth"), final_weights(broken / "m_last.pth")
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5, rtol=1e-4), k
    assert loads(broken / "m.pth")["epoch"] == loads(straight / "m.pth")["epoch"]
    rows = list(csv.DictReader(open(broken / "run" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, n + 1))
    ref = list(csv.DictReader(open(straight / "run" / "metrics.csv")))
    for r1, r2 in zip(rows, ref):
        assert float(r1["valid_loss"]) == pytest.approx(float(r2["valid_loss"]), rel=1e-4)
    acc = EventAccumulator(str(broken / "run"))
    acc.Reload()
    for tag in ("Train/Loss", "Validation/Accuracy"):
        assert [e.step for e in acc.Scalars(tag)] == list(range(1, n + 1)), tag
