"""Every file a run reads and every file or folder it writes, in one place, checked together before any work
starts (train.py, predict.py, export.py and serve.py build one each):

- no output replaces an input (the checkpoint, an image, a list, a CSV of labels, a weights file) or another
  output: paths are compared with their folders' links and '..' resolved, and by identity where both exist
  (a hard or symbolic link to the checkpoint is the checkpoint);
- every output can be written (a temporary file tried; a missing folder is not made yet), and a file is not a
  folder;
- an output replaces only a file of the kind the run writes there (`train.py --model_fn README.md` would have
  replaced the README with a checkpoint): a checkpoint, an ONNX file, a CSV, an .npy array (KINDS);
- a figure's name has a format matplotlib writes (`--plot model.pth` fails at start-up, not after the run);
- nothing the run writes that is an image (a figure, a folder of overlays or of a run's figures) lands in a
  folder searched for images, where the next run would read it as one.

The first problem found is one error line (cli.CLIError); nothing has been written then.
"""

import os
import tempfile
import zipfile
from pathlib import Path

from cli import CLIError


def located(path):
    """Where writing `path` lands: its folder with links and '..' resolved, and its own name (not resolved:
    writing through utils.atomic_path replaces a link itself, not what it points to)."""
    path = Path(path)
    return path.parent.resolve() / path.name


def input_names_in(folder, inputs):
    """Names of the files of `inputs` (paths) that lie directly in `folder` (the folders' links and '..'
    resolved): what a file written into that folder must not be called."""
    folder, resolved = Path(folder).resolve(), {}  # each input folder resolved once, not each of its files
    names = set()
    for f in inputs:
        parent = os.path.dirname(os.fspath(f)) or "."
        if parent not in resolved:
            resolved[parent] = Path(parent).resolve()
        if resolved[parent] == folder:
            names.add(os.path.basename(os.fspath(f)))
    return names


def same_file(a, b):
    """True when both exist and are the same file (a hard or symbolic link to it included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def zip_names(path):
    """The names in a zip archive, or None when it is not one."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError):
        return None


def is_checkpoint_file(path):
    """A file torch.save wrote: a zip archive holding a data.pkl (torch's format since 1.6), or the legacy pickle
    with torch's magic number first."""
    with open(path, "rb") as f:
        if f.read(4) == b"\x80\x02\x8a\x0a":  # protocol 2, then the 10-byte LONG1 of the magic number
            return True
    return any(n.endswith("/data.pkl") for n in zip_names(path) or ())


def is_pt2_file(path):
    """A file torch.export.save wrote: a zip archive with an archive_format entry."""
    return any(n.split("/")[-1] == "archive_format" for n in zip_names(path) or ())


def is_onnx_file(path):
    """An ONNX model: a protobuf that onnx reads as a model with a graph."""
    import onnx

    try:
        return len(onnx.load(str(path), load_external_data=False).graph.node) > 0
    except Exception:  # noqa: BLE001 - onnx raises DecodeError, ValueError, ... for what is not a model
        return False


def is_text_file(path):
    """A text file (what a CSV is, in any encoding a spreadsheet saves): UTF-16 with its byte order mark, or first
    64 KB with at most 1% control bytes (tab, line ends, form feed and escape aside). A zip,
    an image or a model has NULs or many control bytes in its first bytes."""
    with open(path, "rb") as f:
        head = f.read(65536)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return True
    control = head.translate(None, b"\t\n\x0c\r\x1b").translate(None, bytes(range(32, 256)))
    return len(control) <= 0.01 * len(head)


def is_npy_file(path):
    with open(path, "rb") as f:
        return f.read(6) == b"\x93NUMPY"


KINDS = {  # what an output may replace: (its name in a message, the test of an existing file)
    "checkpoint": ("a checkpoint", is_checkpoint_file),
    "pt2": ("a torch.export file", is_pt2_file),
    "onnx": ("an ONNX model", is_onnx_file),
    "csv": ("a CSV file", is_text_file),
    "npy": ("a NumPy .npy file", is_npy_file),
}


def figure_formats():
    """The file extensions matplotlib can save a figure as (png, pdf, svg, jpg, ...)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return set(FigureCanvasBase.get_supported_filetypes())


def try_writing(path, what):
    """One error line when a file cannot be created at `path`: in an existing folder a temporary file is tried;
    a missing folder is not made (a run that fails later leaves no empty folder behind), its nearest existing
    ancestor must be a folder this process may write into."""
    path = Path(path)
    folder = path.parent
    try:
        if folder.is_dir():
            with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", delete=True):
                pass
            return
        ancestor = folder
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise CLIError(f"cannot write {what} {str(path)!r}: {str(ancestor)!r} is a file, not a folder")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise CLIError(f"cannot write {what} {str(path)!r}: Permission denied (in {str(ancestor)!r})")
    except OSError as e:
        raise CLIError(f"cannot write {what} {str(path)!r}: {e.strerror or e}") from None


def check_writable(path, what="output", inputs=()):
    """Fail before any work starts if `path` cannot be written or is one of `inputs` (image paths), which
    writing it would replace. A run with several outputs uses RunPaths instead."""
    RunPaths().reads_images(inputs).writes(path, what).check()


class RunPaths:
    """What one run reads and writes. reads*/searches/writes* record; check() refuses the first conflict."""

    def __init__(self):
        self.files = []  # (path, what it is, the write allowed to replace it or None): checkpoints, lists, CSVs
        self.images = []  # lists of image paths (predict.py may read millions: kept as given, scanned once)
        self.searched = []  # (folder, what): folders searched for images
        self.outputs = []  # (path, what, kind): kind "file", "figure" or "folder" (images=True: "image folder")
        self.replaces = {}  # output path -> the KINDS key of the only files it may replace

    def reads(self, path, what, replaced_by=None):
        """A file the run reads (None: nothing). `replaced_by`: the `what` of the one output that may replace
        it (train.py --resume: the run's own _last.pth, written again as it goes)."""
        if path:
            self.files.append((Path(path), what, replaced_by))
        return self

    def reads_images(self, files):
        self.images.append(files)
        return self

    def searches(self, folder, what):
        """A folder the run (or the next one) searches for images."""
        if folder:
            self.searched.append((Path(folder), what))
        return self

    def writes(self, path, what, figure=False, replaces=None):
        """A file the run writes; figure=True: a matplotlib figure (an image, in a format from its extension);
        replaces: the KINDS key of what an existing file there must be (else it is not replaced)."""
        if path:
            self.outputs.append((Path(path), what, "figure" if figure else "file"))
            if replaces:
                self.replaces[Path(path)] = replaces
        return self

    def writes_folder(self, folder, what, images=True):
        """A folder the run writes files into (images=True: figures or overlays among them)."""
        if folder:
            self.outputs.append((Path(folder), what, "image folder" if images else "folder"))
        return self

    # -- the check

    def check(self):
        """One error line (CLIError) for the first problem: every conflict is looked for first, then whether each
        output can be written. Nothing is written."""
        outputs = [(located(p), p, what, kind) for p, what, kind in self.outputs]
        self.check_outputs_apart(outputs)
        named = {at.name for at, _, _, kind in outputs if not kind.endswith("folder")}
        candidates = self.images_named(named)
        for at, path, what, kind in outputs:
            if kind.endswith("folder"):
                self.check_folder(path, what, kind)
            else:
                self.check_not_an_input(at, path, what, candidates.get(at.name, ()))
                if kind == "figure":
                    self.check_figure(path, what)
                if path.is_dir():
                    raise CLIError(f"{what} {str(path)!r} is a folder, not a file")
                self.check_kind(path, what)
        for _, path, what, kind in outputs:
            try_writing(path / ".write-test" if kind.endswith("folder") else path, what)

    @staticmethod
    def check_outputs_apart(outputs):
        seen = {}
        for at, path, what, _ in outputs:
            if at in seen:
                raise CLIError(f"{what} {str(path)!r} is also {seen[at]}: give each output its own name")
            seen[at] = what

    def images_named(self, names):
        """{name: [image paths of that name]}: the only images an output of that name could replace."""
        found = {}
        for files in self.images:
            for f in files:
                name = os.path.basename(os.fspath(f))
                if name in names:
                    found.setdefault(name, []).append(f)
        return found

    def check_not_an_input(self, at, path, what, images):
        for read, read_what, replaced_by in self.files:
            if (located(read) == at or same_file(read, path)) and replaced_by != what:
                raise CLIError(
                    f"{what} {str(path)!r} is {read_what}, which this run reads; writing it would replace "
                    "it: choose another name"
                )
        if any(located(f) == at or same_file(f, path) for f in images):
            raise CLIError(
                f"{what} {str(path)!r} is one of the input files; writing it would replace it: choose another name"
            )

    def check_kind(self, path, what):
        """An existing, non-empty file at an output of a known kind must be of that kind."""
        kind = self.replaces.get(path)
        if kind is None or not path.is_file() or path.stat().st_size == 0:
            return
        noun, test = KINDS[kind]
        try:
            ok = test(path)
        except OSError as e:
            raise CLIError(f"{what} {str(path)!r} exists and cannot be read ({e.strerror or e})") from None
        if not ok:
            raise CLIError(
                f"{what} {str(path)!r} exists and is not {noun}: writing it would replace it; choose another name "
                "(or remove that file first)"
            )

    def check_figure(self, path, what):
        suffix = path.suffix.lower().lstrip(".")
        formats = figure_formats()
        if suffix and suffix not in formats:
            raise CLIError(
                f"{what} {str(path)!r}: a figure cannot be saved as .{suffix}; name it .png (or "
                f"{', '.join('.' + f for f in sorted(formats - {'png'}) if f in ('jpg', 'pdf', 'svg'))})"
            )
        self.check_not_searched(path, what, "the figure")

    def check_not_searched(self, path, what, thing):
        resolved = Path(path).resolve()
        for folder, folder_what in self.searched:
            if resolved.is_relative_to(folder.resolve()):
                raise CLIError(
                    f"{what} {str(path)!r} is inside {str(folder)!r}, where {folder_what} are read from: "
                    f"{thing} would be read as input next time; write it outside that folder"
                )

    def check_folder(self, path, what, kind):
        if path.exists() and not path.is_dir():
            raise CLIError(f"{what} {str(path)!r} is a file; give a folder")
        if any(input_names_in(path, files) for files in self.images):
            raise CLIError(
                f"{what} {str(path)!r} holds input images: what the run writes there would be mixed with "
                "them; give another folder"
            )
        if kind == "image folder":
            self.check_not_searched(path, what, "the images written there")
