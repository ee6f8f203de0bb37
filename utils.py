"""Small shared helpers: errors, seeding, devices, distributed info, safe writes, stop signals, figures."""
import argparse
import os
import random
import signal
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows defaults, except empty ones and those the help text already states."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def flag_adder(parser):
    """add(name, ...) for a parser: every --snake_case flag is also accepted as --dashed-case."""

    def add(name, *more, **kw):
        names = [name] + ([name.replace("_", "-")] if "_" in name else []) + list(more)
        return parser.add_argument(*names, **kw)

    return add


class CLIError(Exception):
    """A user-facing problem: printed as one line, exit status 2, no traceback."""


def run_cli(entry):
    """Run a CLI entry point (no arguments); turn CLIError into a one-line message and exit status 2.
    When stdout is closed early (`| head`), stop quietly with status 1, as other command-line tools do;
    files are written atomically, so none is left half-written."""
    tune_allocator()
    try:
        return entry()
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        sys.exit(1)


ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_CONF", "TCMALLOC_")


def tune_allocator():
    """Keep freed activation buffers in the heap instead of giving them back to the kernel after every
    layer. glibc's defaults unmap blocks over its mmap threshold and trim the heap top, so each batch
    faults its activations in again (tens of thousands of page faults per ResNet batch; predict.py's
    loop ran 9-20% faster tuned, see the README). Linux glibc only; skipped when the user already tunes
    malloc or preloads another allocator. True when applied."""
    if not sys.platform.startswith("linux") or os.environ.get("LD_PRELOAD") or any(
            k.startswith(ALLOCATOR_ENV) for k in os.environ):
        return False
    try:
        import ctypes
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl or another libc
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    return all(mallopt(option, value) == 1 for option, value in (
        (M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 512 << 20), (M_TOP_PAD, 64 << 20)))


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


# ----------------------------------------------------------------------------- devices


def resolve_device(gpu_id, local_rank=None):
    """--gpu_id: N = cuda:N, -1 = CPU, None = cuda:0 if present, else Apple MPS, else CPU.
    Under torchrun, LOCAL_RANK picks the GPU instead."""
    if local_rank is not None and torch.cuda.is_available() and gpu_id != -1:
        return torch.device("cuda", local_rank)
    if gpu_id is None:
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if gpu_id < 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise CLIError(f"--gpu_id {gpu_id} asked for a GPU, but CUDA is not available here; use --gpu_id -1 for the CPU")
    if gpu_id >= torch.cuda.device_count():
        raise CLIError(f"--gpu_id {gpu_id} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device("cuda", gpu_id)


# ----------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = None  # None when not launched by torchrun

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def dist_info_from_env():
    """What torchrun put in the environment (RANK, WORLD_SIZE, LOCAL_RANK); a plain run is rank 0 of 1."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


def all_reduce_sum(values, dist_info, device):
    """Sum a list of numbers over all processes (identity for one process)."""
    if not dist_info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------- files


def check_writable(path, what="output"):
    """Fail before any work starts if `path` cannot be written (parent folders are created)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=True):
            pass
    except OSError as e:
        raise CLIError(f"cannot write {what} {str(path)!r}: {e.strerror or e}") from None
    if path.is_dir():
        raise CLIError(f"{what} {str(path)!r} is a folder, not a file")


@contextmanager
def atomic_open(path, mode="w", **kwargs):
    """Write to a temporary file in the same folder, fsync, then rename over `path`.
    A crash at any moment leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_torch_save(obj, path):
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def atomic_savefig(fig, path, **kwargs):
    suffix = Path(path).suffix.lstrip(".") or "png"
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format=suffix, **kwargs)


# ----------------------------------------------------------------------------- stop signals


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loops look at it at safe points (between batches).
    Installed explicitly so a background job that inherited an ignored SIGINT still stops on Ctrl-C."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    @property
    def requested(self):
        return self.signum is not None

    def _handler(self, signum, frame):
        self.signum = signum

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def ignore_stop_signals(_worker_id=None):
    """DataLoader worker_init_fn: workers ignore Ctrl-C and SIGTERM sent to the whole process group; the
    main process decides when to stop and shuts them down (they also exit if the main process dies)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ----------------------------------------------------------------------------- figures


def new_figure(**kwargs):
    """A figure on the headless Agg canvas (no display needed; pyplot's window only with show())."""
    import matplotlib

    if os.environ.get("MPLBACKEND") is None and not os.environ.get("DISPLAY"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.figure(**kwargs)


def image_grid_figure(images, titles, colors, ncols=None):
    """images: PIL images or HxWx3 arrays; one titled cell each."""
    import math

    n = max(1, len(images))
    ncols = ncols or min(n, 6)
    nrows = math.ceil(n / ncols)
    fig = new_figure(figsize=(2.4 * ncols, 2.9 * nrows))
    for i, (img, title, color) in enumerate(zip(images, titles, colors)):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.imshow(img)
        ax.set_title(title, color=color, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return fig


def save_image_grid(images, titles, colors, path, show=False):
    import matplotlib.pyplot as plt

    fig = image_grid_figure(images, titles, colors)
    atomic_savefig(fig, path, dpi=100)
    if show:
        plt.show()
    plt.close(fig)


def save_confusion_matrix(matrix, class_names, path):
    """matrix[i][j] = images of true class i predicted as j."""
    import matplotlib.pyplot as plt

    n = len(class_names)
    size = max(4, 0.5 * n + 2)
    fig = new_figure(figsize=(size, size))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        top = max(1, max(max(row) for row in matrix))
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(matrix[i][j]), ha="center", va="center", fontsize=7,
                        color="white" if matrix[i][j] > top / 2 else "black")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)
