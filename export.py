"""Export a checkpoint of train.py for deployment: ONNX (for onnxruntime, in any language) or PyTorch's
own torch.export format (.pt2). The class names and the preprocessing travel inside the file. Before the
file is put in place it is checked against the PyTorch model on real images (the training data's test
folder or the CSV's test rows, else random tensors); a difference of a probability above 1e-4 fails and writes nothing.

  python export.py --model_fn model.pth                       # -> model.onnx
  python export.py --model_fn model.pth --output model.pt2    # torch.export.load()-able
"""

import cli  # before torch: Ctrl-C while the imports below load is one quiet line, not a traceback

if __name__ == "__main__":
    cli.exit_quietly_on_stop_signals()
    cli.check_installation()  # a torch/torchvision pair that does not match: one line, not a traceback

import io
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import data_loader
import exported_model
import int8
import labels_csv
import model_loader
import ood
import qat
import tasks
from cli import ArgumentParser, CLIError, StopFlag, describe_error, flag_adder, run_cli  # noqa: E402
from run_paths import RunPaths
from utils import atomic_path

FORMATS = {".onnx": "onnx", ".pt2": "pt2"}  # file extension -> format
TOLERANCE = 1e-4  # largest difference of any class probability between the export and the PyTorch model
DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}  # 17: onnxruntime >= 1.11 runs it; the dynamo exporter starts at 18
EXAMPLE_BATCH = 2  # traced batch size; the batch axis is exported dynamic (a batch of 1 is checked as well)


def build_parser():
    p = ArgumentParser(description=__doc__)
    add = flag_adder(p)
    add("--model_fn", "--model_path", default="model.pth", help="checkpoint written by train.py")
    add("--output", default=None, help="exported file (default: --model_fn with the format's extension)")
    add(
        "--format",
        choices=sorted(set(FORMATS.values())),
        default=None,
        help="onnx or pt2 (default: from --output's extension, else onnx)",
    )
    add(
        "--opset", type=int, default=None, help="ONNX opset (default: 17 with the torchscript exporter, 18 with dynamo)"
    )
    add(
        "--exporter",
        choices=["torchscript", "dynamo"],
        default="torchscript",
        help="ONNX exporter: torch.onnx's TorchScript tracer (seconds), or its torch.export-based one "
        "(needs onnxscript; up to a minute on a CPU)",
    )
    add(
        "--data_dir",
        default=None,
        help="images for the check: an image folder (searched recursively) "
        "(default: test/ of the training data when it exists, or the test rows of its CSV, else random tensors)",
    )
    add("--check_images", type=int, default=16, help="images the export is checked on")
    add("--verbose", type=int, default=1, help="0 = the result line only, 1 = also the check's figures")
    int8_flags(flag_adder(p.add_argument_group("int8 (--int8)")))
    return p


def int8_flags(add):
    add(
        "--int8",
        action="store_true",
        help="an int8 ONNX build (default name: MODEL.int8.onnx), held against the fp32 "
        "export on labelled held-out images (--data_dir, else the test images) and written only if it passes",
    )
    add(
        "--calibration",
        choices=["auto", *int8.METHODS],
        default="auto",
        help="how activation ranges are calibrated "
        "(auto: minmax, then percentile and entropy while the gate fails; the first that passes is kept)",
    )
    add(
        "--calibration_images",
        type=int,
        default=300,
        help="training images the ranges are calibrated on, drawn over all classes",
    )
    add("--calibration_dir", default=None, help="a folder of images to calibrate on instead of the training images")
    add(
        "--int8_weights",
        choices=["auto", "s8", "s7"],
        default="auto",
        help="the weights' range: s8 (8 bits, for CPUs with VNNI), s7 (7 bits: x86 CPUs without VNNI, where 8-bit "
        "weights can saturate); auto: what this CPU needs",
    )
    add(
        "--qat",
        type=int,
        default=0,
        metavar="EPOCHS",
        help="epochs of quantization-aware training before the int8 build (0: none): the backbone learns, on the "
        "calibration images, to give through int8 rounding what it gives in fp32; minutes on a CPU",
    )
    add("--gate_images", type=int, default=1000, help="held-out images the int8 build is held against fp32 on")
    add("--max_drop", type=float, default=1.0, help="accuracy points int8 may lose against fp32")
    add("--min_agreement", type=float, default=0.98, help="share of images whose top-1 must agree with fp32's")
    add(
        "--min_ood_agreement",
        type=float,
        default=0.95,
        help="share of images whose out-of-distribution flag (in_distribution) must agree with fp32's",
    )


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def resolve_output(args):
    """(format, output path) from --format and --output; a CLIError when they disagree."""
    fmt = args.format
    if args.int8:
        if fmt not in (None, "onnx") or (args.output and not args.output.lower().endswith(".onnx")):
            raise CLIError("--int8 writes an ONNX file: name --output .onnx (default MODEL.int8.onnx)")
        return "onnx", Path(args.output) if args.output else Path(args.model_fn).with_suffix(".int8.onnx")
    if args.output is None:
        fmt = fmt or "onnx"
        return fmt, Path(args.model_fn).with_suffix("." + fmt)
    output = Path(args.output)
    from_extension = FORMATS.get(output.suffix.lower())
    if fmt is None and from_extension is None:
        raise CLIError(f"cannot tell the format from --output {str(output)!r}: name it .onnx or .pt2, or give --format")
    if fmt is not None and from_extension is not None and fmt != from_extension:
        raise CLIError(f"--output {str(output)!r} has the extension of {from_extension}, but --format is {fmt}")
    return fmt or from_extension, output


def check_batch(ckpt, args):
    """(images, where they came from, the image files they were chosen from): up to --check_images
    preprocessed images spread over the sorted files of --data_dir or of the training data's test folder;
    random tensors when there is no folder."""
    folder = Path(args.data_dir) if args.data_dir else None
    if folder is not None and not folder.is_dir():
        raise CLIError(f"--data_dir {str(folder)!r} does not exist or is not a folder")
    saved, files, why = ckpt.get("args", {}), [], None  # why: the training data cannot be used
    if folder is None and saved.get("labels_csv"):  # the table's test rows, else all of them
        try:
            parts = labels_csv.read_labels(
                saved["labels_csv"], saved.get("image_root"), warn=lambda *a: None, task=tasks.for_checkpoint(ckpt)
            )
            folder, files = Path(saved["labels_csv"]), sorted(f for f, _ in labels_csv.test_rows(parts) or [])
            why = None if files else f"the CSV the model was trained with ({folder}) has no test rows"
        except CLIError as e:
            folder, why = None, f"the CSV the model was trained with: {e}"
    elif folder is None:
        try:
            folder = data_loader.dataset_root(saved.get("data_dir"), saved.get("dataset_name")) / "test"
        except CLIError as e:
            folder, why = None, str(e)
        if folder is not None and not folder.is_dir():
            why = f"the training data's test folder {str(folder)!r} does not exist"
    if not files:
        files = data_loader.list_images(folder) if folder is not None and folder.is_dir() else []
    if files:
        tf = data_loader.Preprocess.of(ckpt).transform()
        step = max(1, len(files) // args.check_images)  # evenly spread: several classes show
        images = []
        for f in files[::step]:
            try:
                images.append(tf(data_loader.load_rgb(f)))
            except Exception:  # an unreadable file: the check uses the others
                continue
            if len(images) == args.check_images:
                break
        if images:
            return torch.stack(images), f"{len(images)} images of {folder}", files
    if args.data_dir:
        raise CLIError(
            f"--data_dir {args.data_dir!r} holds no readable images ({', '.join(data_loader.IMG_EXTENSIONS)})"
        )
    print(
        f"warning: the check runs on random tensors, not on images: {why or f'no readable images in {folder}'} "
        "(--data_dir DIR checks on yours)",
        file=sys.stderr,
    )
    size = ckpt["input_size"]
    generator = torch.Generator().manual_seed(0)
    return torch.randn(args.check_images, 3, size, size, generator=generator), f"{args.check_images} random tensors", []


def write_onnx(model, example, path, meta, opset, exporter):
    """The model as ONNX at `path`: input 'input' (N, 3, H, W) float32, output 'logits' (and 'ood_score'
    for an ood.ScoredModel), N dynamic, and `meta` as metadata_props."""
    import onnx

    opset = opset or DEFAULT_OPSET[exporter]
    outputs = ["logits", "ood_score"] if isinstance(model, ood.ScoredModel) else ["logits"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice, tracer notes
            if exporter == "dynamo":
                program = torch.onnx.export(
                    model,
                    (example,),
                    input_names=["input"],
                    output_names=outputs,
                    dynamic_shapes=({0: "batch"},),
                    opset_version=opset,
                    dynamo=True,
                    verbose=False,
                )
                proto = program.model_proto
            else:
                buffer = io.BytesIO()
                torch.onnx.export(
                    model,
                    (example,),
                    buffer,
                    input_names=["input"],
                    output_names=outputs,
                    dynamic_axes={name: {0: "batch"} for name in ["input"] + outputs},
                    opset_version=opset,
                    dynamo=False,
                )
                proto = onnx.load_from_string(buffer.getvalue())
        fold_pads_into_convs(proto)
        onnx.helper.set_model_props(proto, meta)
        onnx.checker.check_model(proto)
    except CLIError:
        raise
    except Exception as e:  # the exporter's many ways to refuse a model or an opset
        raise CLIError(f"the {exporter} ONNX exporter failed at opset {opset} ({describe_error(e, 200)})") from None
    if proto.ByteSize() >= 2**31:
        raise CLIError("the model is over ONNX's 2 GB single-file limit; export it with --format pt2")
    path.write_bytes(proto.SerializeToString())


def constant_value(graph, name):
    """The value of tensor `name` when it is computed from constants alone (an initializer, or Constant nodes
    through shape arithmetic: the exporter's own form of a padding list), else None."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    initializers = {i.name: i for i in graph.initializer}
    if name in initializers:
        return onnx.numpy_helper.to_array(initializers[name])
    producer = {out: node for node in graph.node for out in node.output}
    needed, stack, used = [], [name], set()
    while stack:
        tensor = stack.pop()
        if tensor in initializers:
            used.add(tensor)
            continue
        node = producer.get(tensor)
        if node is None:  # a graph input: not a constant
            return None
        if node not in needed:
            needed.append(node)
            stack.extend(i for i in node.input if i)
    order = [n for n in graph.node if n in needed]  # the graph's topological order
    out = onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None)
    sub = onnx.helper.make_graph(order, "constant", [], [out], [initializers[i] for i in used])
    model = onnx.helper.make_model(sub, opset_imports=[onnx.helper.make_opsetid("", 17)])
    try:
        return ReferenceEvaluator(model).run(None, {})[0]
    except Exception:  # noqa: BLE001 - an op the reference evaluator lacks: left as it is
        return None


def fold_pads_into_convs(proto):
    """Each zero padding of the height and width that feeds one convolution alone becomes that convolution's own
    (possibly uneven) padding: EfficientNet-Lite's TensorFlow 'SAME' padding is exported as a Pad before each
    strided convolution, which onnxruntime does not fold (its computed padding list, and its empty third input);
    on the int8 build, each Pad also needed its input dequantized and its output quantized again, a third of the
    time of a batch. Same numbers; returns how many were folded."""
    import numpy as np
    import onnx

    graph, folded = proto.graph, 0
    readers = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    for pad in [n for n in graph.node if n.op_type == "Pad"]:
        mode = next((onnx.helper.get_attribute_value(a) for a in pad.attribute if a.name == "mode"), b"constant")
        fill = constant_value(graph, pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(1)
        pads = constant_value(graph, pad.input[1]) if len(pad.input) > 1 else None
        after = readers.get(pad.output[0], [])
        if mode != b"constant" or fill is None or np.any(fill != 0) or pads is None or len(pads) != 8:
            continue
        if len(after) != 1 or after[0].op_type != "Conv" or pad.output[0] in outputs or np.any(pads < 0):
            continue
        conv, pads = after[0], [int(p) for p in pads]
        if any(pads[i] for i in (0, 1, 4, 5)) or any(
            a.name == "auto_pad" and a.s not in (b"", b"NOTSET") for a in conv.attribute
        ):
            continue
        old = next((list(a.ints) for a in conv.attribute if a.name == "pads"), [0, 0, 0, 0])
        new = [old[0] + pads[2], old[1] + pads[3], old[2] + pads[6], old[3] + pads[7]]
        kept = [a for a in conv.attribute if a.name != "pads"]
        del conv.attribute[:]
        conv.attribute.extend([*kept, onnx.helper.make_attribute("pads", new)])
        conv.input[0] = pad.input[0]
        graph.node.remove(pad)
        folded += 1
    if folded:  # the padding lists' arithmetic, now read by nothing
        while True:
            read = {i for n in graph.node for i in n.input} | outputs
            dead = [n for n in graph.node if not any(o in read for o in n.output)]
            if not dead:
                break
            for node in dead:
                graph.node.remove(node)
    return folded


def write_pt2(model, example, path, meta):
    """The model as a torch.export program at `path` (batch axis dynamic), `meta` as its extra files."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        torch.export.save(program, str(path), extra_files=meta)
    except Exception as e:
        raise CLIError(f"torch.export failed ({describe_error(e, 200)})") from None


def load_for_check(fmt, path, keys):
    """The written file, loaded the way a consumer loads it: (metadata strings, callable images -> logits,
    or (logits, ood_score))."""
    if fmt == "onnx":
        model = exported_model.OnnxModel(path)
        return model.metadata(), model
    meta = dict.fromkeys(keys, "")
    program = torch.export.load(str(path), extra_files=meta)
    return meta, program.module()


def outputs_of(model, images):
    """(logits, ood_score or None) of a model with one output or two (ood.ScoredModel, its exports)."""
    out = model(images)
    return (out[0].float(), out[1].float()) if isinstance(out, (tuple, list)) else (out.float(), None)


def reading_of(ckpt, task=None):
    """(logits -> the probabilities predict.py reads, probabilities -> its decision per row) of the checkpoint's
    calibration: softmax(logits / T) and the top class, or a multi-label model's sigmoid per class with its
    per-class temperatures and the set of classes reaching their thresholds."""
    calibration = (task or tasks.for_checkpoint(ckpt)).calibration_of(ckpt)
    return calibration.probabilities, calibration.decide


def compare(model, exported, images, probabilities, decide=lambda probs: probs.argmax(1)):
    """(largest probability difference, agreements of the decisions (top-1, or a multi-label model's sets),
    largest relative ood_score difference or None) of the export against the PyTorch model, over the whole
    batch and over a batch of one."""
    with torch.inference_mode():
        logits, scores = outputs_of(model, images)
        ref = probabilities(logits)
        try:
            (got, got_scores), (one, one_scores) = outputs_of(exported, images), outputs_of(exported, images[:1])
        except Exception as e:  # onnxruntime or the loaded program refuses the batch
            raise CLIError(
                f"the export does not run on batches of {len(images)} and 1 ({describe_error(e, 200)}); "
                "nothing was written"
            ) from None
        got, one = probabilities(got), probabilities(one)
    if got.shape != ref.shape or one.shape != ref[:1].shape or (got_scores is None) != (scores is None):
        raise CLIError(
            f"the export gives shapes {tuple(got.shape)} and {tuple(one.shape)}, not {tuple(ref.shape)}"
            + ("" if (got_scores is None) == (scores is None) else ", or lacks the ood_score output")
        )
    diff = max(float((got - ref).abs().max()), float((one - ref[:1]).abs().max()))
    score_diff = None
    if scores is not None:  # relative to the score's size: mahalanobis distances run into the hundreds
        scale = scores.abs().clamp(min=1)
        score_diff = max(
            float(((got_scores.reshape(-1) - scores) / scale).abs().max()),
            float(((one_scores.reshape(-1) - scores[:1]) / scale[:1]).abs().max()),
        )
    agree = (decide(got) == decide(ref)).reshape(len(ref), -1).all(1)
    return diff, int(agree.sum()), score_diff


def other_ways(fmt, args):
    """What to try when the export disagrees with the PyTorch model: the other exporter, the other format."""
    if fmt == "pt2":
        return "try --format onnx"
    other = "dynamo" if args.exporter == "torchscript" else "torchscript"
    return f"try --exporter {other}, or --format pt2"


def main(args):
    if args.check_images <= 0:
        raise CLIError("--check_images must be a positive number")
    if args.qat < 0 or (args.qat and not args.int8):
        raise CLIError("--qat EPOCHS trains for the int8 build: give it with --int8, as 0 or more epochs")
    fmt, output = resolve_output(args)
    if fmt == "pt2" and (args.opset is not None or args.exporter != "torchscript"):
        raise CLIError("--opset and --exporter are for ONNX, not the pt2 format")
    ckpt = model_loader.load_checkpoint(args.model_fn)
    task = tasks.for_checkpoint(ckpt)  # one label per image, or several: how the outputs are read
    model, head = model_loader.model_from_checkpoint(ckpt, args.model_fn)
    model = with_outputs(model.eval(), head, ckpt, args.model_fn)
    meta = exported_model.export_metadata(ckpt)
    images, source, files = check_batch(ckpt, args)
    paths = RunPaths().reads(args.model_fn, "the checkpoint --model_fn").reads_images(files)
    if not args.data_dir:
        paths.reads(ckpt.get("args", {}).get("labels_csv"), "the CSV of labels the model was trained with")
    paths.writes(output, "--output", replaces=fmt).check()
    example = images[:EXAMPLE_BATCH] if len(images) >= EXAMPLE_BATCH else images.expand(EXAMPLE_BATCH, -1, -1, -1)
    calibration = int8_inputs(args, ckpt, files) if args.int8 else None
    start = time.perf_counter()
    stop = StopFlag().install()  # Ctrl-C during the export: finish it, then remove it instead of renaming it
    try:
        with atomic_path(output) as tmp:  # checked before it is renamed into place; removed when anything fails
            if args.int8:
                with tempfile.TemporaryDirectory() as folder:
                    fp32 = Path(folder) / "fp32.onnx"
                    write_checked(fmt, fp32, model, example, meta, images, source, ckpt, task, args)
                    trained = Path(folder) / "qat.onnx" if args.qat else None
                    if not trained or quantization_aware(trained, example, meta, calibration[0], ckpt, args, stop):
                        figures = build_int8(fp32, tmp, meta, calibration, ckpt, args, trained)
            else:
                write_checked(fmt, tmp, model, example, meta, images, source, ckpt, task, args)
            seconds = time.perf_counter() - start
            if stop.requested:  # SystemExit still removes the temporary file
                print(f"interrupted; {output} was not written", file=sys.stderr)
                sys.exit(stop.exit_status())
    finally:
        stop.restore()
    size_mb = output.stat().st_size / 2**20
    kind = "int8 ONNX" if args.int8 else fmt
    print(
        f"exported {ckpt['model_name']} ({len(ckpt['class_names'])} classes, {ckpt['input_size']} px) as {kind} "
        f"in {seconds:.1f}s -> {output} ({size_mb:.1f} MB)"
    )
    if args.int8:
        print(figures.line())


def with_outputs(model, head, ckpt, path):
    """The model as it is exported: with an out-of-distribution reference (ood.py), a second output, ood_score,
    computed in the graph (the reference as a constant)."""
    return (ood.scored_model(model, head, ckpt, path) if "ood" in ckpt else model).eval()


def quantization_aware(path, example, meta, images, ckpt, args, stop):
    """--qat: the fp32 ONNX file of the model trained for int8 (qat.distill on the calibration images) at `path`,
    which build_int8 quantizes; False when Ctrl-C stopped the training. The model is built afresh from the
    checkpoint: the exported one carries the out-of-distribution score's hook, which a trained copy would inherit
    (and feed, every batch, into the first model's list)."""
    model, head = model_loader.model_from_checkpoint(ckpt, args.model_fn)
    weights = int8.weight_format(args.int8_weights)
    log = print if args.verbose >= 1 else (lambda *a: None)
    unsimulated = qat.unsimulated(model, head)
    if unsimulated:
        print(
            f"warning: --qat simulates int8 in convolutions; the {unsimulated} linear and attention "
            f"layers of {ckpt['model_name']}'s backbone are not simulated, so the training can gain little",
            file=sys.stderr,
        )
    try:
        trained, _ = qat.distill(model.eval(), head, images, args.qat, int8.QMAX[weights], lambda: stop.requested, log)
    except FloatingPointError as e:
        raise CLIError(f"--qat: {e}; nothing was written; build without --qat") from None
    if trained is None:
        return False
    write_onnx(with_outputs(trained, head, ckpt, args.model_fn), example, path, meta, args.opset, args.exporter)
    return True


def write_checked(fmt, path, model, example, meta, images, source, ckpt, task, args):
    """The export at `path`, read back as a consumer reads it and held against the PyTorch model on `images`:
    a CLIError (nothing written) when its metadata or its probabilities differ."""
    if fmt == "onnx":
        write_onnx(model, example, path, meta, args.opset, args.exporter)
    else:
        write_pt2(model, example, path, meta)
    written, exported = load_for_check(fmt, path, meta)
    if {k: written.get(k) for k in meta} != meta:
        raise CLIError(f"the metadata read back from the {fmt} file differs from the checkpoint's")
    diff, agree, score_diff = compare(model, exported, images, *reading_of(ckpt, task))
    if args.verbose >= 1:
        print(
            f"check on {source}: max probability difference {diff:.2e}, "
            f"{task.decision_name} agreement {agree}/{len(images)}"
            + ("" if score_diff is None else f", max relative ood_score difference {score_diff:.2e}")
        )
    if not diff <= TOLERANCE:  # also catches NaN
        raise CLIError(
            f"the {fmt} export disagrees with the PyTorch model: probabilities differ by up to "
            f"{diff:.2e} (allowed {TOLERANCE:g}); nothing was written; {other_ways(fmt, args)}"
        )
    if score_diff is not None and not score_diff <= TOLERANCE:
        raise CLIError(
            f"the {fmt} export's ood_score differs from the PyTorch model's by up to "
            f"{score_diff:.2e} (relative; allowed {TOLERANCE:g}); nothing was written; "
            f"{other_ways(fmt, args)}"
        )


def int8_inputs(args, ckpt, files):
    """(calibration images, gate images, gate labels or None) of --int8, before any export: the training images
    (or --calibration_dir's) through the eval transform, and up to --gate_images held-out files spread over the
    sorted list, labelled by their class folders when every one is in one."""
    for name in ("calibration_images", "gate_images"):
        if getattr(args, name) <= 0:
            raise CLIError(f"--{name} must be a positive number")
    for name in ("min_agreement", "min_ood_agreement"):
        if not 0 <= getattr(args, name) <= 1:
            raise CLIError(f"--{name} must be in [0, 1]; got {getattr(args, name)}")
    if not files:
        raise CLIError(
            "--int8 is held against fp32 on real images: the test images of the training data cannot be "
            "found from here; give a folder of them with --data_dir"
        )
    preprocess = data_loader.Preprocess.of(ckpt)
    if args.calibration_dir:
        found = data_loader.list_images(args.calibration_dir) if Path(args.calibration_dir).is_dir() else []
        if not found:
            raise CLIError(f"--calibration_dir {args.calibration_dir!r} holds no images")
        chosen = int8.spread([(f, 0) for f in found], args.calibration_images, 0, key=lambda s: str(s[1]))
    else:
        chosen = int8.training_files(ckpt, args.calibration_images)
    step = max(1, len(files) // args.gate_images)
    gate_files = [str(f) for f in files[::step][: args.gate_images]]
    return (
        int8.load_batch(chosen, preprocess),
        int8.load_batch(gate_files, preprocess),
        int8.labels_of(gate_files, ckpt),
    )


def build_int8(fp32, out, meta, calibration, ckpt, args, trained=None):
    """The int8 build of the checked fp32 export (or of `trained`, --qat's fp32 file) at `out`, held against the
    fp32 export, with the gate's figures in its metadata; a CLIError (nothing written) when the gate refuses it.
    --calibration auto tries the methods in turn until one passes."""
    import onnx

    calibration_images, gate_images, labels = calibration
    methods = int8.METHODS if args.calibration == "auto" else (args.calibration,)
    tried, made = [], []  # (figures, candidate file) of each build measured; every candidate file written
    weights = int8.weight_format(args.int8_weights)
    gate = (args.max_drop, args.min_agreement, args.min_ood_agreement)
    try:
        for method in methods:
            candidate = out.with_name(f"{out.stem}.{method}.onnx")
            made.append(candidate)  # removed in the end, whatever fails on the way
            try:
                int8.quantize(trained or fp32, candidate, calibration_images, method, weights)
            except Exception as e:  # noqa: BLE001 - onnxruntime's calibrators refuse some activations (a constant one)
                print(f"int8, {method} calibration failed ({describe_error(e, 160)})", file=sys.stderr)
                continue
            used = int8.calibration_count(method, len(calibration_images))
            own = None if args.calibration_dir else calibration_images  # the model's training images
            figures = int8.compare(fp32, candidate, gate_images, labels, ckpt, method, used, weights, args.qat, own)
            tried.append((figures, candidate))
            if args.verbose >= 1:
                print(f"int8, {method} calibration: " + figures.line().split(": ", 1)[1].split("; speed-up")[0])
            refused = int8.failure(figures, *gate)
            if not refused:
                break
            if args.verbose >= 1 and method != methods[-1]:  # auto: say why before the next method is tried
                print(f"int8, {method} calibration refused by the gate: {refused}; trying the next method")
        if not tried:
            raise CLIError(f"int8: every calibration tried failed ({', '.join(methods)}); nothing was written")
        figures, chosen = int8.best_of(tried, *gate)
        reason = int8.failure(figures, *gate)
        if reason:
            names = ", ".join(f.calibration for f, _ in tried)
            hint = "try --calibration with another method" if len(tried) == 1 else "the fp32 export is the safe choice"
            if not args.qat:
                hint += ", or train the model for int8 first with --qat 6"
            if "--min_ood_agreement" in reason:
                hint += "; --min_ood_agreement 0 if you use neither in_distribution nor --reject_ood"
            raise CLIError(f"{reason} (calibration tried: {names}); nothing was written; {hint}")
        int8.measure_speed(figures, fp32, chosen, gate_images)
        proto = onnx.load(str(chosen))
        onnx.helper.set_model_props(proto, {**meta, **int8.metadata(figures)})  # the threshold fit_ood kept
        out.write_bytes(proto.SerializeToString())
        if labels is None and args.verbose >= 1:
            print("int8: no labelled held-out images (their folders are not the classes): only the agreement was gated")
        note = int8.speed_note(figures)
        if note:
            print(note)
        if args.verbose >= 1:
            print(f"int8: quantized the backbone; kept in fp32: {int8.KEPT_FP32}")
        if args.verbose >= 1 and weights == "s7" and args.int8_weights == "auto":
            print(
                "int8: 7-bit weights: this x86 CPU has no VNNI (or its flags cannot be read), where 8-bit weights "
                "can saturate; --int8_weights s8 builds for CPUs with VNNI"
            )
        return figures
    finally:
        for path in made:
            path.unlink(missing_ok=True)


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
