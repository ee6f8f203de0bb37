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
from conftest import ROOT, assert_clean_error, run_script
from cli import run_cli


def run_in_process(module, argv, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: module.main(module.parse_args([str(a) for a in argv])))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def base(tiny_data, tmp_path):
    return ["--data_dir", tiny_data, "--model_fn", tmp_path / "m.pth", "--log_dir", tmp_path / "run",
            "--num_workers", "0", "--input_size", "32", "--n_epochs", "1", "--verbose", "0"]


@pytest.mark.parametrize("extra, message", [
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
])
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


@pytest.mark.parametrize("layout, message", [
    ({}, "no class subfolders"),
    ({"train/a": 0, "train/b": 2}, "has no images"),
    ({"train/a": 3}, "only one class"),
])
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
    assert "not a" in run_in_process(predict, ["--model_fn", text], capsys)
    bare = tmp_path / "bare.pth"
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), bare)
    assert "bare state_dict" in run_in_process(predict, ["--model_fn", bare], capsys)


def test_predict_errors_as_a_subprocess_have_no_traceback(tmp_path):
    proc = run_script("predict.py", "--model_fn", tmp_path / "missing.pth", cwd=tmp_path)
    assert_clean_error(proc, "does not exist")
    assert not (tmp_path / "result.csv").exists()


def test_help_runs_for_both_scripts(capsys):
    for module in (train, predict):
        with pytest.raises(SystemExit) as e:
            module.parse_args(["--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and "--model_fn" in out and "--gpu_id" in out


def test_every_flag_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    for module in (train, predict, export):
        for action in module.build_parser()._actions:
            if action.option_strings and action.dest != "help":
                assert f"`{action.option_strings[0]}" in readme, action.option_strings[0]


def test_predict_unwritable_output_fails_before_work_and_keeps_old_results(tiny_data, tmp_path, capsys):
    run_in_process_ok = train.main(train.parse_args([str(a) for a in base(tiny_data, tmp_path) + ["--freeze"]]))
    assert run_in_process_ok.state.epoch == 1
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = run_in_process(predict, ["--model_fn", tmp_path / "m.pth", "--data_dir", tiny_data / "test",
                                   "--output", blocker / "r.csv", "--num_workers", "0"], capsys)
    assert "cannot write --output" in err
    old = tmp_path / "result.csv"
    old.write_text("earlier results\n")
    err = run_in_process(predict, ["--model_fn", tmp_path / "m.pth", "--data_dir", tmp_path / "empty_dir_missing",
                                   "--output", old, "--num_workers", "0"], capsys)
    assert "does not exist" in err and old.read_text() == "earlier results\n"


def test_closed_stdout_stops_quietly_and_keeps_the_results(tiny_data, tmp_path):
    """`predict.py | head -1`-style: the reader goes away; no traceback, non-zero exit, result.csv whole."""
    train.main(train.parse_args([str(a) for a in base(tiny_data, tmp_path) + ["--freeze"]]))
    proc = subprocess.Popen([sys.executable, str(ROOT / "predict.py"), "--model_fn", tmp_path / "m.pth", "--data_dir",
                             tiny_data / "test", "--num_workers", "0", "--verbose", "0"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "MPLBACKEND": "Agg"})
    proc.stdout.close()  # nobody reads what predict prints
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 1, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    rows = (tmp_path / "result.csv").read_text(encoding="utf-8-sig").splitlines()
    assert len(rows) == 1 + 18 and rows[0].startswith("file_dir,predict,confidence")
