"""Speed benchmark (a script, not a test): prints this machine's figures and their ratios in one run.

  python bench/bench.py                          # resnet34, 224 px Fashion-MNIST (built on first use)
  python bench/bench.py --uncached_epochs 3      # quicker: the uncached frozen run is extrapolated

Measures, for one backbone and input size:
  1. the forward-only ceiling: img/s on ready tensors, best of memory formats and dtypes;
  2. frozen training (--freeze, N epochs) as whole processes, with and without the feature cache,
     against the physical floor (start-up + one backbone pass over every image at the ceiling);
  3. a fine-tuning epoch against a plain loop (NCHW, fp32, no workers);
  4. predict.py as a whole process against the ceiling and a plain loop;
  5. predict.py's peak RSS for 1k and 10k images (28 px, so it runs in seconds: memory is what counts).
"""

import copy
import os
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import data_loader as dl  # noqa: E402
import model_loader as ml  # noqa: E402
import trainer  # noqa: E402
import utils  # noqa: E402
from cli import ArgumentParser, tune_allocator  # noqa: E402
from timed import run  # noqa: E402
from utils import DistInfo, resolve_device  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument(
        "--data_dir",
        default=str(ROOT / "data" / "fashion_bench"),
        help="ImageFolder with train/ and test/ (default: built from Fashion-MNIST at 224 px)",
    )
    p.add_argument("--model_name", default="resnet34")
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=20, help="frozen-training epochs")
    p.add_argument(
        "--uncached_epochs",
        type=int,
        default=20,
        help="epochs actually run without the cache; fewer are extrapolated to --epochs",
    )
    p.add_argument("--finetune_images", type=int, default=96, help="training images timed per fine-tune loop")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument(
        "--weights",
        default=None,
        help="backbone weights for the frozen runs (e.g. torchvision's "
        "ImageNet file); default: a donor fine-tuned here for --donor_epochs at 64 px, so that the "
        "frozen features mean something and the accuracies can be compared",
    )
    p.add_argument("--donor_epochs", type=int, default=3)
    p.add_argument("--skip_rss", action="store_true", help="skip the 1k/10k-image memory measurement")
    p.add_argument(
        "--gpu_id",
        type=int,
        default=None,
        help="CUDA device, -1 = CPU (default: as train.py picks); "
        "on a GPU, this tool's runs use --amp and channels_last",
    )
    return p.parse_args(argv)


def peak_rss_mb(cmd):
    """Peak resident memory of a command's largest process (via a fresh helper, so runs do not mix)."""
    helper = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", helper, *map(str, cmd)], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024


def ensure_data(path, size, per_class_train, per_class_test):
    if (Path(path) / "train").is_dir():
        return
    run(
        [
            sys.executable,
            ROOT / "data" / "prepare.py",
            "fashion",
            "--out",
            path,
            "--size",
            size,
            "--train_per_class",
            per_class_train,
            "--test_per_class",
            per_class_test,
        ]
    )


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def forward_rate(model, x, autocast=nullcontext, repeats=3):
    with autocast():
        model(x)  # warm-up at the timed shape: kernel selection, allocator
        sync(x.device)
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
        sync(x.device)
    return repeats * len(x) / (time.perf_counter() - start)


def ceiling(model_name, size, batch, device):
    model, _ = ml.build_model(model_name, 4, log=lambda *a: None)
    model = model.to(device).eval()
    x = torch.randn(batch, 3, size, size, device=device)
    rates = {"NCHW fp32": forward_rate(model, x)}
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    xcl = x.contiguous(memory_format=torch.channels_last)
    rates["channels_last fp32"] = forward_rate(cl, xcl)
    amp = utils.amp_dtype_for(device, True)  # bf16/fp16 on GPUs; bf16 on CPUs only where it is fast
    if amp is not None:
        name = "channels_last " + str(amp).replace("torch.", "").replace("bfloat16", "bf16").replace("float16", "fp16")
        rates[name] = forward_rate(cl, xcl, lambda: torch.autocast(device.type, dtype=amp))
    return rates


def finetune_rates(model_name, data_dir, size, batch, n_images, device, rounds=2):
    """img/s of one fine-tuning pass: a plain loop (NCHW, fp32, no workers) against ours. Both are warmed up
    once, then timed in turns (plain, ours, plain, ours, ...); the best pass of each counts, so that a burst
    of load on this shared machine does not decide the ratio."""
    splits = dl.build_splits(data_dir, 0.2, 0)
    splits.train = splits.train[:n_images]
    setups = {}
    gpu = device.type == "cuda"
    variants = (
        ("plain", False, 0, None),  # ours: as train.py sets it up, with --amp on GPUs
        ("ours", True, dl.default_num_workers(device.type), utils.amp_dtype_for(device, gpu)),
    )
    for name, channels_last, workers, amp in variants:
        torch.manual_seed(0)
        model, _ = ml.build_model(model_name, len(splits.class_names), log=lambda *a: None)
        train_cl = trainer.train_channels_last(device, channels_last)
        model = model.to(device, memory_format=torch.channels_last if train_cl else torch.contiguous_format)
        loaders = dl.build_loaders(
            splits,
            size,
            dl.default_resize(size),
            dl.IMAGENET_MEAN,
            dl.IMAGENET_STD,
            batch,
            workers,
            seed=0,
            pin_memory=gpu and name == "ours",
        )
        compute = utils.Compute(device, amp, channels_last, train_cl, DistInfo())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
        setups[name] = (
            model.train(),
            loaders.train,
            opt,
            torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
            scaler,
            compute,
        )

    def one_pass(name):
        model, loader, opt, sched, scaler, compute = setups[name]
        sync(device)
        start = time.perf_counter()
        metrics = trainer.train_one_epoch(
            model,
            loader,
            opt,
            sched,
            scaler,
            torch.nn.CrossEntropyLoss(),
            compute,
            dl.SkipLog(splits.train, splits.class_names, print),
        )
        sync(device)
        return metrics["count"] / (time.perf_counter() - start)

    for name in setups:
        one_pass(name)  # warm-up: kernel selection, allocator, first file reads
    results = dict.fromkeys(setups, 0.0)
    for _ in range(rounds):
        for name in setups:
            results[name] = max(results[name], one_pass(name))
    return results


@torch.inference_mode()
def plain_predict_rate(ckpt_path, files, device):
    """The loop a first script would write: PIL, NCHW fp32, no worker processes, batches of 32."""
    ckpt = ml.load_checkpoint(ckpt_path)
    model, _ = ml.model_from_checkpoint(ckpt)
    model = model.to(device).eval()
    tf = dl.Preprocess.of(ckpt).transform()
    start = time.perf_counter()
    for i in range(0, len(files), 32):
        x = torch.stack([tf(dl.load_rgb(f)) for f in files[i : i + 32]])
        model(x.to(device)).softmax(1).cpu()
    return len(files) / (time.perf_counter() - start)


def main(args):
    tune_allocator()  # as train.py and predict.py do; the in-process ceiling and plain loops get it too
    size, data = args.input_size, Path(args.data_dir)
    device = resolve_device(args.gpu_id)
    # the scripts run on the same device; on a GPU this tool's way is --amp + channels_last
    device_flags = ([] if args.gpu_id is None else ["--gpu_id", args.gpu_id]) + (
        ["--amp"] if device.type == "cuda" else []
    )
    ensure_data(data, size, 100, 30)
    splits = dl.build_splits(data, 0.2, 42)
    n_train, n_valid, n_test = len(splits.train), len(splits.valid), len(splits.test)
    print(
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{args.model_name} at {size} px; {n_train} train / {n_valid} valid / {n_test} test images in {data}; "
        f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    )

    rates = ceiling(args.model_name, size, args.batch_size, device)
    best_name, best = max(rates.items(), key=lambda kv: kv[1])
    print(f"\n1. forward-only ceiling (img/s on ready tensors, batch {args.batch_size})")
    for name, r in rates.items():
        print(f"   {name:22s} {r:7.1f}")
    print(f"   ceiling = {best:.1f} img/s ({best_name})")

    work = Path(tempfile.mkdtemp(prefix="bench_"))
    frozen_part(args, data, splits, best, device_flags, work)
    ft = finetune_rates(args.model_name, data, size, args.batch_size, args.finetune_images, device)
    ours = "ours (--amp, channels_last)" if device.type == "cuda" else "ours"
    print(
        f"\n3. fine-tuning, {args.finetune_images} images (best of 2 passes each, in turns): plain NCHW fp32 loop "
        f"{ft['plain']:.1f} img/s, {ours} {ft['ours']:.1f} img/s = {ft['ours'] / ft['plain']:.2f}x"
    )

    predict_part(args, data, splits, best, device, device_flags, work)
    if not args.skip_rss:
        rss_part(args, device_flags, work)
    print(f"\n(work files in {work})")


def frozen_part(args, data, splits, best, device_flags, work):
    """2. --freeze runs with and without the feature cache, against the floor (one pass at the ceiling `best`)."""
    size = args.input_size
    n_train, n_valid, n_test = len(splits.train), len(splits.valid), len(splits.test)
    startup, _ = run([sys.executable, ROOT / "train.py", "--help"])
    weights = args.weights
    if weights is None:
        weights = work / "donor.pth"
        run(
            [
                sys.executable,
                ROOT / "train.py",
                "--data_dir",
                data,
                "--model_name",
                args.model_name,
                "--input_size",
                64,
                "--n_epochs",
                args.donor_epochs,
                "--model_fn",
                weights,
                "--log_dir",
                work / "donor",
                "--verbose",
                0,
                *device_flags,
            ]
        )
    common = [
        sys.executable,
        ROOT / "train.py",
        "--data_dir",
        data,
        "--model_name",
        args.model_name,
        "--input_size",
        size,
        "--freeze",
        "--patience",
        "0",
        "--verbose",
        "1",
        "--batch_size",
        args.batch_size,
        "--weights",
        weights,
        *device_flags,
    ]
    cached_s, cached_out = run(
        common + ["--n_epochs", args.epochs, "--model_fn", work / "cached.pth", "--log_dir", work / "cached"]
    )
    unc_s, unc_out = run(
        common
        + [
            "--n_epochs",
            args.uncached_epochs,
            "--model_fn",
            work / "uncached.pth",
            "--log_dir",
            work / "uncached",
            "--no_feature_cache",
        ]
    )
    unc_total = (
        unc_s
        if args.uncached_epochs == args.epochs
        else (startup + (unc_s - startup) * args.epochs / args.uncached_epochs)
    )
    floor = startup + (n_train + n_valid + n_test) / best

    def accuracy(out):
        lines = [ln for ln in out.splitlines() if ln.startswith("test accuracy")]
        return lines[-1].split()[2] if lines else "?"

    print(f"\n2. frozen training, {args.epochs} epochs, whole process (start-up {startup:.1f}s)")
    print(
        f"   physical floor (start-up + one pass over {n_train + n_valid + n_test} images at the ceiling): {floor:.1f}s"
    )
    print(
        f"   with feature cache:    {cached_s:7.1f}s  = {cached_s / floor:.2f}x floor   "
        f"test accuracy {accuracy(cached_out)}"
    )
    note = (
        ""
        if args.uncached_epochs == args.epochs
        else f" (extrapolated from {args.uncached_epochs} epochs: {unc_s:.1f}s)"
    )
    print(f"   without (--no_feature_cache): {unc_total:7.1f}s{note}  test accuracy {accuracy(unc_out)}")
    print(f"   speed-up from the cache: {unc_total / cached_s:.1f}x")


def predict_part(args, data, splits, best, device, device_flags, work):
    """4. predict.py on every image against the ceiling measured next to it and a plain loop."""
    size = args.input_size
    files = [p for p, _ in splits.train + splits.valid + splits.test]
    # the ceiling again, next to the run it is compared with: this machine's speed drifts over minutes
    near = max(ceiling(args.model_name, size, args.batch_size, device).values())
    pred_s, _ = run(
        [
            sys.executable,
            ROOT / "predict.py",
            "--model_fn",
            work / "cached.pth",
            "--data_dir",
            data,
            "--output",
            work / "result.csv",
            "--plot",
            work / "p.png",
            "--verbose",
            "0",
            *device_flags,
        ]
    )
    pred_rate = len(files) / pred_s
    plain = plain_predict_rate(work / "cached.pth", files, device)
    print(
        f"\n4. predict.py, {len(files)} images, whole process: {pred_s:.1f}s = {pred_rate:.1f} img/s = "
        f"{pred_rate / near:.2f}x the ceiling measured just before ({near:.1f} img/s; {pred_rate / best:.2f}x "
        f"the first one); plain loop (in-process, no start-up, just after) {plain:.1f} img/s -> "
        f"{pred_rate / plain:.2f}x"
    )


def rss_part(args, device_flags, work):
    """5. predict.py's peak resident memory on 1k and 10k small images."""
    small = work / "small.pth"
    run(
        [
            sys.executable,
            ROOT / "train.py",
            "--model_name",
            args.model_name,
            "--input_size",
            28,
            "--freeze",
            "--n_epochs",
            1,
            "--model_fn",
            small,
            "--log_dir",
            work / "small",
            "--verbose",
            0,
            *device_flags,
        ]
    )
    rss = {}
    for n in (1000, 10000):
        folder = work / f"fashion{n}"
        ensure_data(folder, 28, n // 4, 0)
        rss[n] = peak_rss_mb(
            [
                sys.executable,
                ROOT / "predict.py",
                "--model_fn",
                small,
                "--data_dir",
                folder / "train",
                "--output",
                work / f"r{n}.csv",
                "--plot",
                work / f"p{n}.png",
                "--verbose",
                0,
                *device_flags,
            ]
        )
    print(
        f"\n5. predict.py peak RSS (largest process), 28 px: 1k images {rss[1000]:.0f} MB, 10k images "
        f"{rss[10000]:.0f} MB = {rss[10000] / rss[1000]:.2f}x"
    )


if __name__ == "__main__":
    main(parse_args())
