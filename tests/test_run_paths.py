"""run_paths.py: one place knows what a run reads and writes; no output replaces an input or another output, and
the scripts refuse before any work, with one line, leaving every file as it was."""

import shutil

import pytest
import torch

import export
import predict
import run_paths
import train
from cli import CLIError
from conftest import copy_subset, run_in_process
from helpers import run_predict
from run_paths import RunPaths


def test_input_names_in_a_folder_however_their_paths_are_written(tmp_path):
    """The names an output in a folder must not take: '..' and linked folders resolved; a linked image counts in
    the folder of its link (writing there replaces the link), not in its target's."""
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "real.png").write_bytes(b"")
    (tmp_path / "imgs" / "link.png").symlink_to(tmp_path / "elsewhere" / "real.png")
    (tmp_path / "alias").symlink_to(tmp_path / "imgs")
    inputs = [
        tmp_path / "imgs" / "sub" / ".." / "a.png",
        tmp_path / "alias" / "b.png",
        tmp_path / "imgs" / "link.png",
        tmp_path / "imgs" / "sub" / "c.png",
    ]
    assert run_paths.input_names_in(tmp_path / "imgs", inputs) == {"a.png", "b.png", "link.png"}
    assert run_paths.input_names_in(tmp_path / "elsewhere", inputs) == set()
    with pytest.raises(CLIError, match="is one of the input files"):
        run_paths.check_writable(tmp_path / "alias" / "a.png", "--plot", inputs)
    run_paths.check_writable(tmp_path / "imgs" / "d.png", "--plot", inputs)  # another name in that folder is fine


def test_an_output_may_not_be_a_file_the_run_reads_however_it_is_reached(tmp_path):
    """The checkpoint through '..', through a linked folder, through a symbolic or a hard link: each is the
    checkpoint. Its own name elsewhere is not."""
    (tmp_path / "models" / "sub").mkdir(parents=True)
    ckpt = tmp_path / "models" / "m.pth"
    ckpt.write_bytes(b"weights")
    (tmp_path / "alias").symlink_to(tmp_path / "models")
    (tmp_path / "latest.pth").symlink_to(ckpt)
    (tmp_path / "hard.pth").hardlink_to(ckpt)
    for output in (
        ckpt,
        tmp_path / "models" / "sub" / ".." / "m.pth",
        tmp_path / "alias" / "m.pth",
        tmp_path / "latest.pth",
        tmp_path / "hard.pth",
    ):
        with pytest.raises(CLIError, match=r"is the checkpoint --model_fn, which this run reads; writing it would"):
            RunPaths().reads(ckpt, "the checkpoint --model_fn").writes(output, "--output").check()
    RunPaths().reads(ckpt, "the checkpoint --model_fn").writes(tmp_path / "m.pth", "--output").check()
    assert ckpt.read_bytes() == b"weights"


def test_two_outputs_may_not_share_a_file(tmp_path):
    with pytest.raises(CLIError, match=r"--plot '.*r\.csv' is also --output: give each output its own name"):
        RunPaths().writes(tmp_path / "r.csv", "--output").writes(tmp_path / "x" / ".." / "r.csv", "--plot").check()


def test_a_read_file_may_be_replaced_by_the_output_named_for_it(tmp_path):
    """train.py --resume m_last.pth writes m_last.pth again as it goes (the same run); any other output is refused."""
    last = tmp_path / "m_last.pth"
    last.write_bytes(b"x")
    paths = lambda: RunPaths().reads(last, "the checkpoint --resume continues", replaced_by="--model_fn's _last.pth")
    paths().writes(last, "--model_fn's _last.pth").check()
    with pytest.raises(CLIError, match="is the checkpoint --resume continues"):
        paths().writes(last, "--model_fn").check()


def test_an_output_replaces_only_a_file_of_its_kind(tmp_path):
    """A checkpoint, an ONNX model, a CSV, an .npy array may be written again over one of their kind, or over an
    empty file; over anything else, one line and nothing written."""
    import zipfile

    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    files = {"text": tmp_path / "notes.md", "zip": tmp_path / "old.pth", "npy": tmp_path / "old.npy"}
    files["text"].write_text("# notes, with a line of text é\n")
    torch.save({"state_dict": {}}, files["zip"])
    files["legacy"] = tmp_path / "legacy.pth"  # torch's format before 1.6
    torch.save({"state_dict": {}}, files["legacy"], _use_new_zipfile_serialization=False)
    files["pt2"] = tmp_path / "old.pt2"  # torch.export.save's archive
    with zipfile.ZipFile(files["pt2"], "w") as z:
        z.writestr("old/archive_format", "pt2")
    files["archive"] = tmp_path / "images.zip"  # a user's zip of images: none of these
    with zipfile.ZipFile(files["archive"], "w") as z:
        z.writestr("images/a.png", b"\x89PNG")
    files["cp1252"] = tmp_path / "excel.csv"  # a CSV a spreadsheet saved in its own encoding
    files["cp1252"].write_bytes("file,label\ncafé.png,a\n".encode("cp1252"))
    files["utf16"] = tmp_path / "utf16.csv"
    files["utf16"].write_bytes("file,label\nx.png,a\n".encode("utf-16"))
    np.save(files["npy"], np.zeros(3))
    node = helper.make_node("Relu", ["x"], ["y"])
    value = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in "xy"]
    files["onnx"] = tmp_path / "old.onnx"
    onnx.save(helper.make_model(helper.make_graph([node], "g", value[:1], value[1:])), files["onnx"])
    files["empty"] = tmp_path / "empty"
    files["empty"].touch()
    accepted = {
        "checkpoint": {"zip", "legacy", "empty"},
        "pt2": {"pt2", "empty"},
        "onnx": {"onnx", "empty"},
        "csv": {"text", "cp1252", "utf16", "empty"},
        "npy": {"npy", "empty"},
    }
    before = {f: f.read_bytes() for f in files.values()}
    for kind, ok in accepted.items():
        for name, path in files.items():
            paths = RunPaths().writes(path, "--out", replaces=kind)
            if name in ok:
                paths.check()
            else:
                with pytest.raises(CLIError, match=f"exists and is not {run_paths.KINDS[kind][0]}"):
                    paths.check()
    assert {f: f.read_bytes() for f in files.values()} == before
    RunPaths().writes(tmp_path / "new.pth", "--out", replaces="checkpoint").check()  # a new name: nothing to lose


def test_figures_need_a_format_and_stay_out_of_searched_folders(tmp_path):
    (tmp_path / "images" / "cat").mkdir(parents=True)
    with pytest.raises(CLIError, match=r"--plot '.*model\.pth': a figure cannot be saved as \.pth; name it \.png"):
        RunPaths().writes(tmp_path / "model.pth", "--plot", figure=True).check()
    for figure in ("p.png", "p.PDF", "p.svg", "p.jpg", "plot"):  # no extension: a PNG, as utils.atomic_savefig
        RunPaths().writes(tmp_path / figure, "--plot", figure=True).check()
    with pytest.raises(CLIError, match="is inside .*images', where the images are read from: the figure would be"):
        RunPaths().searches(tmp_path / "images", "the images").writes(
            tmp_path / "images" / "cat" / "p.png", "--plot", figure=True
        ).check()
    RunPaths().searches(tmp_path / "images", "the images").writes(
        tmp_path / "images" / "cat" / "r.csv", "--output"
    ).check()  # a table there is not read as an image


def test_folders_and_writability_are_checked_without_making_anything(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir.csv").mkdir()
    cases = [
        (RunPaths().writes(tmp_path / "file" / "r.csv", "--output"), "is a file, not a folder"),
        (RunPaths().writes(tmp_path / "dir.csv", "--output"), "is a folder, not a file"),
        (RunPaths().writes_folder(tmp_path / "file", "--explain"), "is a file; give a folder"),
        (
            RunPaths().reads_images([tmp_path / "run" / "a.png"]).writes_folder(tmp_path / "run", "--log_dir"),
            "holds input images",
        ),
    ]
    for paths, message in cases:
        with pytest.raises(CLIError, match=message):
            paths.check()
    RunPaths().writes(tmp_path / "new" / "deeper" / "r.csv", "--output").writes_folder(tmp_path / "cams", "x").check()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.csv", "file"]  # no folder made by the check


# ----------------------------------------------------------------------------- the scripts


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A frozen one-epoch checkpoint trained from a CSV of labels (so predict.py's default input is that CSV), its
    data, and its ONNX export."""
    root = tmp_path_factory.mktemp("paths")
    data = copy_subset(root / "data", ["bag", "sneaker"], 6, 2)
    labels = root / "labels.csv"
    labels.write_text(
        "file,label,split\n"
        + "".join(f"{p.relative_to(root)},{p.parent.name},{p.parts[-3]}\n" for p in sorted(data.rglob("*.png")))
    )
    train.main(
        train.parse_args(
            [
                str(a)
                for a in [
                    "--labels_csv",
                    labels,
                    "--model_fn",
                    root / "m.pth",
                    "--log_dir",
                    root / "run",
                    "--num_workers",
                    "0",
                    "--input_size",
                    "32",
                    "--n_epochs",
                    "1",
                    "--verbose",
                    "0",
                    "--freeze",
                    "--model_name",
                    "resnet18",
                ]
            ]
        )
    )
    export.main(export.parse_args(["--model_fn", str(root / "m.pth"), "--verbose", "0"]))
    return root, data, labels


def snapshot(*folders):
    return {f: f.read_bytes() for folder in folders for f in sorted(folder.rglob("*")) if f.is_file()}


def test_no_script_replaces_what_it_reads(trained, tmp_path, capsys):
    """The issue's cases, each once refused before any work with one line, every file as it was: predict.py's
    --output naming the checkpoint (.pth and .onnx), --file_list's list, or the CSV of labels the checkpoint reads
    by default; --plot in the folder predicted, or with a name no figure can take; train.py's --model_fn naming
    --weights or --resume's file; export.py's --output naming the CSV of labels."""
    root, data, labels = trained
    listed = tmp_path / "list.txt"
    listed.write_text("".join(f"{p}\n" for p in sorted(data.rglob("*.png"))[:3]))
    weights = tmp_path / "w.pth"
    torch.save({}, weights)
    notes = tmp_path / "README.md"
    notes.write_text("# my project\n")
    capsys.readouterr()
    before = snapshot(root, tmp_path)
    out = ["--plot", tmp_path / "p.png", "--num_workers", "0"]
    train_argv = [
        "--data_dir",
        data,
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
        "--model_name",
        "resnet18",
    ]
    cases = [
        (predict, ["--model_fn", root / "m.pth", "--output", root / "m.pth"] + out, "the model --model_fn"),
        (predict, ["--model_fn", root / "m.onnx", "--output", root / "m.onnx"] + out, "the model --model_fn"),
        (
            predict,
            ["--model_fn", root / "m.pth", "--file_list", listed, "--output", listed] + out,
            "the list of images --file_list",
        ),
        (predict, ["--model_fn", root / "m.pth", "--output", labels] + out, "the CSV of labels the model was trained"),
        (
            predict,
            ["--model_fn", root / "m.onnx", "--output", tmp_path / "r.csv", "--plot", labels],
            "the CSV of labels the model was trained",
        ),
        (
            predict,
            [
                "--model_fn",
                root / "m.pth",
                "--data_dir",
                data / "test",
                "--output",
                tmp_path / "r.csv",
                "--plot",
                data / "test" / "p.png",
            ],
            "where the images are read from: the figure would be read as input",
        ),
        (
            predict,
            ["--model_fn", root / "m.pth", "--output", tmp_path / "r.csv", "--plot", tmp_path / "model.pth"],
            "a figure cannot be saved as .pth",
        ),
        (
            predict,
            ["--model_fn", root / "m.pth", "--output", tmp_path / "r.csv", "--plot", tmp_path / "r.csv"],
            "is also --output",
        ),
        (train, train_argv + ["--weights", weights, "--model_fn", weights], "the weights file --weights"),
        (
            train,
            ["--resume", root / "m_last.pth", "--model_fn", root / "m_last.pth", "--num_workers", "0"],
            "the checkpoint --resume continues",
        ),
        (export, ["--model_fn", root / "m.pth", "--output", labels, "--format", "onnx"], "the CSV of labels"),
        # an output over a file of another kind, which the run does not read (a new user's README.md)
        (train, train_argv + ["--model_fn", notes], f"--model_fn '{notes}' exists and is not a checkpoint"),
        (export, ["--model_fn", root / "m.pth", "--output", notes, "--format", "onnx"], "is not an ONNX model"),
        (predict, ["--model_fn", root / "m.onnx", "--output", root / "m.pth"] + out, "is not a CSV file"),
    ]
    for module, argv, message in cases:
        err = run_in_process(module, argv, capsys)
        assert message in err and (
            "which this run reads; writing it would replace it" in err
            or "figure" in err
            or "own name" in err
            or "writing it would replace it; choose another name (or remove that file first)" in err
        ), (argv, err)
    assert snapshot(root, tmp_path) == before  # nothing written or replaced
    assert not (tmp_path / "run").exists() and not (tmp_path / "p.png").exists()


def test_the_checks_let_a_normal_run_through(trained, tmp_path, capsys):
    """The same model, its default inputs (the CSV's test rows) and outputs beside them: predicted as usual."""
    root, _, _ = trained
    out = run_predict(
        capsys, "--model_fn", root / "m.onnx", "--output", tmp_path / "r.csv", "--plot", tmp_path / "figs" / "p.pdf"
    )
    assert "predicted 4 images" in out and (tmp_path / "figs" / "p.pdf").read_bytes().startswith(b"%PDF")


def test_train_run_folder_stays_out_of_the_image_folders(trained, tmp_path, capsys):
    """A bare class-folder root is searched whole: a run folder inside it would be a class folder next time."""
    _, data, _ = trained
    bare = tmp_path / "bare"
    shutil.copytree(data / "train", bare)
    argv = [
        "--data_dir",
        bare,
        "--model_fn",
        tmp_path / "m.pth",
        "--log_dir",
        bare / "runs" / "x",
        "--num_workers",
        "0",
        "--input_size",
        "32",
        "--n_epochs",
        "1",
        "--verbose",
        "0",
        "--model_name",
        "resnet18",
    ]
    err = run_in_process(train, argv, capsys)
    assert f"--log_dir {str(bare / 'runs' / 'x')!r} is inside {str(bare)!r}, where the images are read from" in err
    assert not (bare / "runs").exists() and not (tmp_path / "m.pth").exists()
