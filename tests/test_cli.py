"""Bad input to both scripts: one clear line, non-zero exit, no traceback, nothing already written lost."""

import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import export
import predict
import train
from cli import run_cli
from conftest import ROOT, assert_clean_error, copy_subset, run_in_process, run_script


def base(tiny_data, tmp_path):
    return [
        "--data_dir",
        tiny_data,
        "--model_fn",
        tmp_path / "m.pth",
        "--log_dir",
        tmp_path / "run",
        "--num_workers",
        "0",
        "--input_size",
        "32",
        "--n_epochs",
        "1",
        "--verbose",
        "0",
    ]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data_dir", "/nonexistent/folder"], "does not exist"),
        (["--n_classes", "5"], "--n_classes 5 does not match the 3 class folders"),
        (["--model_name", "resnet9000"], "unknown --model_name"),
        (["--batch_size", "0"], "--batch_size must be a positive number"),
        (["--n_epochs", "-1"], "--n_epochs must be a positive number"),
        (["--gpu_id", "0"], "CUDA is not available"),
        (["--freeze", "--unfreeze_after", "2"], "without --freeze"),
        (["--use_pretrained", "--weights", "x.pth"], "not both"),
        (["--weights", "/nonexistent.pth"], "does not exist"),
        (["--resume", "/nonexistent_last.pth"], "does not exist"),
    ],
)
def test_train_bad_flags(tiny_data, tmp_path, capsys, extra, message):
    if extra == ["--gpu_id", "0"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    err = run_in_process(train, base(tiny_data, tmp_path) + extra, capsys)
    assert message in err
    assert not (tmp_path / "m.pth").exists()


def test_train_unwritable_model_fn_fails_before_training(tiny_data, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = run_in_process(train, base(tiny_data, tmp_path) + ["--model_fn", blocker / "sub" / "m.pth"], capsys)
    assert "cannot write --model_fn" in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "layout, message",
    [
        ({}, "no class subfolders"),
        ({"train/a": 0, "train/b": 2}, "has no images"),
        ({"train/a": 3}, "only one class"),
    ],
)
def test_train_bad_data_folders(tmp_path, capsys, layout, message):
    root = tmp_path / "data"
    root.mkdir()
    for folder, n in layout.items():
        (root / folder).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8)).save(root / folder / f"{i}.png")
    err = run_in_process(train, ["--data_dir", root, "--model_fn", tmp_path / "m.pth", "--num_workers", "0"], capsys)
    assert message in err


def test_train_errors_as_a_subprocess_have_no_traceback(tmp_path):
    proc = run_script("train.py", "--n-epochs", "0")  # dashed spelling accepted, value refused
    assert_clean_error(proc, "--n_epochs must be a positive number")


def test_predict_bad_inputs(tmp_path, capsys, tiny_data):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    assert "does not exist" in run_in_process(predict, ["--model_fn", tmp_path / "none.pth"], capsys)
    assert "is not a PyTorch checkpoint (neither a zip nor a pickle file)" in run_in_process(
        predict, ["--model_fn", text], capsys
    )
    photo = tmp_path / "photo.pth"  # a JPEG given as the model: no torch advice about weights_only
    Image.new("RGB", (8, 8)).save(photo, format="JPEG")
    err = run_in_process(predict, ["--model_fn", photo], capsys)
    assert err.endswith("is not a PyTorch checkpoint (a JPEG image)\n") and "weights_only" not in err, err
    import model_loader

    exported = tmp_path / "m.onnx"  # an export given where the checkpoint is read (export.py, train.py --weights)
    exported.write_bytes(b"\x08\x07" + bytes(20))
    assert model_loader.file_kind(exported) == "an exported onnx model: give the .pth checkpoint train.py wrote"
    assert model_loader.file_kind(photo) == "a JPEG image" and "name it .onnx" in model_loader.file_kind(
        exported.rename(tmp_path / "m.bin")
    )
    bare = tmp_path / "bare.pth"
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), bare)
    err = run_in_process(predict, ["--model_fn", bare], capsys)
    assert "bare state_dict" in err and f"python train.py --weights {bare}" in err


def test_predict_errors_as_a_subprocess_have_no_traceback(tmp_path):
    proc = run_script("predict.py", "--model_fn", tmp_path / "missing.pth", cwd=tmp_path)
    assert_clean_error(proc, "does not exist")
    assert not (tmp_path / "result.csv").exists()


def test_help_runs_for_both_scripts_and_ends_with_examples(capsys):
    for module, script in ((train, "train.py"), (predict, "predict.py")):
        with pytest.raises(SystemExit) as e:
            module.parse_args(["--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and "--model_fn" in out and "--gpu_id" in out
        tail = out.rstrip().split("examples:")[-1].strip().splitlines()
        assert 2 <= len(tail) <= 3 and all(line.strip().startswith(f"python {script} --") for line in tail), out
        for action in module.build_parser()._actions:
            assert action.help, action.option_strings  # every flag says what it does


def every_parser():
    from helpers import load_script

    return {
        "train.py": (train.parse_args, ["--n_epoch", "3"], "--n_epochs"),
        "predict.py": (predict.parse_args, ["--batch", "3"], "--batch_size"),
        "data/prepare.py": (
            load_script("data/prepare.py").parse_args,
            ["catdog", "--zip", "z", "--test_rat", "0.2"],
            "--test_ratio",
        ),
        "bench/bench.py": (load_script("bench/bench.py").parse_args, ["--epoch", "2"], "--epochs"),
    }


@pytest.mark.parametrize("script", ["train.py", "predict.py", "data/prepare.py", "bench/bench.py"])
def test_a_flag_prefix_is_an_error_that_names_the_flag(script, capsys):
    parse, argv, meant = every_parser()[script]
    with pytest.raises(SystemExit) as e:
        parse(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err  # one line: no usage dump
    assert err.startswith(f"error: unrecognized argument {argv[-2]}; did you mean {meant}?"), err


def test_a_mistyped_flag_as_a_subprocess_is_one_line(tmp_path):
    proc = run_script("train.py", "--use_pretrain", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: unrecognized argument --use_pretrain; did you mean --use_pretrained? (see train.py --help)"
    ]


@pytest.mark.parametrize("script, delay", [("train.py", 0.3), ("train.py", 1.0), ("predict.py", 0.6)])
def test_ctrl_c_in_the_first_second_is_one_line(tmp_path, script, delay):
    """SIGINT to the whole process group while the script is still importing torch."""
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, str(ROOT / script), "--model_fn", str(tmp_path / "m.pth")],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "interrupted" in err and list(tmp_path.iterdir()) == []


CRASH_MID_EPOCH = """
import sys
sys.path.insert(0, {root!r})
import cli, train, trainer
real, calls = trainer.train_step, [0]
def failing_step(*a, **k):
    calls[0] += 1
    if calls[0] == 2:
        raise RuntimeError("CUDA out of memory (simulated)")
    return real(*a, **k)
trainer.train_step = failing_step
cli.run_cli(lambda: train.main(train.parse_args()))
"""


def run_alone(argv, timeout, hung, **kw):
    """A script in a session of its own: (status, stdout, stderr), after checking that no process of its
    group (no loader worker) is left. `hung` is the failure message when it outlives `timeout`."""
    import signal

    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(hung) from None
    with pytest.raises(ProcessLookupError):  # no worker left behind in the process group
        os.killpg(proc.pid, 0)
    return proc.returncode, out, err


def test_an_error_with_loader_workers_alive_ends_the_process(tiny_data, tmp_path):
    """Workers ignore SIGTERM; an exception mid-epoch must still end everything within seconds."""
    script = tmp_path / "crash.py"
    script.write_text(CRASH_MID_EPOCH.format(root=str(ROOT)))
    code, out, err = run_alone(
        [
            sys.executable,
            str(script),
            "--data_dir",
            str(tiny_data),
            "--model_name",
            "resnet18",
            "--input_size",
            "32",
            "--batch_size",
            "8",
            "--num_workers",
            "1",
            "--n_epochs",
            "2",
            "--model_fn",
            str(tmp_path / "m.pth"),
            "--log_dir",
            str(tmp_path / "run"),
            "--verbose",
            "0",
        ],
        90,
        "the process hung after the error",
        cwd=tmp_path,
    )
    assert code == 1, out + err
    assert err.strip().splitlines() == ["error: RuntimeError: CUDA out of memory (simulated)"], err


KEEP_LOADER_ALIVE = """
import sys
sys.path.insert(0, {root!r})
import torch
import cli
kept = []
def main():  # a loader made as data_loader.make_loader makes them, with one worker
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=4, num_workers=1, persistent_workers=True,
                                         worker_init_fn=cli.ignore_stop_signals)
    print(sum(len(b) for b in loader))
    kept.append(loader)  # still referenced when main returns, as predict.py's loader once was
cli.run_cli(main)
"""


def test_a_run_that_ends_normally_with_loader_workers_alive_exits(tmp_path):
    """Persistent loader workers ignore SIGTERM, and the interpreter's exit stops them with SIGTERM and
    waits: predict.py --num_workers 1 hung there after writing its results, once an unrelated import moved
    what was freed when. run_cli ends them on a normal return too."""
    script = tmp_path / "keep.py"
    script.write_text(KEEP_LOADER_ALIVE.format(root=str(ROOT)))
    code, out, err = run_alone([sys.executable, str(script)], 60, "the process hung at exit")
    assert code == 0 and out.strip() == "8", out + err


def test_every_flag_is_in_the_readme():
    """Every flag is in its script's table in docs/flags.md, which the README links."""
    assert "(docs/flags.md)" in (ROOT / "README.md").read_text()
    flags = (ROOT / "docs" / "flags.md").read_text()
    import serve

    for module in (train, predict, export, serve):
        table = flags.split(f"## `{module.__name__}.py`")[1].split("\n## ")[0]
        for action in module.build_parser()._actions:
            if action.option_strings and action.dest != "help":
                assert f"| `{action.option_strings[0]}" in table, action.option_strings[0]


def test_predict_unwritable_output_fails_before_work_and_keeps_old_results(tiny_data, tmp_path, capsys):
    run_in_process_ok = train.main(train.parse_args([str(a) for a in base(tiny_data, tmp_path) + ["--freeze"]]))
    assert run_in_process_ok.state.epoch == 1
    capsys.readouterr()  # the training's own output (its warning about a random frozen backbone)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = run_in_process(
        predict,
        [
            "--model_fn",
            tmp_path / "m.pth",
            "--data_dir",
            tiny_data / "test",
            "--output",
            blocker / "r.csv",
            "--num_workers",
            "0",
        ],
        capsys,
    )
    assert "cannot write --output" in err
    old = tmp_path / "result.csv"
    old.write_text("earlier results\n")
    err = run_in_process(
        predict,
        [
            "--model_fn",
            tmp_path / "m.pth",
            "--data_dir",
            tmp_path / "empty_dir_missing",
            "--output",
            old,
            "--num_workers",
            "0",
        ],
        capsys,
    )
    assert "does not exist" in err and old.read_text() == "earlier results\n"


def test_closed_stdout_stops_quietly_and_keeps_the_results(tiny_data, tmp_path):
    """`predict.py | head -1`-style: the reader goes away; no traceback, non-zero exit, result.csv whole."""
    train.main(train.parse_args([str(a) for a in base(tiny_data, tmp_path) + ["--freeze"]]))
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "predict.py"),
            "--model_fn",
            tmp_path / "m.pth",
            "--data_dir",
            tiny_data / "test",
            "--num_workers",
            "0",
            "--verbose",
            "0",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    proc.stdout.close()  # nobody reads what predict prints
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 1, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    rows = (tmp_path / "result.csv").read_text(encoding="utf-8-sig").splitlines()
    assert len(rows) == 1 + 18 and rows[0].startswith("file_dir,predict,confidence")


def test_every_alias_has_its_dashed_spelling():
    assert train.parse_args(["--model-path", "x.pth"]).model_fn == "x.pth"
    assert predict.parse_args(["--model-path", "y.pth"]).model_fn == "y.pth"


def test_predict_when_every_labelled_image_is_unreadable(tiny_data, tmp_path, capsys):
    """Labelled by their folder, all unreadable; one loose image predicted: no report, no crash."""
    import shutil

    train.main(train.parse_args([str(a) for a in base(tiny_data, tmp_path) + ["--freeze"]]))
    folder = tmp_path / "new"
    (folder / "bag").mkdir(parents=True)
    (folder / "bag" / "broken.png").write_bytes(b"")
    shutil.copy(sorted((tiny_data / "test" / "bag").glob("*.png"))[0], folder / "loose.png")
    capsys.readouterr()
    run_cli(
        lambda: predict.main(
            predict.parse_args(
                [
                    str(a)
                    for a in [
                        "--model_fn",
                        tmp_path / "m.pth",
                        "--data_dir",
                        folder,
                        "--output",
                        tmp_path / "r.csv",
                        "--plot",
                        tmp_path / "p.png",
                        "--num_workers",
                        "0",
                        "--verbose",
                        "0",
                    ]
                ]
            )
        )
    )
    out = capsys.readouterr().out
    assert "predicted 1 image in" in out and "1 unreadable" in out and "accuracy" not in out
    err = run_in_process(
        predict,
        [
            "--model_fn",
            tmp_path / "m.pth",
            "--data_dir",
            folder / "bag" / "broken.png",
            "--output",
            tmp_path / "r.csv",
            "--num_workers",
            "0",
        ],
        capsys,
    )
    assert f"none of the 1 images could be read ({folder / 'bag' / 'broken.png'}: " in err, err  # with the reason
    assert "r.csv was not changed" in err


# ----------------------------------------------------------------------------- outputs never replace inputs


@pytest.fixture(scope="module")
def frozen(tiny_data, tmp_path_factory):
    """A checkpoint of one frozen epoch, for the tests below that need some model."""
    folder = tmp_path_factory.mktemp("frozen")
    train.main(train.parse_args([str(a) for a in base(tiny_data, folder) + ["--freeze"]]))
    return folder / "m.pth"


def test_no_output_replaces_an_input_image(frozen, tmp_path, capsys):
    """--output and --plot (and the report and confusion matrix named after them) of predict.py, --model_fn
    and --log_dir of train.py, --output of export.py: one error line before any work; the images unchanged."""
    capsys.readouterr()
    data = copy_subset(tmp_path / "data", ["bag", "sneaker"], 6, 2)
    photo = sorted((data / "test" / "bag").iterdir())[0]
    (data / "test" / "bag" / "p_confusion.png").write_bytes(photo.read_bytes())  # an image with that name
    (tmp_path / "r_report.csv").write_text(
        "file,label\n" + "".join(f"{f},{f.parent.name}\n" for f in sorted((data / "test").rglob("*.png")))
    )  # a CSV of labels
    before = {f: f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()}
    predict_argv = ["--model_fn", frozen, "--data_dir", data / "test", "--num_workers", "0"]
    cases = [
        (predict, predict_argv + ["--output", photo, "--plot", tmp_path / "p.png"], f"--output {str(photo)!r}"),
        (predict, predict_argv + ["--output", tmp_path / "r.csv", "--plot", photo], f"--plot {str(photo)!r}"),
        (
            predict,
            [
                "--model_fn",
                frozen,
                "--labels_csv",
                tmp_path / "r_report.csv",
                "--output",
                tmp_path / "q.csv",
                "--plot",
                data / "test" / "bag" / "p.png",
                "--num_workers",
                "0",
            ],
            "--plot's confusion matrix",
        ),
        (
            predict,
            [
                "--model_fn",
                frozen,
                "--labels_csv",
                tmp_path / "r_report.csv",
                "--output",
                tmp_path / "r.csv",
                "--plot",
                tmp_path / "p.png",
                "--num_workers",
                "0",
            ],
            "--output's report",
        ),
        (train, base(data, tmp_path) + ["--model_fn", photo], f"--model_fn {str(photo)!r}"),
        (train, base(data, tmp_path) + ["--log_dir", photo.parent], "holds input images"),
        (
            export,
            ["--model_fn", frozen, "--data_dir", data / "test", "--format", "onnx", "--output", photo],
            f"--output {str(photo)!r}",
        ),
    ]
    for module, argv, message in cases:
        err = run_in_process(module, argv, capsys)
        assert message in err and (
            "is one of the input files" in err
            or "holds input images" in err
            or "which this run reads; writing it would replace it" in err
        ), err
    assert {f: f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()} == before  # nothing written or replaced


def test_a_relative_data_dir_is_stored_absolute_so_export_checks_real_images_from_anywhere(
    tiny_data, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tiny_data.parent)
    train.main(
        train.parse_args(
            [
                str(a)
                for a in [
                    "--data_dir",
                    tiny_data.name,
                    "--model_fn",
                    tmp_path / "m.pth",
                    "--log_dir",
                    tmp_path / "run",
                    "--num_workers",
                    "0",
                    "--input_size",
                    "32",
                    "--n_epochs",
                    "1",
                    "--verbose",
                    "0",
                    "--freeze",
                ]
            ]
        )
    )
    assert torch.load(tmp_path / "m.pth", weights_only=True)["args"]["data_dir"] == str(tiny_data)
    assert f"(tensorboard --logdir {tmp_path / 'run'})" in capsys.readouterr().out  # --log_dir's own folder
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    export.main(export.parse_args(["--model_fn", str(tmp_path / "m.pth")]))
    captured = capsys.readouterr()
    assert f"check on 16 images of {tiny_data / 'test'}" in captured.out and "random tensors" not in captured.err


def test_a_torch_and_torchvision_that_do_not_match_is_one_line(tmp_path):
    """pip upgraded torch but not torchvision: torchvision's import fails deep inside with 'operator
    torchvision::nms does not exist'. Every script says so in one line and how to mend it, status 1."""
    fake = tmp_path / "site" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    for script in ("train.py", "predict.py", "export.py"):
        proc = run_script(script, "--help", env={"PYTHONPATH": str(tmp_path / "site")})
        line = assert_clean_error(
            proc,
            "torchvision does not load (RuntimeError: operator torchvision::nms does not exist)",
            "must be a matching pair: reinstall both from requirements.txt",
        )
        assert proc.returncode == 1 and proc.stderr.strip() == line, proc.stderr


def test_a_failed_check_data_leaves_no_empty_run_folder(tiny_data, tmp_path, capsys):
    notes = tmp_path / "notes.pth"
    notes.write_text("not weights")
    err = run_in_process(
        train,
        [
            "--check_data",
            "--data_dir",
            tiny_data,
            "--weights",
            notes,
            "--model_name",
            "resnet18",
            "--log_dir",
            tmp_path / "runs" / "labels",
        ],
        capsys,
    )
    assert "is not a PyTorch checkpoint" in err and not (tmp_path / "runs").exists()


def test_a_stop_with_no_signal_recorded_exits_130():
    """A stop found by a lower layer (no signal of this process's own): the status Ctrl-C gives."""
    import signal

    from cli import StopFlag

    assert StopFlag().exit_status() == 130
    flag = StopFlag()
    flag._handler(signal.SIGTERM, None)
    assert flag.requested and flag.exit_status() == 143
