"""The int8 build on real sets (a script, not a test): prints, with the CPU, what export.py --int8 costs and gains.

  python bench/int8_bench.py                         # 3 sets x 4 models and the speed part; ~40 min on 2 CPUs
  python bench/int8_bench.py --sets fashion_tops --models efficientnet_lite0 --speed_models resnet18
  python bench/int8_bench.py --models efficientnet_lite0 --speed_models --calibrations minmax --qat 0 6

Accuracy part: for each set of bench/finetune_bench.py (solar_mono, fashion_tops, and solar_poly, which nothing was
tuned on) and each model, train.py trains it as a user would, then export.py --int8 builds the int8 file with the
gate opened wide (--max_drop 100 --min_agreement 0 --min_ood_agreement 0: every figure is printed, passed or not),
once per calibration method, and prints its figures: accuracy fp32 and int8 on the set's test images, top-1
agreement, the out-of-distribution flag's agreement, and whether export.py's default gate (at most 1 point lost, 98%
top-1 agreement, 95% flag agreement) passes it. EfficientNet-Lite0
starts from its ImageNet weights (--freeze); the torchvision models' ImageNet weights cannot be downloaded here, so
they are fine-tuned from random weights (--n_epochs --scratch_epochs at --scratch_size px): their int8 figures
measure the architecture's sensitivity, not ImageNet's features.

Speed part: each --speed_models architecture at 224 px, exported and quantized (calibrated on 64 of the shipped
sample's images), onnxruntime on ready tensors at batch 1 and 32, fp32 against int8 (best of 3 passes, in turns).
"""

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from finetune_bench import SETS, build_set  # noqa: E402
from scale_bench import checkpoint, cpu_line  # noqa: E402

import data_loader as dl  # noqa: E402
import int8  # noqa: E402
from cli import ArgumentParser  # noqa: E402
from timed import run  # noqa: E402

MODELS = ("efficientnet_lite0", "mobilenet_v2", "resnet18", "mobilenet_v3_large")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    p.add_argument("--models", nargs="*", choices=MODELS, default=list(MODELS))
    p.add_argument("--speed_models", nargs="*", choices=MODELS, default=list(MODELS))
    p.add_argument(
        "--int8_weights", choices=["auto", "s8", "s7"], default="auto", help="export.py's --int8_weights (both parts)"
    )
    p.add_argument(
        "--qat",
        type=int,
        nargs="+",
        default=[0],
        metavar="EPOCHS",
        help="export.py's --qat, each in turn (accuracy part)",
    )
    p.add_argument("--calibrations", nargs="+", choices=int8.METHODS, default=list(int8.METHODS))
    p.add_argument("--scratch_epochs", type=int, default=20)
    p.add_argument("--scratch_size", type=int, default=112)
    p.add_argument("--data", default=str(ROOT / "data" / "finetune_bench"))
    return p.parse_args(argv)


def accuracy_part(args, work):
    print(
        "| set | model | fp32 accuracy | int8 accuracy | points lost | top-1 agreement | calibration | --qat epochs | "
        "largest prob. difference | out-of-distribution flag agreement | passes the default gate |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for name in args.sets:
        data = build_set(name, Path(args.data) / name, 120, 80)
        for model in args.models:
            out = work / f"{name}_{model}"
            flags = (
                ["--use_pretrained", "--freeze"]
                if model == "efficientnet_lite0"
                else ["--n_epochs", args.scratch_epochs, "--input_size", args.scratch_size]
            )
            run(
                [
                    sys.executable,
                    ROOT / "train.py",
                    "--data_dir",
                    data,
                    "--model_name",
                    model,
                    "--model_fn",
                    out / "m.pth",
                    "--log_dir",
                    out / "run",
                    "--verbose",
                    "0",
                    *flags,
                ]
            )
            for method, qat in [(m, q) for m in args.calibrations for q in args.qat]:
                cmd = [sys.executable, ROOT / "export.py", "--model_fn", out / "m.pth", "--int8", "--calibration"]
                cmd += [method, "--max_drop", "100", "--min_agreement", "0", "--min_ood_agreement", "0"]
                cmd += ["--output", out / f"m.{method}.int8.onnx"]
                cmd += ["--int8_weights", args.int8_weights, "--qat", qat]
                done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
                line = next((ln for ln in done.stdout.splitlines() if ln.startswith("int8 (")), None)
                if line is None:
                    reason = (done.stderr.strip().splitlines() or ["?"])[-1]
                    print(f"| {name} | {model} | | | | | {method} | {qat} | | | failed: {reason[:120]} |", flush=True)
                    continue
                found = re.search(
                    r"accuracy fp32 ([\d.]+), int8 ([\d.]+) \(([-+\d.]+) points lost\), "
                    r"top-1 agreement ([\d.]+)%, largest probability difference ([\d.]+)",
                    line,
                )
                fp32, q, lost, agree, diff = found.groups()
                ood = re.search(r"out-of-distribution flag agreement ([\d.]+)%", line)
                ood = float(ood.group(1)) if ood else None
                passes = float(lost) <= 1.0 and float(agree) >= 98.0 and (ood is None or ood >= 95.0)  # default gate
                ood = "" if ood is None else f"{ood}%"
                row = f"| {name} | {model} | {fp32} | {q} | {float(lost):.2f} | {agree}% | {method} | {qat} | {diff} | "
                row += f"{ood} | {'yes' if passes else 'no'} |"
                print(row, flush=True)


def speed_part(args, work):
    files = [f for f, _ in dl.scan_class_folders(ROOT / "data" / "fashion_sample" / "train")[1]][::6][:64]
    print(
        "\n| model (224 px) | batch 1: fp32 / int8 img/s | speed-up | batch 32: fp32 / int8 img/s | speed-up | "
        "size fp32 / int8 |\n|---|---|---|---|---|---|"
    )
    for model in args.speed_models:
        ckpt_path = checkpoint(work / f"{model}_224.pth", model, ["a", "b", "c", "d"], 224)
        run([sys.executable, ROOT / "export.py", "--model_fn", ckpt_path, "--verbose", "0"])
        fp32 = ckpt_path.with_suffix(".onnx")
        ckpt = torch.load(ckpt_path, weights_only=True)
        images = int8.load_batch(files, dl.Preprocess.of(ckpt))
        q = work / f"{model}_224.int8.onnx"
        int8.quantize(fp32, q, images, "minmax", int8.weight_format(args.int8_weights))
        rates = {}
        for _ in range(2):  # in turns: a burst of load on this shared machine does not decide
            for batch in (1, 32):
                for kind, path in (("fp32", fp32), ("int8", q)):
                    rates[kind, batch] = max(rates.get((kind, batch), 0), int8.rate(path, images, batch))
        sizes = [p.stat().st_size / 2**20 for p in (fp32, q)]
        print(
            f"| {model} | {rates['fp32', 1]:.1f} / {rates['int8', 1]:.1f} | {rates['int8', 1] / rates['fp32', 1]:.2f}x"
            f" | {rates['fp32', 32]:.1f} / {rates['int8', 32]:.1f} | {rates['int8', 32] / rates['fp32', 32]:.2f}x | "
            f"{sizes[0]:.1f} / {sizes[1]:.1f} MB ({sizes[1] / sizes[0]:.2f}) |",
            flush=True,
        )


def main(args):
    flags = open("/proc/cpuinfo").read()
    print(
        f"machine: {cpu_line()}; avx512_vnni {'yes' if ' avx512_vnni' in flags else 'no'}, "
        f"avx2 {'yes' if ' avx2' in flags else 'no'}; onnxruntime on the CPU, {torch.get_num_threads()} threads; "
        f"int8 weights {int8.weight_format(args.int8_weights)} (--int8_weights {args.int8_weights}); "
        f"--qat {' '.join(map(str, args.qat))}"
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        if args.speed_models:
            speed_part(args, work)
        if args.models:
            print()
            accuracy_part(args, work)
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main(parse_args())
