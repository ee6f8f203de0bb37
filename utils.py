"""Small shared helpers: seeding, devices and how tensors run on them (Compute: mixed precision, memory
format, progress bars), distributed info, safe writes, figures."""

import os
import random
import stat
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.modules.utils import _pair  # how nn.Conv2d reads its stride, padding, dilation
from torch.overrides import TorchFunctionMode
from tqdm import tqdm

from cli import CLIError


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
        raise CLIError(
            f"--gpu_id {gpu_id} asked for a GPU, but CUDA is not available here; use --gpu_id -1 for the CPU"
        )
    if gpu_id >= torch.cuda.device_count():
        raise CLIError(f"--gpu_id {gpu_id} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device("cuda", gpu_id)


@dataclass
class Compute:
    """How tensors run: device, mixed precision, memory format, and the stop flag to poll."""

    device: torch.device
    amp_dtype: torch.dtype = None  # None = fp32; bf16 or fp16 autocast otherwise
    channels_last: bool = False  # inputs of forward-only passes (evaluation, caching, prediction)
    train_channels_last: bool = False  # inputs of training steps (see trainer.train_channels_last)
    dist: object = None  # utils.DistInfo
    stop: object = None  # cli.StopFlag
    progress: bool = False  # tqdm bars
    train_amp_dtype: torch.dtype = None  # training steps through the backbone when it differs (precision_for)

    def autocast(self, train=False):
        """The precision of forward-only passes, or with train=True of fine-tuning's training steps."""
        dtype = (self.train_amp_dtype or self.amp_dtype) if train else self.amp_dtype
        if dtype is None:
            return nullcontext()
        if train and self.device.type == "cpu" and dtype == torch.bfloat16:
            return cpu_bf16_training()
        return torch.autocast(self.device.type, dtype=dtype)

    def to_device(self, images, labels=None, train=False):
        images = images.to(self.device, non_blocking=True)
        if (self.train_channels_last if train else self.channels_last) and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images if labels is None else (images, labels.to(self.device, non_blocking=True))

    def grad_scaler(self):
        """A GradScaler for training steps in fp16 (GPUs without bf16); disabled, a no-op, otherwise."""
        dtype = self.train_amp_dtype or self.amp_dtype
        return torch.amp.GradScaler(self.device.type, enabled=dtype == torch.float16)

    def stop_requested(self):
        """True on every rank once any rank got SIGINT/SIGTERM, so all ranks stop at the same batch."""
        flag = bool(self.stop is not None and self.stop.requested)
        if self.dist is not None and self.dist.enabled:
            return all_reduce_sum([float(flag)], self.dist, self.device)[0] > 0
        return flag


def cpu_has_fast_bf16():
    """bf16 autocast only pays on CPUs with bf16 instructions (AVX512-BF16, AMX); elsewhere it is
    several times slower than fp32 (measured: 7x on an AVX2 EPYC)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


class DepthwiseFp32Backward(torch.autograd.Function):
    """A depthwise convolution computed in bf16 (as autocast would), its gradients in fp32."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        low = x.to(torch.bfloat16)
        ctx.save_for_backward(low, weight)
        ctx.conv = (x.dtype, bias is not None, stride, padding, dilation, groups)
        with torch.autocast("cpu", enabled=False):
            return torch.conv2d(
                low,
                weight.to(torch.bfloat16),
                None if bias is None else bias.to(torch.bfloat16),
                stride,
                padding,
                dilation,
                groups,
            )

    @staticmethod
    def backward(ctx, grad):
        low, weight = ctx.saved_tensors
        dtype, has_bias, stride, padding, dilation, groups = ctx.conv
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad.float().contiguous(memory_format=torch.channels_last),
            low.float(),
            weight.float(),
            [weight.shape[0]] if has_bias else None,
            list(stride),
            list(padding),
            list(dilation),
            False,
            [0, 0],
            groups,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]],
        )
        return (None if grad_x is None else grad_x.to(dtype), grad_w, grad_b, None, None, None, None)


def slow_bf16_depthwise(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """torch.conv2d's arguments as DepthwiseFp32Backward takes them when the call is a depthwise convolution whose
    bf16 backward is slow on CPUs (a kernel over 3x3 or a stride; measured in channels_last, the memory format of
    bf16 training steps), under autograd; else None."""
    if (
        groups == 1
        or isinstance(padding, str)
        or input.dim() != 4
        or input.device.type != "cpu"
        or not input.is_contiguous(memory_format=torch.channels_last)
        or not groups == input.shape[1] == weight.shape[0]
        or not torch.is_grad_enabled()
        or not (input.requires_grad or weight.requires_grad)
    ):
        return None
    if max(weight.shape[-2:]) <= 3 and max(_pair(stride)) == 1:
        return None  # bf16 is the faster there
    return input, weight, bias, _pair(stride), _pair(padding), _pair(dilation), groups


class DepthwiseBackwardInFp32(TorchFunctionMode):
    """Depthwise convolutions with a kernel over 3x3 or a stride (MobileNet, EfficientNet) keep their bf16
    forward but compute their gradients in fp32. On an AVX512-BF16 EPYC, oneDNN's bf16 backward of these was 2-28x
    slower than fp32 channels_last (84 ms against 24 ms for the input gradient of a 5x5 stride-2 layer of 144
    channels at 59 px, batch 32), and they took most of a bf16 fine-tuning step of EfficientNet-Lite0; computing
    them in fp32 took its fine-tuning epoch from 1.27x to 2.40x the fp32 NCHW one (bench/finetune_bench.py
    --speed_only, docs/finetune.md). Everything else stays in bf16."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv2d:
            call = slow_bf16_depthwise(*args, **kwargs)
            if call is not None:
                return DepthwiseFp32Backward.apply(*call)
        return func(*args, **kwargs)


@contextmanager
def cpu_bf16_training():
    """bf16 autocast for training steps on a CPU, with the depthwise convolutions' gradients in fp32."""
    with torch.autocast("cpu", dtype=torch.bfloat16), DepthwiseBackwardInFp32():
        yield


def amp_dtype_for(device, amp, log=None):
    """--amp: bf16 on GPUs that have it, else fp16 (with a GradScaler); on CPU bf16 only where it is faster."""
    if not amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and not cpu_has_fast_bf16():
        if log:
            log("--amp: this CPU has no bf16 instructions, where bf16 runs slower than fp32; staying in fp32")
        return None
    return torch.bfloat16


def native_bf16(device):
    """Whether the device computes bf16 natively: CUDA GPUs with bf16, CPUs with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_fast_bf16()


def precision_for(device, amp):
    """(forward passes' autocast dtype, fine-tuning steps' autocast dtype, the choice in words) for --amp (True),
    --no_amp (False) or neither (None: bf16 for fine-tuning steps where the device computes it natively, fp32
    for everything else: the feature cache, the probe, validation, calibration and test stay exact)."""
    if amp is False:
        return None, None, "fp32 (--no_amp)"
    if amp:
        dtype = amp_dtype_for(device, True)
        name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        why = "" if dtype is not None else ": this device has no fast bf16, where bf16 runs slower than fp32"
        return dtype, dtype, f"{name} autocast (--amp){why}"
    if native_bf16(device):
        where = "this GPU" if device.type == "cuda" else "this CPU has AVX512-BF16/AMX"
        return None, torch.bfloat16, f"bf16 autocast for fine-tuning steps ({where}; --no_amp for fp32)"
    return None, None, "fp32 (no native bf16 here; bf16 would be slower)"


def bar(iterable, compute, desc):
    # disable=None: bars only on a terminal, so logs and pipes stay clean
    return tqdm(iterable, desc=desc, leave=False, disable=None if compute.progress else True, dynamic_ncols=True)


class Progress:
    """Where no tqdm bar shows (stderr is not a terminal: a log file, a batch job), a line every `every` seconds:
    images done of the total, the rate and the time left. `scale`: images the whole job does per image counted
    here (under torchrun rank 0 counts its own share of N equal shares)."""

    def __init__(self, total, desc, enabled=True, every=10.0, scale=1, out=None):
        self.out = out or sys.stderr
        self.enabled = enabled and total > 0 and not self.out.isatty()
        self.total, self.desc, self.every, self.scale = total, desc, every, scale
        self.done, self.start = 0, time.monotonic()
        self.shown = self.start

    def update(self, n):
        self.done += n * self.scale
        now = time.monotonic()
        if not self.enabled or now - self.shown < self.every:
            return
        self.shown = now
        done = min(self.done, self.total)
        rate = done / max(now - self.start, 1e-9)
        left = (self.total - done) / rate if rate > 0 else float("inf")
        print(
            f"{self.desc}: {done}/{self.total} images ({done / self.total:.0%}), {rate:.1f} img/s, "
            f"{format_seconds(left)} left",
            file=self.out,
            flush=True,
        )


def format_seconds(seconds):
    """h:mm:ss ('?' when unknown)."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


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


@contextmanager
def process_group(dist_info, device):
    """torchrun's processes joined for the block (NCCL between GPUs, gloo on CPUs; each process on the GPU of
    its LOCAL_RANK), and the group ended on every way out; nothing for a single process."""
    if not dist_info.enabled:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", rank=dist_info.rank, world_size=dist_info.world_size
    )
    try:
        yield
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def broadcast_from_main(tensor, dist_info, device):
    """Rank 0's tensor on every process (the tensor itself for one process)."""
    if not dist_info.enabled:
        return tensor
    t = tensor.to(device)
    torch.distributed.broadcast(t, src=0)
    return t.cpu()


def all_reduce_sum(values, dist_info, device):
    """Sum a list of numbers over all processes (identity for one process)."""
    if not dist_info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------- files


def file_mode(path):
    """The permissions open(path, "w") would leave: an existing file's own, else 0666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextmanager
def atomic_path(path):
    """A temporary name in `path`'s folder to write to; fsynced and renamed over `path` when the block
    succeeds, removed when it fails. A crash at any moment leaves the old file or the new one, never half
    of one. The name keeps the extension (torch.export.save wants .pt2), and the file gets the permissions
    open() would give it (mkstemp's are 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    try:
        os.chmod(fd, file_mode(path))
        os.close(fd)
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


@contextmanager
def atomic_open(path, mode="w", **kwargs):
    """open() for writing, through atomic_path: the file appears whole under its name, or not at all."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def atomic_torch_save(obj, path):
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def atomic_savefig(fig, path, **kwargs):
    suffix = Path(path).suffix.lstrip(".") or "png"
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format=suffix, **kwargs)


# ----------------------------------------------------------------------------- figures


def new_figure(**kwargs):
    """A figure on the headless Agg canvas (no display needed; pyplot's window only with show())."""
    import matplotlib

    if os.environ.get("MPLBACKEND") is None and not os.environ.get("DISPLAY"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.figure(**kwargs)


def image_grid_figure(images, titles, colors, ncols=None, fontsize=9):
    """images: PIL images or HxWx3 arrays; one titled cell each."""
    import math

    n = max(1, len(images))
    ncols = ncols or min(n, 6)
    nrows = math.ceil(n / ncols)
    fig = new_figure(figsize=(2.4 * ncols, 2.9 * nrows))
    for i, (img, title, color) in enumerate(zip(images, titles, colors)):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.imshow(img)
        ax.set_title(title, color=color, fontsize=fontsize)
        ax.axis("off")
    for _ in range(2):  # the second pass makes room for the titles where the first one moved the images to
        fig.tight_layout()
    return fig


NON_INTERACTIVE = {"agg", "cairo", "pdf", "pgf", "ps", "svg", "template"}  # matplotlib backends without windows


def save_image_grid(images, titles, colors, path, show=False):
    """Save the grid; with `show`, also open it in a window. Returns False when a window was asked for but
    this machine has no display (the figure is saved all the same)."""
    import matplotlib.pyplot as plt

    fig = image_grid_figure(images, titles, colors)
    atomic_savefig(fig, path, dpi=100)
    shown = True
    if show:
        shown = plt.get_backend().lower() not in NON_INTERACTIVE
        if shown:
            plt.show()
    plt.close(fig)
    return shown


def save_confusion_matrix(matrix, class_names, path, extra_column=None):
    """matrix[i][j] = images of true class i predicted as j; with extra_column (a name such as 'unknown'),
    each row has one more count, shown as a last predicted column."""
    import matplotlib.pyplot as plt

    n = len(class_names)
    predicted = list(class_names) + ([extra_column] if extra_column is not None else [])
    size = max(4, 0.5 * n + 2)
    fig = new_figure(figsize=(size, size))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(predicted)), predicted, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        top = max(1, max(max(row) for row in matrix))
        for i in range(n):
            for j in range(len(predicted)):
                ax.text(
                    j,
                    i,
                    int(matrix[i][j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if matrix[i][j] > top / 2 else "black",
                )
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)
