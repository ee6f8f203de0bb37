"""Prediction from an export.py ONNX file (onnxruntime) against the checkpoint (PyTorch), on this CPU, fp32
(a script, not a test): prints the figures and their ratios.

  python bench/onnx_bench.py                      # resnet34, 224 px Fashion-MNIST (built on first use)
  python bench/onnx_bench.py --model_fn my.pth    # your checkpoint, on its training data

Measures:
  1. the steady rate on ready tensors (img/s, one batch size): PyTorch as predict.py runs it (BatchNorm
     folded, channels_last, inference_mode) against onnxruntime as predict.py runs it, and onnxruntime
     with its own thread default and lower graph optimization levels (what the choices cost);
  2. predict.py as whole processes on the same images, .pth against .onnx, taken in turns (best of
     --rounds each), and how far their result.csv files agree (predict column, probabilities).
Without --model_fn it trains a checkpoint first: the frozen, randomly initialised backbone with a trained
head (train.py --freeze), which is as fast as a pretrained one and enough for the agreement figures.
"""

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import data_loader as dl  # noqa: E402
import exported_model  # noqa: E402
import model_loader as ml  # noqa: E402
from cli import ArgumentParser, tune_allocator  # noqa: E402
from timed import agreement, run  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model_fn", default=None, help="checkpoint to measure (default: one trained here)")
    p.add_argument(
        "--data_dir",
        default=str(ROOT / "data" / "fashion_bench"),
        help="images predicted (default: 224 px Fashion-MNIST, built on first use)",
    )
    p.add_argument("--model_name", default="resnet34", help="backbone of the checkpoint trained here")
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=32, help="of the steady rates and of predict.py")
    p.add_argument("--repeats", type=int, default=3, help="timed batches per steady rate")
    p.add_argument("--rounds", type=int, default=2, help="predict.py runs per format, in turns")
    return p.parse_args(argv)


def rate(fn, x, repeats):
    fn(x)  # warm-up at the timed shape
    start = time.perf_counter()
    for _ in range(repeats):
        fn(x)
    return repeats * len(x) / (time.perf_counter() - start)


def onnx_session(path, threads=None, level=None):
    """An OnnxModel with other session options: onnxruntime's thread default (None) or a graph level."""
    import onnxruntime as ort

    model = exported_model.OnnxModel(path)
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    if level is not None:
        options.graph_optimization_level = level
    model.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return model


def steady_rates(pth, onnx_path, size, batch, repeats):
    import onnxruntime as ort

    ckpt = ml.load_checkpoint(pth)
    model, _ = ml.model_from_checkpoint(ckpt)
    torch_model = ml.optimize_for_inference(model, ml.is_convolutional(model))
    x = torch.randn(batch, 3, size, size)
    xcl = x.contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    variants = {
        "PyTorch, as predict.py (folded BN, channels_last)": (lambda t: torch_model(xcl), x),
        f"onnxruntime, as predict.py ({threads} threads, all graph optimizations)": (
            exported_model.OnnxModel(onnx_path),
            x,
        ),
        "onnxruntime, its own thread default": (onnx_session(onnx_path), x),
        "onnxruntime, basic graph optimizations only": (
            onnx_session(onnx_path, threads, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),
            x,
        ),
        "onnxruntime, no graph optimizations": (
            onnx_session(onnx_path, threads, ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
            x,
        ),
    }
    results = dict.fromkeys(variants, 0.0)
    with torch.inference_mode():
        for _ in range(2):  # in turns, best of two: a burst of load on this shared machine does not decide
            for name, (fn, inp) in variants.items():
                results[name] = max(results[name], rate(fn, inp, repeats))
    return results


def prepare(args):
    """(data folder, work folder, the checkpoint): the data built and the model trained when not given."""
    data = Path(args.data_dir)
    work = Path(tempfile.mkdtemp(prefix="onnx_bench_"))
    if not (data / "train").is_dir():
        run(
            [
                sys.executable,
                ROOT / "data" / "prepare.py",
                "fashion",
                "--out",
                data,
                "--size",
                args.input_size,
                "--train_per_class",
                100,
                "--test_per_class",
                30,
            ]
        )
    pth = Path(args.model_fn) if args.model_fn else work / "model.pth"
    if not args.model_fn:
        seconds, _ = run(
            [
                sys.executable,
                ROOT / "train.py",
                "--data_dir",
                data,
                "--model_name",
                args.model_name,
                "--input_size",
                args.input_size,
                "--freeze",
                "--n_epochs",
                3,
                "--model_fn",
                pth,
                "--log_dir",
                work / "run",
                "--verbose",
                0,
            ]
        )
        print(f"trained {pth} in {seconds:.1f}s")
    return data, work, pth


def main(args):
    tune_allocator()  # as predict.py does
    import onnxruntime as ort

    data, work, pth = prepare(args)
    ckpt = ml.load_checkpoint(pth)
    size = ckpt["input_size"]
    cpu = (
        next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
        if os.path.exists("/proc/cpuinfo")
        else "?"
    )
    print(
        f"machine: {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"onnxruntime {ort.__version__}; {ckpt['model_name']} at {size} px, fp32"
    )

    onnx_path = work / "model.onnx"
    seconds, out = run([sys.executable, ROOT / "export.py", "--model_fn", pth, "--output", onnx_path])
    print(f"export.py: {seconds:.1f}s (whole process); {out.strip().splitlines()[0]}")

    rates = steady_rates(pth, onnx_path, size, args.batch_size, args.repeats)
    base = next(iter(rates.values()))
    print(f"\n1. steady rate, batch {args.batch_size} of ready tensors (best of 2 in turns, img/s)")
    for name, r in rates.items():
        print(f"   {name:72s} {r:7.1f}  {r / base:.2f}x")

    files = dl.list_images(data)
    times = {"pth": [], "onnx": []}
    for _ in range(args.rounds):
        for name, model_fn in (("pth", pth), ("onnx", onnx_path)):
            seconds, _ = run(
                [
                    sys.executable,
                    ROOT / "predict.py",
                    "--model_fn",
                    model_fn,
                    "--data_dir",
                    data,
                    "--output",
                    work / f"{name}.csv",
                    "--plot",
                    work / f"{name}.png",
                    "--verbose",
                    0,
                    "--batch_size",
                    args.batch_size,
                ]
            )
            times[name].append(seconds)
    best = {k: min(v) for k, v in times.items()}
    same, n, diff = agreement(work / "pth.csv", work / "onnx.csv")
    print(
        f"\n2. predict.py, {len(files)} images, whole process (best of {args.rounds}, in turns; all runs: "
        + "; ".join(f"{k} " + ", ".join(f"{s:.1f}s" for s in v) for k, v in times.items())
        + ")"
    )
    print(f"   .pth  {best['pth']:6.1f}s = {len(files) / best['pth']:5.1f} img/s")
    print(
        f"   .onnx {best['onnx']:6.1f}s = {len(files) / best['onnx']:5.1f} img/s = "
        f"{best['pth'] / best['onnx']:.2f}x .pth"
    )
    print(
        f"   agreement: same predict column {same}/{n}, largest probability difference {diff:.1e} "
        "(result.csv keeps 6 decimals)"
    )
    print(f"\n(work files in {work})")


if __name__ == "__main__":
    main(parse_args())
