"""Labels from a table instead of class folders: train.py --labels_csv FILE [--image_root DIR].

The CSV has a header row and the columns `file` (relative to --image_root, default the CSV's own folder;
absolute paths are taken as they are) and `label`, and optionally `split` (train, valid or test; without it
the seeded, stratified split of train.py's --valid_ratio, as for folders). Other columns are ignored.
The samples are ordered by class, then path, as a folder scan orders them, so the same images and seed give
the same split whichever way the rows are sorted, and the same as the class-folder layout of those images."""

import csv
import os
from pathlib import Path

from cli import CLIError
from tasks import SingleLabel, looks_multi

SPLITS = ("train", "valid", "test")
SAVE_AS = "save it as CSV UTF-8 (comma-separated)"  # the hint for a file in another encoding or separator


def read_rows(path):
    """[(line number, {column: value})] of a CSV with `file` and `label` columns (the header's names matched
    without case or surrounding spaces); one error line otherwise, with a hint for a file in another encoding
    (Latin-1, UTF-16) or separated by semicolons or tabs."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(
            f"--labels_csv {str(path)!r} " + ("is a folder, not a CSV file" if path.is_dir() else "does not exist")
        )
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [c.strip() for c in (reader.fieldnames or [])]
            columns = [c.lower() for c in header]  # File, Label and Split as well
            if not columns:
                raise CLIError(
                    f"--labels_csv {str(path)!r} is empty; it needs a header row with the columns file and label"
                )
            missing = [c for c in ("file", "label") if c not in columns]
            if missing:
                other = next((s for s in (";", "\t") if any(s in c for c in header)), None)
                hint = (
                    f"; it looks like UTF-16 text: {SAVE_AS}"
                    if any("\x00" in c for c in header)
                    else f"; it looks separated by {other!r}: {SAVE_AS}"
                    if other
                    else ""
                )
                raise CLIError(
                    f"--labels_csv {str(path)!r} has no column {' or '.join(missing)} (its header: "
                    f"{', '.join(header[:8])}){hint}"
                )
            reader.fieldnames = columns
            rows = [(reader.line_num, row) for row in reader]  # the file's line (blank lines are skipped)
    except UnicodeDecodeError:
        raise CLIError(f"--labels_csv {str(path)!r} is not a UTF-8 text file (Latin-1 or UTF-16?): {SAVE_AS}") from None
    except csv.Error as e:
        hint = f" (UTF-16?): {SAVE_AS}" if "NUL" in str(e) else ""
        raise CLIError(f"--labels_csv {str(path)!r}: {e}{hint}") from None
    if not rows:
        raise CLIError(f"--labels_csv {str(path)!r} has a header but no rows")
    return rows


def read_labels(path, image_root=None, warn=print, task=None):
    """{split or None: [(image path, label)]} from the CSV, each label cell read by the task (tasks.py): a class
    name, or (multi-label) the tuple of the class names the cell lists, where an empty cell is an image of none
    of the classes. Rows naming missing files are reported (the first few by name) and left out. One error
    line, naming the row, for an empty file or label, an unknown split, or a file listed twice."""
    task = task or SingleLabel()
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    if image_root and not root.is_dir():
        raise CLIError(f"--image_root {str(root)!r} does not exist or is not a folder")
    rows = read_rows(path)
    with_split = "split" in rows[0][1]
    to_label = "why" in rows[0][1]  # predict.py --rank_for_labelling's list: a row without a label is not labelled yet
    seen, out, missing, outside, unlabelled = {}, {}, [], [], []
    for line, row in rows:
        name, label = (row.get("file") or "").strip(), (row.get("label") or "").strip()
        if to_label and name and not label:
            unlabelled.append(f"line {line}: {name}")
            continue
        if not name or not (label or task.empty_label_allowed):
            raise CLIError(f"--labels_csv {path} line {line}: empty {'file' if not name else 'label'}")
        label = task.parse(label)
        split = (row.get("split") or "").strip().lower() if with_split else None
        if with_split and split not in SPLITS:
            raise CLIError(
                f"--labels_csv {path} line {line}: split {row.get('split')!r} is not one of {', '.join(SPLITS)}"
            )
        file = os.path.join(root, name)
        key = os.path.normcase(os.path.abspath(file))  # ./a.png and a.png are one file
        if key in seen:
            raise CLIError(f"--labels_csv {path} line {line}: {name!r} is listed again (first on line {seen[key]})")
        seen[key] = line
        if not os.path.isabs(name) and os.path.relpath(file, root).split(os.sep)[0] == os.pardir:
            outside.append(f"line {line}: {name}")  # ../ out of the root: used, but likely a slip
        if not os.path.isfile(file):
            missing.append(f"line {line}: {file}")
            continue
        out.setdefault(split, []).append((file, label))
    if missing:
        warn(
            f"--labels_csv: {len(missing)} of {len(rows)} rows name files that do not exist, left out: "
            + "; ".join(missing[:3])
            + (" ..." if len(missing) > 3 else "")
        )
    if outside:
        where = f"--image_root {str(root)!r}" if image_root else f"the CSV's folder {str(root)!r}"
        warn(
            f"warning: --labels_csv: {len(outside)} of {len(rows)} rows name files outside {where} (../ in the "
            "path; they are used): " + "; ".join(outside[:3]) + (" ..." if len(outside) > 3 else "")
        )
    if unlabelled:
        warn(
            f"warning: --labels_csv: {len(unlabelled)} of {len(rows)} rows of the list to label have no label yet, "
            "left out: " + "; ".join(unlabelled[:3]) + (" ..." if len(unlabelled) > 3 else "")
        )
    if len(unlabelled) == len(rows):
        raise CLIError(f"--labels_csv {path}: none of its {len(rows)} rows has a label yet (fill in the label column)")
    if not out:
        raise CLIError(
            f"--labels_csv {path}: none of its {len(rows)} files exist under {str(root)!r} (see --image_root)"
        )
    return out


def test_rows(parts):
    """The rows predict.py and export.py take from read_labels' parts: the test rows of a CSV with a split
    column (None when it has none), else every row."""
    return parts.get("test") if None not in parts else parts[None]


def class_names_of(pairs, task=None):
    """The sorted class names the labels of [(path, label)] use (multi-label: every name of every tuple)."""
    task = task or SingleLabel()
    return sorted({n for _, label in pairs for n in task.names(label)})


def indexed(pairs, class_names, path, split, task=None):
    """The task's samples (tasks.py encode): [(image path, class index)] ordered by class, then path (as a folder
    scan); multi-label: [(image path, multi-hot tuple)] ordered the same way."""
    task = task or SingleLabel()
    unknown = [n for n in class_names_of(pairs, task) if n not in set(class_names)]
    if unknown:
        rows = f"the {split} rows have" if split else "its rows have"
        hint = task.unknown_hint if looks_multi(unknown, class_names) else ""
        raise CLIError(
            f"--labels_csv {path}: {rows} labels that are not among the classes "
            f"({', '.join(class_names[:5])}{', ...' if len(class_names) > 5 else ''}): {', '.join(unknown[:5])}" + hint
        )
    return task.encode(pairs, class_names)


def read_file_list(path, image_root=None):
    """The image paths of predict.py --file_list, in the list's order: one path per line (blank lines skipped), or
    a CSV whose header has a `file` column and no `label` column (a labelled CSV is --labels_csv's). Relative
    paths are taken from --image_root, default the list's own folder. Missing files are kept: predict.py writes
    them as unreadable rows. One error line for a list that cannot be read or names no file."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(
            f"--file_list {str(path)!r} " + ("is a folder, not a file" if path.is_dir() else "does not exist")
        )
    root = Path(image_root) if image_root else path.parent
    if image_root and not root.is_dir():
        raise CLIError(f"--image_root {str(root)!r} does not exist or is not a folder")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            first = next((line for line in f if line.strip()), "")
            header = [c.strip().lower() for c in next(csv.reader([first]), [])]
            if "file" in header:
                if "label" in header:
                    raise CLIError(
                        f"--file_list {str(path)!r} has a label column: give it as --labels_csv to get the "
                        "report as well"
                    )
                column = header.index("file")
                names = [row[column].strip() if len(row) > column else "" for row in csv.reader(f)]
            else:
                f.seek(0)
                names = [line.strip() for line in f]
    except UnicodeDecodeError:
        raise CLIError(f"--file_list {str(path)!r} is not a UTF-8 text file (Latin-1 or UTF-16?)") from None
    except csv.Error as e:
        raise CLIError(f"--file_list {str(path)!r}: {e}") from None
    files = [os.path.join(root, name) for name in names if name]
    if not files:
        raise CLIError(f"--file_list {str(path)!r} names no image file")
    return files
