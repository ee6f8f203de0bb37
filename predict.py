"""Predict classes for new images with a checkpoint written by train.py: result.csv (one row per
image) and a picture of sample predictions. The model, class names and preprocessing come from the
checkpoint; no model flag is needed."""
import cli  # before torch: Ctrl-C while the imports below load is one quiet line, not a traceback

if __name__ == "__main__":
    cli.exit_quietly_on_stop_signals()

import csv
import time
from pathlib import Path

import torch

import data_loader
import model_loader
from cli import ArgumentParser, CLIError, StopFlag, flag_adder, run_cli  # noqa: E402
from utils import (Compute, amp_dtype_for, atomic_open, bar, check_writable, resolve_device, save_confusion_matrix,
                   save_image_grid)

MAX_PROB_COLUMNS = 20  # above this many classes, top-k columns replace the per-class probabilities


def build_parser():
    p = ArgumentParser(description=__doc__)
    add = flag_adder(p)
    add("--model_fn", "--model_path", default="model.pth", help="checkpoint written by train.py, or an .onnx file "
        "written by export.py")
    add("--data_dir", default=None, help="an image file, or a folder searched recursively "
        "(default: test/ of the data set the checkpoint was trained on)")
    add("--output", default="result.csv", help="CSV with one row per image")
    add("--plot", default="predictions.png", help="figure of sample predictions (confusion matrix beside it)")
    add("--n_images", type=int, default=6, help="images in the figure")
    add("--show", action="store_true", help="also open the figure in a window")
    add("--topk", type=int, default=None, help="add the k best classes per image (default: 5 when there are "
        f"more than {MAX_PROB_COLUMNS} classes)")
    add("--batch_size", type=int, default=64)
    add("--num_workers", type=int, default=None, help="DataLoader worker processes (default: CPUs - 1 up to 8 "
        "with a GPU; on the CPU 0 up to 4 cores, else a quarter of them)")
    add("--gpu_id", type=int, default=None, help="CUDA device; -1 = CPU (default: GPU 0, else MPS, else CPU)")
    add("--amp", action="store_true", help="bf16/fp16 autocast")
    add("--verbose", type=int, default=1, help="0 = summary only, 1 = also a progress bar")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def default_inputs(ckpt):
    """test/ of the data set the checkpoint was trained on."""
    saved = ckpt.get("args", {})
    root = data_loader.dataset_root(saved.get("data_dir"), saved.get("dataset_name"))
    if not (root / "test").is_dir():
        raise CLIError(f"no --data_dir given and the training data's test folder {str(root / 'test')!r} does not exist")
    return root / "test"


def find_inputs(path, class_names):
    """[(path, label)]: label is the class index when the file's folder is named after a class, else -1."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = data_loader.list_images(path)
        if not files:
            raise CLIError(f"no image files ({', '.join(data_loader.IMG_EXTENSIONS)}) under {str(path)!r}")
    else:
        raise CLIError(f"--data_dir {str(path)!r} does not exist")
    index = {c: i for i, c in enumerate(class_names)}
    return [(str(f), index.get(f.parent.name, -1)) for f in files]


def csv_columns(class_names, topk, labelled):
    columns = ["file_dir", "predict", "confidence"]
    if len(class_names) <= MAX_PROB_COLUMNS:
        columns += [f"prob_{c}" for c in class_names]
    columns += [f"top{i + 1}_{kind}" for i in range(topk) for kind in ("class", "prob")]
    return columns + (["label"] if labelled else []) + ["error"]


class Tally:
    """Counts for accuracy, per-class recall and the confusion matrix."""

    def __init__(self, n):
        self.matrix = [[0] * n for _ in range(n)]

    def add(self, label, pred):
        self.matrix[label][pred] += 1

    def report(self, class_names):
        total = sum(map(sum, self.matrix))
        correct = sum(self.matrix[i][i] for i in range(len(class_names)))
        recalls = {c: (self.matrix[i][i] / sum(self.matrix[i]) if sum(self.matrix[i]) else None)
                   for i, c in enumerate(class_names)}
        return total, correct, recalls


def main(args):
    if args.batch_size <= 0 or args.n_images < 0 or (args.num_workers or 0) < 0 or (args.topk is not None and args.topk <= 0):
        raise CLIError("--batch_size and --topk must be positive; --n_images and --num_workers 0 or more")
    if model_loader.is_exported(args.model_fn):  # an ONNX file of export.py: onnxruntime runs it
        ckpt, model = model_loader.load_exported(args.model_fn)
    else:
        ckpt = model_loader.load_checkpoint(args.model_fn)
        model, _ = model_loader.model_from_checkpoint(ckpt, args.model_fn)
    class_names = ckpt["class_names"]
    inputs = find_inputs(args.data_dir or default_inputs(ckpt), class_names)
    check_writable(args.output, "--output")
    if args.n_images:
        check_writable(args.plot, "--plot")
    device = resolve_device(args.gpu_id)
    if isinstance(model, model_loader.OnnxModel):  # onnxruntime optimizes its graph itself; batches stay on the CPU
        model, device, channels_last = model.to(device), torch.device("cpu"), False
    else:
        channels_last = model_loader.is_convolutional(model)
        model = model_loader.optimize_for_inference(model.to(device), channels_last)
    compute = Compute(device, amp_dtype_for(device, args.amp, print), channels_last, progress=args.verbose >= 1)

    tf = data_loader.build_transforms(ckpt["input_size"], ckpt["resize_size"], ckpt["mean"], ckpt["std"], train=False)
    dataset = data_loader.ImageDataset(inputs, tf)
    workers = data_loader.default_num_workers(device.type) if args.num_workers is None else args.num_workers
    loader = data_loader.make_loader(dataset, args.batch_size, None, workers, pin_memory=device.type == "cuda")
    topk = min(args.topk or (5 if len(class_names) > MAX_PROB_COLUMNS else 0), len(class_names))
    labelled = any(label >= 0 for _, label in inputs)
    columns = csv_columns(class_names, topk, labelled)
    tally, samples_for_plot = Tally(len(class_names)), []
    n_plot = min(args.n_images, len(inputs))  # evenly spread over the sorted inputs, so several folders show
    plot_at = {round(i * (len(inputs) - 1) / max(1, n_plot - 1)) for i in range(n_plot)}
    n_done = n_bad = 0
    stop = StopFlag().install()
    start = time.perf_counter()
    try:
        with atomic_open(args.output, "w", newline="", encoding="utf-8-sig") as f:  # utf-8-sig: Excel-friendly
            writer = csv.writer(f)
            writer.writerow(columns)
            with torch.inference_mode():
                for batch in bar(loader, compute, "predict"):
                    rows = {}
                    if batch.labels.numel():
                        with compute.autocast():
                            probs = model(compute.to_device(batch.images)).float().softmax(1).cpu()
                        for index, p in zip(batch.indices.tolist(), probs):
                            rows[index] = prediction_row(inputs[index], p, class_names, topk, labelled)
                            pred, label = int(p.argmax()), inputs[index][1]
                            if label >= 0:
                                tally.add(label, pred)
                            if index in plot_at:
                                samples_for_plot.append((inputs[index], pred, float(p[pred])))
                    for bad in batch.bad:
                        rows[bad.index] = error_row(inputs[bad.index], bad.reason, columns, class_names, labelled)
                    for index in sorted(rows):
                        writer.writerow(rows[index])
                    n_done += batch.labels.numel()
                    n_bad += len(batch.bad)
                    if stop.requested:
                        raise CLIError(f"interrupted after {n_done} images; {args.output} was not changed")
            if n_done == 0:
                raise CLIError(f"none of the {len(inputs)} images could be read; {args.output} was not changed")
    finally:
        stop.restore()
    seconds = time.perf_counter() - start
    print(f"predicted {n_done} images in {seconds:.1f}s ({n_done / max(seconds, 1e-9):.1f} img/s)"
          + (f"; {n_bad} unreadable (see the error column)" if n_bad else "") + f" -> {args.output}")
    if labelled:
        total, correct, recalls = tally.report(class_names)
        print(f"accuracy {correct / max(total, 1):.4f} ({correct}/{total} labelled images)")
        print("recall per class: " + ", ".join(f"{c} {r:.3f}" for c, r in recalls.items() if r is not None))
    if samples_for_plot:
        plot_predictions(samples_for_plot, class_names, ckpt, args.plot, args.show)
        print(f"figure -> {args.plot}")
        if labelled:
            confusion = Path(args.plot).with_name(f"{Path(args.plot).stem}_confusion.png")
            save_confusion_matrix(tally.matrix, class_names, confusion)
            print(f"confusion matrix -> {confusion}")


def prediction_row(sample, probs, class_names, topk, labelled):
    path, label = sample
    pred = int(probs.argmax())
    row = [path, class_names[pred], f"{float(probs[pred]):.6f}"]
    if len(class_names) <= MAX_PROB_COLUMNS:
        row += [f"{float(p):.6f}" for p in probs]
    if topk:
        values, indices = probs.topk(topk)
        for v, i in zip(values.tolist(), indices.tolist()):
            row += [class_names[i], f"{v:.6f}"]
    if labelled:
        row.append(class_names[label] if label >= 0 else "")
    return row + [""]


def error_row(sample, reason, columns, class_names, labelled):
    """An unreadable image: its path, its label when known, the reason; the prediction columns empty."""
    path, label = sample
    row = dict.fromkeys(columns, "")
    row.update(file_dir=path, error=reason)
    if labelled:
        row["label"] = class_names[label] if label >= 0 else ""
    return list(row.values())


def plot_predictions(samples, class_names, ckpt, path, show):
    """The images as the model saw them (resize + center crop), in real colours, titled with the
    prediction and its confidence; red when the folder name says otherwise."""
    show_tf = data_loader.display_transform(ckpt["input_size"], ckpt["resize_size"])
    images, titles, colors = [], [], []
    for (file, label), pred, confidence in samples:
        images.append(show_tf(data_loader.load_rgb(file)))
        wrong = label >= 0 and label != pred
        titles.append(f"{class_names[pred]} ({confidence:.2f})" + (f"\ntrue: {class_names[label]}" if wrong else ""))
        colors.append("red" if wrong else "black")
    save_image_grid(images, titles, colors, path, show=show)


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
