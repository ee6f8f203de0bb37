"""predict.py at scale: rows streamed to a partial folder, kill -9 then --resume, refusals, torchrun's shares."""

import csv
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import predict
import prediction_output
import train
from conftest import ROOT, copy_subset, run_in_process
from helpers import interrupt_when_called, read_csv, readme_commands, run_predict

TORCHRUN = str(Path(sys.executable).parent / "torchrun")

KILLED_AT_A_WRITE = """
import os, signal, sys
sys.path.insert(0, {root!r})
import cli, predict, prediction_output
real, calls = prediction_output.PartWriter.write, [0]
def write(self, rows):
    calls[0] += 1
    if calls[0] == {at}:  # half a batch's record on disk, then kill -9: as a machine lost mid-write
        data = prediction_output.encode_frame(rows)
        os.write(self.fd, data[:len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, rows)
prediction_output.PartWriter.write = write
cli.run_cli(lambda: predict.main(predict.parse_args()))
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A frozen ResNet-18 head on 3 classes of 28 px images (one epoch), and 8 test images per class."""
    root = tmp_path_factory.mktemp("at_scale")
    data = copy_subset(root / "data", ["bag", "sneaker", "trouser"], 12, 8)
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
                    "--num_workers",
                    "0",
                    "--verbose",
                    "0",
                    "--model_fn",
                    root / "m.pth",
                    "--log_dir",
                    root / "run",
                ]
            ]
        )
    )
    return root / "m.pth", data / "test"


def rows_of(path):
    return [dict(r) for r in read_csv(path)]


def assert_same_rows(rows, expected, tol=1e-5):
    """The same files in the same order, the same answers, the numbers within tol."""
    assert [r["file_dir"] for r in rows] == [r["file_dir"] for r in expected]
    for row, want in zip(rows, expected):
        assert row.keys() == want.keys()
        for key, value in want.items():
            if value and (key.startswith("prob_") or key in ("confidence", "ood_score")):
                assert float(row[key]) == pytest.approx(float(value), abs=tol), (key, row, want)
            else:
                assert row[key] == value, (key, row, want)


def test_kill_9_mid_run_then_resume_gives_each_image_once(model, tmp_path, capsys):
    ckpt, images = model
    argv = [
        "--model_fn",
        ckpt,
        "--data_dir",
        images,
        "--batch_size",
        "4",
        "--n_images",
        "3",
        "--plot",
        tmp_path / "p.png",
    ]
    run_predict(capsys, *argv, "--output", tmp_path / "whole.csv")
    whole = rows_of(tmp_path / "whole.csv")
    assert len(whole) == 24

    out = tmp_path / "r.csv"
    script = tmp_path / "killed.py"
    script.write_text(KILLED_AT_A_WRITE.format(root=str(ROOT), at=4))
    proc = subprocess.run(
        [sys.executable, str(script), *map(str, argv), "--output", str(out), "--num_workers", "0", "--verbose", "0"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, MPLBACKEND="Agg"),
    )
    assert proc.returncode == -9, proc.stderr
    partial = prediction_output.partial_dir(out)
    assert not out.exists() and (partial / "run.json").is_file()
    (part,) = partial.glob("rank*.rows")
    frames = prediction_output.read_frames(part)
    kept = [row[0] for _, rows in frames for row in rows]
    assert kept == list(range(12))  # 3 whole batches of 4; the 4th, cut in half, is not one
    printed = run_predict(capsys, *argv, "--output", out, "--resume")
    assert "predicted 24 images" in printed and "12 of them from the interrupted run" in printed
    assert_same_rows(rows_of(out), whole)
    assert not partial.exists()
    assert (tmp_path / "r_report.csv").read_text() == (tmp_path / "whole_report.csv").read_text()


def test_ctrl_c_keeps_the_rows_and_resume_refuses_what_does_not_match(model, tmp_path, capsys, monkeypatch):
    """A real SIGINT in the second batch: status 130, the batches done stay in the partial folder; a plain rerun,
    a resume with another model, flags or inputs are refused in one line and change nothing; the same command
    with --resume finishes."""
    from cli import run_cli

    ckpt, images = model
    out = tmp_path / "r.csv"
    argv = [
        "--model_fn",
        ckpt,
        "--data_dir",
        images,
        "--output",
        out,
        "--batch_size",
        "8",
        "--n_images",
        "0",
        "--num_workers",
        "0",
        "--verbose",
        "0",
    ]
    assert "no interrupted run" in run_in_process(predict, argv + ["--resume"], capsys)
    with monkeypatch.context() as m:
        interrupt_when_called(m, predict.prediction_output, "pack_row")
        with pytest.raises(SystemExit) as e:
            run_cli(lambda: predict.main(predict.parse_args([str(a) for a in argv])))
    err = capsys.readouterr().err
    assert e.value.code == 130 and "interrupted after 8 images" in err and "--resume" in err, err
    partial = prediction_output.partial_dir(out)
    before = {p.name: p.read_bytes() for p in partial.iterdir()}
    assert len([r for _, rows in prediction_output.read_frames(partial / "rank0.rows") for r in rows]) == 8

    other = tmp_path / "other.pth"
    other.write_bytes(ckpt.read_bytes() + b"\0")  # another file, still a checkpoint torch reads
    for changed, words in (
        (["--model_fn", other], "model"),
        (["--threshold", "0.5"], "--threshold (was None, now 0.5)"),
        (["--tta"], "another value of --tta (was False, now True);"),
        (["--unknown_label", "x", "--amp"], "--unknown_label (was 'unknown', now 'x'), --amp (was"),
        (["--reject_ood"], "--reject_ood (was False, now True)"),
        (["--topk", "2"], "columns"),
        (["--data_dir", images / "bag"], "input list"),
        (
            ["--embeddings", tmp_path / "e.npy"],
            "--embeddings, --similar_to or --rank_for_labelling (was None, now True)",
        ),  # rows without features
    ):
        err = run_in_process(predict, argv + changed + ["--resume"], capsys)
        assert "--resume" in err and words in err and "nothing was changed" in err, err
    assert "add --resume" in run_in_process(predict, argv, capsys)
    assert {p.name: p.read_bytes() for p in partial.iterdir()} == before and not out.exists()

    run_predict(capsys, *argv, "--resume")
    rows = rows_of(out)
    assert len(rows) == 24 and len({r["file_dir"] for r in rows}) == 24 and not partial.exists()


def test_torchrun_two_processes_write_what_one_does(model, tmp_path, capsys, monkeypatch):
    """2 processes on the CPU (gloo), the docs' command, over a --file_list with a missing file, going on with
    --resume from a one-process run stopped after its first batch, the processes needing different numbers of
    batches: the same result.csv as one process (files,
    order, answers; probabilities within 1e-5), the report and figure over every row, one summary."""
    from cli import run_cli

    ckpt, images = model
    files = sorted(images.rglob("*.png"))[::-1]  # the list's order, not sorted
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([str(f) for f in files[:10]] + ["gone.png"] + [str(f) for f in files[10:]]) + "\n")
    argv = ["--model_fn", ckpt, "--file_list", listing, "--batch_size", "4", "--n_images", "4", "--embeddings"]
    printed = run_predict(
        capsys, *argv, tmp_path / "one.npy", "--output", tmp_path / "one.csv", "--plot", tmp_path / "one.png"
    )
    assert "1 unreadable" in printed
    with monkeypatch.context() as m:  # one process, stopped after its first batch: 4 rows kept
        interrupt_when_called(m, predict.prediction_output, "pack_row")
        with pytest.raises(SystemExit):
            run_cli(
                lambda: predict.main(
                    predict.parse_args(
                        [str(a) for a in argv]
                        + [str(tmp_path / "two.npy"), "--output", str(tmp_path / "two.csv")]
                        + ["--num_workers", "0", "--verbose", "0"]
                    )
                )
            )
    capsys.readouterr()
    (command,) = [c for c in readme_commands() if c.startswith("torchrun") and "predict.py" in c]  # the docs'
    tokens = shlex.split(command)
    for flag, value in (("--model_fn", ckpt), ("--file_list", listing), ("--output", "two.csv")):
        tokens[tokens.index(flag) + 1] = str(value)
    tokens[tokens.index("predict.py")] = str(ROOT / "predict.py")
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [
            TORCHRUN,
            *tokens[1:],
            "--batch_size",
            "5",  # the 21 rows left, in shares of 11 and 10: 3 batches for one process, 2 for the other
            "--n_images",
            "4",
            "--plot",
            "two.png",
            "--num_workers",
            "0",
            "--verbose",
            "0",
            "--resume",
            "--embeddings",
            "two.npy",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # processes stuck at different collectives: end all of them, then fail
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("torchrun did not finish in 120 s")
    assert proc.returncode == 0, err[-3000:]
    assert "warning" not in err, err  # each image predicted by one process only
    assert out.count("predicted 24 images") == 1 and "1 unreadable" in out, out
    assert "4 of them from the interrupted run" in out, out
    one, two = rows_of(tmp_path / "one.csv"), rows_of(tmp_path / "two.csv")
    assert [r["file_dir"] for r in one] == [str(f) for f in files[:10]] + [str(tmp_path / "gone.png")] + [
        str(f) for f in files[10:]
    ]
    assert one[10]["error"].startswith("FileNotFoundError") and one[10]["predict"] == ""
    assert_same_rows(two, one)
    assert (tmp_path / "two.png").stat().st_size > 0 and not prediction_output.partial_dir(
        tmp_path / "two.csv"
    ).exists()
    # the embeddings: one row per result row, in its order (the missing file's row NaN), the same from both runs
    # and equal to the classifier's input for that file
    one_emb, two_emb = np.load(tmp_path / "one.npy"), np.load(tmp_path / "two.npy")
    assert one_emb.shape == (25, 512) and one_emb.dtype == np.float32 and "-> " + str(tmp_path / "one.npy") in printed
    assert np.isnan(one_emb[10]).all() and not np.isnan(np.delete(one_emb, 10, axis=0)).any()
    assert np.allclose(two_emb, one_emb, atol=1e-5, equal_nan=True)
    assert np.allclose(features_of(ckpt, [files[0], files[17]]), one_emb[[0, 18]], atol=1e-4)


def features_of(ckpt, files):
    """The classifier layer's input for these files, computed here without predict.py."""
    import data_loader
    import model_loader

    checkpoint = model_loader.load_checkpoint(ckpt)
    model, head = model_loader.model_from_checkpoint(checkpoint, ckpt)
    taken = []
    model.eval().get_submodule(head).register_forward_pre_hook(lambda m, inputs: taken.append(inputs[0]))
    transform = data_loader.Preprocess.of(checkpoint).transform()
    with torch.no_grad():
        model(torch.stack([transform(data_loader.load_rgb(f)) for f in files]))
    return taken[0].numpy()


def test_similar_to_and_rank_for_labelling_on_a_pool_with_copies(model, tmp_path, capsys):
    """A pool of the test images and ten copies of the most uncertain one: --similar_to that image lists its ten
    copies first (similarity 1, the query itself left out); --rank_for_labelling 6 takes one copy at most and six
    distinct files, with an empty label and a reason; its labels filled in, train.py --labels_csv trains on it.
    Bad values: one line each."""
    ckpt, images = model
    run_predict(capsys, "--model_fn", ckpt, "--data_dir", images, "--output", tmp_path / "first.csv", "--n_images", 0)
    first = rows_of(tmp_path / "first.csv")
    margin = [sorted(float(r[k]) for k in r if k.startswith("prob_"))[-2:] for r in first]
    uncertain = Path(first[min(range(len(first)), key=lambda i: margin[i][1] - margin[i][0])]["file_dir"])
    pool = tmp_path / "pool"
    shutil.copytree(images, pool)
    query = pool / uncertain.parent.name / uncertain.name
    for k in range(10):
        shutil.copy(query, pool / query.parent.name / f"copy{k}_{query.name}")
    out = tmp_path / "pool.csv"
    argv = ["--model_fn", ckpt, "--data_dir", pool, "--output", out, "--n_images", 0]
    printed = run_predict(capsys, *argv, "--similar_to", query, "--top", 12, "--rank_for_labelling", 6)
    assert (
        f"similar to {query}: 12 images; the closest " in printed and "to label first: 6 images, uncertain" in printed
    )
    similar = rows_of(tmp_path / "pool_similar.csv")
    assert [r["rank"] for r in similar] == [str(i) for i in range(1, 13)]
    assert {Path(r["file_dir"]).name for r in similar[:10]} == {f"copy{k}_{query.name}" for k in range(10)}
    assert all(float(r["similarity"]) > 0.9999 for r in similar[:10]) and float(similar[10]["similarity"]) < 0.9999
    assert str(query) not in {r["file_dir"] for r in similar}
    picks = rows_of(tmp_path / "pool_to_label.csv")
    names = [Path(r["file"]).name for r in picks]
    assert len(picks) == 6 and len(set(names)) == 6 and all(r["label"] == "" and r["why"] for r in picks)
    assert sum(name == query.name or name.startswith("copy") for name in names) <= 1, names
    assert float(picks[0]["score"]) == max(float(r["score"]) for r in picks)
    for r in picks[:5]:  # the user's labels: the image's folder; the sixth not labelled yet
        r["label"] = Path(r["file"]).parent.name
    with open(tmp_path / "pool_to_label.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(picks[0]))
        writer.writeheader()
        writer.writerows(picks)
    hint = printed.split("or try it alone: ")[1].split("\n")[0]  # the command the run suggests, as printed
    assert hint == (
        f"python train.py --labels_csv {tmp_path / 'pool_to_label.csv'} --model_name resnet18 --input_size 32 "
        f"--freeze --model_fn {tmp_path / 'pool_to_label.pth'}"
    ), hint
    quick = ["--n_epochs", "1", "--num_workers", "0", "--verbose", "0", "--log_dir", str(tmp_path / "next")]
    train.main(train.parse_args(shlex.split(hint)[2:] + quick))
    import model_loader

    assert model_loader.load_checkpoint(tmp_path / "pool_to_label.pth")["class_names"] == sorted(
        {r["label"] for r in picks[:5]}
    )
    warned = capsys.readouterr().out
    assert "1 of 6 rows of the list to label have no label yet, left out" in warned, warned
    # a list with labels filled in is not replaced by the next ranking
    err = run_in_process(predict, argv + ["--rank_for_labelling", 6], capsys)
    assert "pool_to_label.csv has labels filled in" in err
    # a file listed twice is ranked once
    listing = tmp_path / "twice.txt"
    listing.write_text("".join(f"{f}\n" for f in sorted(images.rglob("*.png"))[:4] * 2))
    run_predict(
        capsys,
        "--model_fn",
        ckpt,
        "--file_list",
        listing,
        "--output",
        tmp_path / "twice.csv",
        "--n_images",
        0,
        "--rank_for_labelling",
        6,
    )
    twice = [r["file"] for r in rows_of(tmp_path / "twice_to_label.csv")]
    assert len(twice) == 4 == len(set(twice))
    capsys.readouterr()
    for extra, words in (
        (["--similar_to", ckpt], "--similar_to " + str(ckpt) + ": cannot be read as an image"),
        (["--rank_for_labelling", 35], "--rank_for_labelling 35: give a number from 1 to the 34 images"),
        (["--embeddings", tmp_path / "e.txt"], "name an .npy file"),
        (["--top", 3], "--top 3 is how many images --similar_to lists: give --similar_to IMAGE with it"),
    ):
        err = run_in_process(predict, argv + extra, capsys)
        assert words in err, err


def test_shares_split_the_remaining_images_once_and_in_order():
    remaining = [0, 2, 3, 5, 8, 9, 11]
    shares = [list(prediction_output.share(remaining, rank, 3)) for rank in range(3)]
    assert sorted(sum(shares, [])) == remaining and all(s == sorted(s) for s in shares)
    assert [len(s) for s in shares] == [3, 2, 2]  # the first is the largest: every process runs its steps


def test_uncertainty_is_measured_against_the_models_own_thresholds():
    """Single-label: 1 - the top-2 margin. Multi-label: how close a class is to *its* threshold, not to 0.5: with
    thresholds 0.2 and 0.8, a row at 0.21 for the first class is nearly undecided; one at 0.5 / 0.5 is not."""
    import calibration

    single = calibration.Calibration().uncertainty(torch.tensor([[0.7, 0.2, 0.1], [0.45, 0.44, 0.11]]))
    assert single.tolist() == pytest.approx([0.5, 0.99])
    sets = calibration.SetCalibration([1.0, 1.0], [0.2, 0.8])
    u = sets.uncertainty(torch.tensor([[0.5, 0.5], [0.21, 0.1]]))
    assert u.tolist() == pytest.approx([1 - 0.3 / 0.8, 1 - 0.01 / 0.8])
    assert sets.uncertainty(torch.tensor([[0.5, 0.5]]), threshold=0.5).tolist() == pytest.approx([1.0])


def test_embeddings_of_a_1x1_convolution_classifier_are_its_pooled_input(tiny_data, tmp_path, capsys):
    """SqueezeNet's classifier is a 1x1 convolution over a feature map: its embeddings are the map's spatial mean
    (512 values), as the out-of-distribution score reads them, not the flattened map."""
    train.main(
        train.parse_args(
            [str(a) for a in ("--data_dir", tiny_data, "--model_name", "squeezenet1_1", "--input_size", 64)]
            + [str(a) for a in ("--n_epochs", 1, "--num_workers", 0, "--verbose", 0, "--freeze")]
            + ["--model_fn", str(tmp_path / "s.pth"), "--log_dir", str(tmp_path / "run")]
        )
    )
    capsys.readouterr()
    printed = run_predict(
        capsys,
        "--model_fn",
        tmp_path / "s.pth",
        "--output",
        tmp_path / "s.csv",
        "--n_images",
        0,
        "--embeddings",
        tmp_path / "s.npy",
    )
    assert np.load(tmp_path / "s.npy").shape == (18, 512) and "18 rows of 512 float32 features" in printed


def test_the_figures_go_beside_the_output_by_default(model, tmp_path, capsys, monkeypatch):
    ckpt, images = model
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "today" / "result.csv"
    printed = run_predict(capsys, "--model_fn", ckpt, "--data_dir", images, "--output", out)
    figure = out.with_name("predictions.png")
    assert f"figure -> {figure}" in printed
    with Image.open(figure) as im, Image.open(out.with_name("predictions_confusion.png")) as matrix:
        assert im.width > 100 and matrix.width > 100
    assert not (tmp_path / "predictions.png").exists() and len(rows_of(out)) == 24
    # a table written among the images read: the figure stays out of them, in the current folder as before
    photos = shutil.copytree(images, tmp_path / "photos")
    printed = run_predict(capsys, "--model_fn", ckpt, "--data_dir", photos, "--output", photos / "result.csv")
    assert "figure -> predictions.png" in printed and (tmp_path / "predictions.png").is_file()
    assert not list(photos.rglob("predictions*.png")) and len(rows_of(photos / "result.csv")) == 24
