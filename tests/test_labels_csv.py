"""Labels from a CSV (labels_csv.py, train.py/predict.py --labels_csv): parsing errors in one line naming the
row, the split column, missing files skipped, and the same run as the class-folder layout."""

import os
import random

import pytest

import export
import model_loader
import predict
import train
from conftest import copy_subset, run_in_process
from helpers import read_csv, write_csv


def folder_rows(data, splits=("train",), with_split=False):
    """(file relative to data, label[, split]) of a class-folder data set."""
    rows = []
    for split in splits:
        for f in sorted((data / split).rglob("*.png")):
            rows.append((str(f.relative_to(data)), f.parent.name) + ((split,) if with_split else ()))
    return rows


def train_args(tmp_path, *flags):
    return [
        str(a)
        for a in (
            "--model_name",
            "resnet18",
            "--input_size",
            "32",
            "--n_epochs",
            "1",
            "--num_workers",
            "0",
            "--verbose",
            "0",
            "--model_fn",
            tmp_path / "m.pth",
            "--log_dir",
            tmp_path / "run",
            *flags,
        )
    ]


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ("file,label\n", "has a header but no rows"),
        ("path,class\na.png,bag\n", "has no column file or label"),
        ("file,label\ntrain/bag/X,bag\n\ntrain/bag/X,bag\n", "line 4: 'train/bag/X' is listed again (first on line 2)"),
        ("file,label,split\ntrain/bag/X,bag,training\n", "line 2: split 'training' is not one of train, valid, test"),
        ("file,label\ntrain/bag/X,\n", "line 2: empty label"),
        (
            "file,label\ntrain/bag/X,bag\n./train/bag/X,bag\n",
            "line 3: './train/bag/X' is listed again (first on line 2)",
        ),
    ],
)
def test_a_bad_csv_is_one_error_line_naming_the_row(tiny_data, tmp_path, capsys, content, message):
    first = sorted((tiny_data / "train" / "bag").iterdir())[0].name
    labels = tmp_path / "labels.csv"
    labels.write_text(content.replace("X", first))
    err = run_in_process(train, train_args(tmp_path, "--labels_csv", labels, "--image_root", tiny_data), capsys)
    assert message.replace("X", first) in err and not (tmp_path / "m.pth").exists()


def test_the_split_column_is_kept_and_missing_files_are_reported(tiny_data, tmp_path, capsys):
    rows = folder_rows(tiny_data, ("train", "test"), with_split=True)
    valid = {r[0] for r in rows[::5] if r[2] == "train"}
    rows = [(f, label, "valid" if f in valid else split) for f, label, split in rows]
    rows.append(("train/bag/gone.png", "bag", "train"))
    labels = write_csv(tmp_path / "labels.csv", rows, ("file", "label", "split"))
    result = train.main(train.parse_args(train_args(tmp_path, "--labels_csv", labels, "--image_root", tiny_data)))
    out = capsys.readouterr().out
    assert "1 of 67 rows name files that do not exist" in out and "gone.png" in out
    listed = {r["path"] for r in read_csv(tmp_path / "run" / "valid_files.csv")}
    assert listed == {str(tiny_data / f) for f in valid}
    assert result.test_metrics["count"] == 18


def test_a_csv_of_the_folders_trains_the_same_model_whatever_the_row_order(tiny_data, tmp_path, capsys):
    rows = folder_rows(tiny_data, ("train", "test"), with_split=True)
    random.Random(0).shuffle(rows)
    labels = write_csv(
        tmp_path / "labels.csv",
        [(str(tiny_data / f), label, split) for f, label, split in rows],
        ("file", "label", "split"),
    )  # absolute paths: taken as they are
    by_csv = train.main(train.parse_args(train_args(tmp_path / "csv", "--labels_csv", labels)))
    by_folder = train.main(train.parse_args(train_args(tmp_path / "folder", "--data_dir", tiny_data)))
    assert by_csv.test_metrics == pytest.approx(by_folder.test_metrics)
    for name in ("train", "valid"):
        assert read_csv(tmp_path / "csv" / "run" / f"{name}_files.csv") == read_csv(
            tmp_path / "folder" / "run" / f"{name}_files.csv"
        )
    capsys.readouterr()
    out = tmp_path / "r.csv"  # predict.py on the CSV's test rows, with their labels
    predict.main(
        predict.parse_args(
            [
                "--model_fn",
                str(tmp_path / "csv" / "m.pth"),
                "--output",
                str(out),
                "--n_images",
                "0",
                "--num_workers",
                "0",
                "--verbose",
                "0",
            ]
        )
    )
    predicted = read_csv(out)
    assert len(predicted) == 18 and all(r["label"] == r["file_dir"].split("/")[-2] for r in predicted)
    assert f"accuracy {by_csv.test_metrics['accuracy']:.4f}" in capsys.readouterr().out


def test_check_data_audits_the_csvs_rows(tiny_data, tmp_path, capsys):
    import shutil

    rows = folder_rows(tiny_data, ("train",), with_split=True)
    leak = tmp_path / "copy.png"
    shutil.copy(tiny_data / rows[0][0], leak)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    rows = [(str(tiny_data / f), label, split) for f, label, split in rows]
    rows += [(str(leak), rows[0][1], "test"), (str(broken), "bag", "train")]
    labels = write_csv(tmp_path / "labels.csv", rows, ("file", "label", "split"))
    with pytest.raises(SystemExit) as e:
        train.main(train.parse_args(train_args(tmp_path, "--labels_csv", labels, "--check_data")))
    out = capsys.readouterr().out
    assert e.value.code == 1
    assert "train: 49 images" in out and "test: 1 images" in out
    assert "unreadable: 1" in out and "broken.png" in out
    assert "identical files in more than one of train/valid/test: 1" in out and str(leak) in out


def test_the_rows_to_predict_are_the_test_rows_or_every_row_without_a_split_column():
    import labels_csv

    rows = [("a.png", "bag")]
    assert labels_csv.test_rows({None: rows}) is rows  # no split column: every row
    assert labels_csv.test_rows({"train": [("b.png", "bag")], "test": rows, "valid": []}) is rows
    assert labels_csv.test_rows({"train": rows, "valid": rows}) is None  # a split column without test rows


def test_predict_without_inputs_needs_the_training_csvs_test_rows(tiny_data, tmp_path, capsys):
    labels = write_csv(tmp_path / "labels.csv", [(str(tiny_data / f), label) for f, label in folder_rows(tiny_data)])
    train.main(train.parse_args(train_args(tmp_path, "--labels_csv", labels)))
    err = run_in_process(predict, ["--model_fn", tmp_path / "m.pth", "--output", tmp_path / "r.csv"], capsys)
    assert "the CSV the model was trained with" in err and "has no test rows" in err
    labels.unlink()
    err = run_in_process(predict, ["--model_fn", tmp_path / "m.pth", "--output", tmp_path / "r.csv"], capsys)
    assert "no --data_dir or --labels_csv given" in err and "does not exist" in err
    assert not (tmp_path / "r.csv").exists()


def test_the_header_is_matched_without_case_or_surrounding_spaces(tiny_data, tmp_path):
    import labels_csv

    rows = folder_rows(tiny_data, ("train", "test"), with_split=True)
    labels = write_csv(
        tmp_path / "labels.csv",
        [(str(tiny_data / f), label, split) for f, label, split in rows],
        (" File", "Label ", "SPLIT"),
    )
    parts = labels_csv.read_labels(labels)
    assert sorted(parts) == ["test", "train"] and len(parts["train"]) == 48 and len(parts["test"]) == 18
    assert sorted(parts["test"]) == sorted((str(tiny_data / f), label) for f, label, s in rows if s == "test")


@pytest.mark.parametrize(
    "content, message",
    [
        (
            "file,label\ncafé.png,bag\n".encode("latin-1"),
            "is not a UTF-8 text file (Latin-1 or UTF-16?): save it as CSV UTF-8 (comma-separated)",
        ),
        (
            "file,label\na.png,bag\n".encode("utf-16"),
            "is not a UTF-8 text file (Latin-1 or UTF-16?): save it as CSV UTF-8 (comma-separated)",
        ),
        (
            "file,label\na.png,bag\n".encode("utf-16-le"),
            "it looks like UTF-16 text: save it as CSV UTF-8 (comma-separated)",
        ),
        (
            b"file;label\na.png;bag\n",
            "has no column file or label (its header: file;label); it looks separated by ';': "
            "save it as CSV UTF-8 (comma-separated)",
        ),
        (b"File\tLabel\na.png\tbag\n", "it looks separated by '\\t': save it as CSV UTF-8 (comma-separated)"),
    ],
)
def test_another_encoding_or_separator_is_one_error_line_with_a_hint(tiny_data, tmp_path, capsys, content, message):
    labels = tmp_path / "labels.csv"
    labels.write_bytes(content)
    err = run_in_process(train, train_args(tmp_path, "--labels_csv", labels, "--image_root", tiny_data), capsys)
    assert message in err and not (tmp_path / "m.pth").exists()


def test_paths_that_leave_the_image_root_are_named_in_a_warning_and_still_used(tmp_path):
    import labels_csv

    data = copy_subset(tmp_path / "data", ["bag", "sneaker"], 3, 1)
    rows = folder_rows(data)  # train/<class>/<file>
    root = data / "test"
    inside, back = sorted(root.rglob("*.png"))  # given as ./<class>/../<class>/<file>, ../test/<class>/<file>
    csv_rows = (
        [("../" + f, label) for f, label in rows[1:]]
        + [(rows[0][0].replace("train/", "../train/./"), rows[0][1])]
        + [
            (f"./{inside.parent.name}/../{inside.parent.name}/{inside.name}", inside.parent.name),
            (f"../test/{back.parent.name}/{back.name}", back.parent.name),
        ]
    )  # out and back in: inside
    warnings = []
    parts = labels_csv.read_labels(write_csv(tmp_path / "labels.csv", csv_rows), root, warn=warnings.append)
    assert len(parts[None]) == len(rows) + 2  # they still work
    assert warnings == [
        f"warning: --labels_csv: {len(rows)} of {len(rows) + 2} rows name files outside "
        f"--image_root {str(root)!r} (../ in the path; they are used): line 2: ../{rows[1][0]}; "
        f"line 3: ../{rows[2][0]}; line 4: ../{rows[3][0]} ..."
    ]
    labels_csv.read_labels(write_csv(root / "labels.csv", csv_rows), warn=warnings.append)  # the CSV's folder
    assert len(warnings) == 2 and warnings[1].startswith(
        f"warning: --labels_csv: {len(rows)} of {len(rows) + 2} rows name files outside the CSV's folder {str(root)!r}"
    )


def test_relative_csv_paths_are_stored_absolute(tiny_data, tmp_path, capsys, monkeypatch):
    """Trained with --labels_csv and --image_root relative to one folder: predict.py and export.py run from
    another still take the CSV's test rows."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    write_csv(
        work / "labels.csv", folder_rows(tiny_data, ("train", "test"), with_split=True), ("file", "label", "split")
    )
    monkeypatch.chdir(work)
    train.main(
        train.parse_args(
            train_args(tmp_path, "--labels_csv", "labels.csv", "--image_root", os.path.relpath(tiny_data, work))
        )
    )
    saved = model_loader.load_checkpoint(tmp_path / "m.pth")["args"]
    assert (saved["labels_csv"], saved["image_root"]) == (str(work / "labels.csv"), str(tiny_data))
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    predict.main(
        predict.parse_args(
            [
                "--model_fn",
                str(tmp_path / "m.pth"),
                "--output",
                "r.csv",
                "--n_images",
                "0",
                "--num_workers",
                "0",
                "--verbose",
                "0",
            ]
        )
    )
    rows = read_csv(elsewhere / "r.csv")
    assert len(rows) == 18 and all(r["label"] == r["file_dir"].split("/")[-2] for r in rows)
    export.main(export.parse_args(["--model_fn", str(tmp_path / "m.pth"), "--output", "m.onnx"]))
    out, err = capsys.readouterr()
    assert f"check on 16 images of {work / 'labels.csv'}" in out and "warning" not in err


def test_file_list_as_lines_or_a_csv_without_labels(tmp_path):
    """--file_list: the paths in the list's order (relative ones from its folder or --image_root), missing files
    kept (predict.py writes them as unreadable rows); a CSV with a file column too; one error line for a CSV
    with labels, an empty list, or a file that is not UTF-8."""
    from cli import CLIError
    from labels_csv import read_file_list

    (tmp_path / "imgs").mkdir()
    lines = tmp_path / "list.txt"
    lines.write_text(f"b.png\n\n  {tmp_path / 'abs.png'}  \r\na.png\n")
    assert read_file_list(lines) == [str(tmp_path / "b.png"), str(tmp_path / "abs.png"), str(tmp_path / "a.png")]
    assert read_file_list(lines, tmp_path / "imgs")[0] == str(tmp_path / "imgs" / "b.png")
    table = write_csv(tmp_path / "list.csv", [("z.png", "x"), ("y, 2.png", "")], header=("File", "note"))
    table.write_bytes(b"\xef\xbb\xbf" + table.read_bytes())  # Excel's UTF-8 CSV starts with a BOM
    assert read_file_list(table) == [str(tmp_path / "z.png"), str(tmp_path / "y, 2.png")]
    for content, message in (
        (b"file,label\na.png,cat\n", "has a label column"),
        (b"\n\n", "names no image file"),
        (b"\xff\xfea\x00", "not a UTF-8 text file"),
    ):
        bad = tmp_path / "bad.txt"
        bad.write_bytes(content)
        with pytest.raises(CLIError, match=message):
            read_file_list(bad)
    with pytest.raises(CLIError, match="does not exist"):
        read_file_list(tmp_path / "none.txt")
