"""Predict classes for new images with a checkpoint written by train.py: result.csv (one row per
image) and a picture of sample predictions. The model, class names and preprocessing come from the
checkpoint; no model flag is needed."""

import cli  # before torch: Ctrl-C while the imports below load is one quiet line, not a traceback

if __name__ == "__main__":
    cli.exit_quietly_on_stop_signals()
    cli.check_installation()  # a torch/torchvision pair that does not match: one line, not a traceback

import csv
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

import data_loader
import data_loop
import evaluation
import explain
import int8
import labels_csv
import prediction_output
from cli import ArgumentParser, CLIError, StopFlag, flag_adder, run_cli  # noqa: E402
from prediction_figure import explain_row, plot_predictions
from predictor import MAX_PROB_COLUMNS, Predictor, Reading, load_model, prepare_model
from run_paths import RunPaths
from utils import (
    Progress,
    all_reduce_sum,
    atomic_open,
    bar,
    broadcast_from_main,
    dist_info_from_env,
    process_group,
    resolve_device,
    save_confusion_matrix,
)

EXAMPLES = """examples:
  python predict.py --model_fn model.pth                     # test/ of the training data -> result.csv
  python predict.py --model_fn model.pth --data_dir new_images --output new.csv --plot new.png
  python predict.py --model_fn model.pth --data_dir photo.jpg --gpu_id -1    # one image, on the CPU"""


def build_parser():
    p = ArgumentParser(description=__doc__, epilog=EXAMPLES)
    add = flag_adder(p)
    add(
        "--model_fn",
        "--model_path",
        default="model.pth",
        help="checkpoint written by train.py, or an .onnx file written by export.py",
    )
    add(
        "--data_dir",
        default=None,
        help="an image file, or a folder searched recursively "
        "(default: test/ of the data set the checkpoint was trained on)",
    )
    add(
        "--labels_csv",
        default=None,
        metavar="FILE",
        help="the images and their labels from a CSV (columns file, "
        "label, optional split: then its test rows), instead of --data_dir",
    )
    add(
        "--file_list",
        default=None,
        metavar="FILE",
        help="the images to predict, one path per line (or a CSV "
        "with a file column and no label column), in that order, instead of --data_dir; a missing or unreadable "
        "file is a row with the error column filled",
    )
    add(
        "--image_root",
        default=None,
        metavar="DIR",
        help="the folder --labels_csv's or --file_list's relative paths start from (default: the list's folder)",
    )
    add(
        "--output",
        default="result.csv",
        help="CSV with one row per image (while running, the rows so far are in OUTPUT.partial/)",
    )
    add(
        "--resume",
        action="store_true",
        help="go on from the rows of an interrupted run of the same command (its "
        "OUTPUT.partial/ folder): each image ends up in --output once",
    )
    add(
        "--plot",
        default=None,
        help="figure of sample predictions (confusion matrix beside it); default: predictions.png beside "
        "--output (in the current folder when that is inside the folder searched for images)",
    )
    add("--n_images", type=int, default=6, help="images in the figure")
    add("--show", action="store_true", help="also open the figure in a window")
    add(
        "--topk",
        type=int,
        default=None,
        help=f"add the k best classes per image (default: 5 when there are more than {MAX_PROB_COLUMNS} classes)",
    )
    speed_flags(add)
    reading_flags(add)
    data_loop_flags(add)
    return p


def speed_flags(add):
    add("--batch_size", type=int, default=64, help="images per forward pass (lower it if memory runs out)")
    add(
        "--num_workers",
        type=int,
        default=None,
        help="DataLoader worker processes (default: CPUs - 1 up to 8 "
        "with a GPU; on the CPU 0 up to 4 cores, else a quarter of them)",
    )
    add("--gpu_id", type=int, default=None, help="CUDA device; -1 = CPU (default: GPU 0, else MPS, else CPU)")
    add("--amp", action="store_true", help="bf16/fp16 autocast")
    add("--verbose", type=int, default=1, help="0 = summary only, 1 = also a progress bar")


def reading_flags(add):
    """The flags that change a row (predictor.Reading) and the heat maps."""
    add(
        "--threshold",
        type=float,
        default=None,
        help="in (0, 1]: rows whose calibrated confidence is below it are "
        "predicted as --unknown_label (their probabilities stay in the row); a multi-label model: one threshold "
        "for every class instead of the per-class ones fitted in training",
    )
    add(
        "--unknown_label",
        default="unknown",
        help="the prediction of rows below --threshold, or unlike the "
        "training images with --reject_ood; a multi-label model: also of images where no class reaches its "
        "threshold",
    )
    add(
        "--tta",
        action="store_true",
        help="test-time augmentation: average the probabilities of each image and its horizontal mirror image",
    )
    add(
        "--reject_ood",
        action="store_true",
        help="predict rows unlike the training images (in_distribution 0) as --unknown_label",
    )
    add(
        "--explain",
        default=None,
        metavar="DIR",
        help="Grad-CAM heat map of the predicted class per image: "
        "DIR/<image stem>.png (the map over the image) and DIR/heatmaps.npz (one float32 map in [0, 1] per "
        "image, at its own size, keyed by its file_dir); needs the .pth checkpoint",
    )


def data_loop_flags(add):
    """The features' outputs: the embeddings, the images most like one, the images to label first (data_loop.py)."""
    add(
        "--embeddings",
        metavar="FILE.npy",
        help="also write each row's penultimate features (the classifier's input) to FILE.npy: float32, one row "
        "per result.csv row in the same order (NaN for unreadable images); needs the .pth checkpoint",
    )
    add(
        "--similar_to",
        metavar="IMAGE",
        help="also write <output stem>_similar.csv: the --top input images most like IMAGE (cosine similarity of "
        "their features), most similar first",
    )
    add(
        "--top",
        type=int,
        default=None,
        metavar="K",
        help=f"how many images --similar_to lists (default {data_loop.TOP})",
    )
    add(
        "--rank_for_labelling",
        type=int,
        metavar="N",
        help="also write <output stem>_to_label.csv: N distinct images worth labelling first (uncertain ones, "
        "spread over feature space) with an empty label column; filled in, train.py --labels_csv reads it",
    )


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def csv_inputs(path, image_root, class_names, task):
    """[(path, label)] of a CSV of labels, read as the model's task: its test rows when it has a split column,
    else every row."""
    parts = labels_csv.read_labels(path, image_root, task=task)
    rows = labels_csv.test_rows(parts)
    if not rows:
        raise CLIError(f"--labels_csv {path} has a split column but no test rows to predict")
    return labels_csv.indexed(rows, class_names, path, "test" if None not in parts else "", task)


def default_inputs(ckpt, task):
    """test/ of the data set the checkpoint was trained on (a [(path, label)] list for a CSV of labels)."""
    saved = ckpt.get("args", {})
    if saved.get("labels_csv"):
        try:
            parts = labels_csv.read_labels(saved["labels_csv"], saved.get("image_root"), task=task)
        except CLIError as e:
            raise CLIError(
                f"no --data_dir or --labels_csv given, and the CSV the model was trained with: {e}"
            ) from None
        if "test" not in parts:
            raise CLIError(
                f"no --data_dir or --labels_csv given, and the CSV the model was trained with "
                f"({saved['labels_csv']}) has no test rows"
            )
        return labels_csv.indexed(parts["test"], ckpt["class_names"], saved["labels_csv"], "test", task)
    root = data_loader.dataset_root(saved.get("data_dir"), saved.get("dataset_name"))
    if not (root / "test").is_dir():
        raise CLIError(f"no --data_dir given and the training data's test folder {str(root / 'test')!r} does not exist")
    return root / "test"


def find_inputs(path, class_names, task):
    """[(path, label)]: label is the class index when the file's folder is named after a class, else -1 (always
    -1 for a multi-label model: a folder name does not say which other classes an image shows)."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = data_loader.list_images(path)
        if not files:
            raise CLIError(f"no image files ({', '.join(data_loader.IMG_EXTENSIONS)}) under {str(path)!r}")
    else:
        raise CLIError(f"--data_dir {str(path)!r} does not exist")
    index = task.folder_labels(class_names)
    return [(str(f), index.get(f.parent.name, -1)) for f in files]


def gather_inputs(args, ckpt, task):
    """([(path, label)], the folder searched for images or None, [(list or CSV read, what it is)]): --labels_csv's
    rows, --file_list's files, --data_dir's images, or the training data's test images."""
    if args.image_root and not (args.labels_csv or args.file_list):
        raise CLIError("--image_root goes with --labels_csv or --file_list")
    if sum(bool(a) for a in (args.labels_csv, args.data_dir, args.file_list)) > 1:
        raise CLIError("give one of --labels_csv, --data_dir and --file_list")
    class_names = ckpt["class_names"]
    searched, lists = None, []  # the folder searched for images, when one was; the lists and CSVs read
    if args.file_list:  # unlabelled, in the list's order
        lists = [(args.file_list, "the list of images --file_list")]
        return [(f, -1) for f in labels_csv.read_file_list(args.file_list, args.image_root)], None, lists
    if args.labels_csv:
        inputs = sorted(csv_inputs(args.labels_csv, args.image_root, class_names, task))  # by path
        lists = [(args.labels_csv, "the CSV of labels --labels_csv")]
    elif args.data_dir:
        inputs = find_inputs(args.data_dir, class_names, task)
        searched = args.data_dir if Path(args.data_dir).is_dir() else None
    else:
        default = default_inputs(ckpt, task)
        inputs = sorted(default) if isinstance(default, list) else find_inputs(default, class_names, task)
        searched = None if isinstance(default, list) else default
        if isinstance(default, list):
            lists = [
                (
                    ckpt["args"]["labels_csv"],
                    "the CSV of labels the model was trained with (its test rows are the default input)",
                )
            ]
    inputs = [(str(f), y) for f, y in inputs]
    return inputs, searched, lists


def default_plot(output, searched):
    """predictions.png beside --output; in the current folder when that is inside the folder searched for images
    (--data_dir's, or the checkpoint's test folder), where a figure would be read as an input next time."""
    beside = Path(output).with_name("predictions.png")
    inside = searched and beside.parent.resolve().is_relative_to(Path(searched).resolve())
    return "predictions.png" if inside else str(beside)


def check_outputs(args, inputs, labelled, task, searched, lists=()):
    """(the report's path, the confusion matrix's path): one error line, before any work, when an output would
    replace something the run reads (the model, an image, a list or CSV) or another output, cannot be written, or
    would put images among the images read (run_paths.py)."""
    report_path = Path(args.output).with_name(f"{Path(args.output).stem}_report.csv")
    confusion_path = Path(args.plot).with_name(f"{Path(args.plot).stem}_confusion.png")
    paths = RunPaths().reads(args.model_fn, "the model --model_fn").reads_images([f for f, _ in inputs])
    for path, what in lists:
        paths.reads(path, what)
    paths.searches(searched, "the images")
    paths.writes(args.output, "--output", replaces="csv")
    if labelled:
        paths.writes(report_path, "--output's report", replaces="csv")
    if args.n_images:
        paths.writes(args.plot, "--plot", figure=True)
        if labelled and task.confusion_matrix:
            paths.writes(confusion_path, "--plot's confusion matrix", figure=True)
    paths.writes_folder(args.explain, "--explain")
    paths.reads(args.similar_to, "the image --similar_to")
    paths.writes(args.embeddings, "--embeddings", replaces="npy")
    if args.similar_to:
        paths.writes(data_loop.similar_path(args.output), "--similar_to's list", replaces="csv")
    if args.rank_for_labelling:
        paths.writes(data_loop.to_label_path(args.output), "--rank_for_labelling's list", replaces="csv")
    paths.check()
    return report_path, confusion_path


def main(args):
    if args.batch_size <= 0 or args.n_images < 0 or (args.num_workers or 0) < 0:
        raise CLIError("--batch_size must be positive; --n_images and --num_workers 0 or more")
    reading = Reading(args.threshold, args.unknown_label, args.tta, args.reject_ood, args.topk)
    dist = dist_info_from_env()  # under torchrun: this process's rank; each takes a share of the images
    if args.explain and (args.resume or dist.enabled):
        raise CLIError("--explain runs in one process from the start: without torchrun and --resume")
    ckpt, model, head = load_model(args.model_fn, bool(args.explain))
    predictor = Predictor(ckpt, model, None, reading)  # checks the settings against the model before any work
    inputs, searched, lists = gather_inputs(args, ckpt, predictor.task)
    labelled = any(label != -1 for _, label in inputs)
    args.plot = args.plot or default_plot(args.output, searched)
    report_path, confusion_path = check_outputs(args, inputs, labelled, predictor.task, searched, lists)
    asked = data_loop.Asked(
        args.output, args.embeddings, args.similar_to, args.top, args.rank_for_labelling, data_loop.train_flags_of(ckpt)
    )
    query = asked.check(len(inputs))
    if asked.features and head is None:
        predictor.keep_features(head)  # an ONNX model: the error line
    device = resolve_device(args.gpu_id, dist.local_rank)
    predictor.model, predictor.compute, predictor.cam = prepare_model(
        ckpt,
        model,
        head,
        args.model_fn,
        device,
        args.amp,
        bool(args.explain),
        dist,
        progress=dist.is_main and args.verbose >= 1,
        log=print if dist.is_main else None,
    )
    if asked.features:
        predictor.keep_features(head)
    columns = predictor.columns(labelled, bool(args.explain))
    partial = prediction_output.PartialRun(args.output, run_manifest(args, inputs, columns, asked), len(inputs))
    partial.check(args.resume)  # before any work: one error line, nothing changed
    n_plot = min(args.n_images, len(inputs))  # evenly spread over the sorted inputs, so several folders show
    plot_at = {round(i * (len(inputs) - 1) / max(1, n_plot - 1)) for i in range(n_plot)}
    rows = Rows(args, predictor, columns, labelled, inputs)
    unchanged = f"{args.output} was not " + ("changed" if Path(args.output).exists() else "written")  # if we stop
    compute = predictor.compute
    stop = StopFlag().install()
    compute.stop = stop
    start = time.perf_counter()
    try:
        with process_group(dist, compute.device):
            n_new, stopped, maps = predict_shares(partial, rows, compute, args, plot_at)
    finally:
        stop.restore()
    if stopped:  # like train.py: status 130 (143 for SIGTERM)
        if args.explain:  # heat maps are not resumable: no rows kept either
            partial.remove()
            kept = ""
        else:
            kept = f"; the rows so far are in {partial.folder}: run the same command with --resume to go on"
        if dist.is_main:
            print(f"interrupted after {n_new} images; {unchanged}{kept}", file=sys.stderr)
        sys.exit(stop.exit_status())
    if not dist.is_main:
        return
    seconds = time.perf_counter() - start
    store = data_loop.FeatureStore(len(inputs), args.embeddings) if asked.features else None
    summary = write_result(partial, args.output, columns, rows, plot_at, maps, unchanged, store)
    print_results(args, predictor, summary, (n_new, seconds), rows.explained, (labelled, report_path, confusion_path))
    if store is not None:
        asked.write(store, [f for f, _ in inputs], None if query is None else predictor.features_of(query))


def run_manifest(args, inputs, columns, asked):
    """What a partial run's rows depend on, so that --resume goes on only with the same: the model file's bytes,
    the input list, the columns and the flags that change a row."""
    return {
        "model": prediction_output.file_digest(args.model_fn),
        "inputs": prediction_output.inputs_digest(inputs),
        "n_inputs": len(inputs),
        "columns": columns,
        "flags": {
            "threshold": args.threshold,
            "unknown_label": args.unknown_label,
            "tta": args.tta,
            "reject_ood": args.reject_ood,
            "amp": args.amp,
        }
        | ({"embeddings, --similar_to or --rank_for_labelling": True} if asked.features else {}),  # rows with features
    }


class Rows:
    """A batch's images -> its rows (prediction_output.pack_row), as the Predictor reads them; with --explain, the
    heat maps written beside them."""

    def __init__(self, args, predictor, columns, labelled, inputs):
        self.args, self.predictor, self.columns, self.labelled, self.inputs = args, predictor, columns, labelled, inputs
        self.task, self.ckpt, self.class_names = predictor.task, predictor.ckpt, predictor.class_names
        self.explained = explain.Explanations(args.explain, [f for f, _ in inputs]) if args.explain else nullcontext()

    def of_batch(self, batch, compute, maps_at):
        """The packed rows of a batch (unreadable files as error rows); the heat maps of --explain's rows whose
        index is in maps_at (a dict filled here: the figure's images)."""
        args, predictor, packed = self.args, self.predictor, []
        if batch.labels.numel():
            out = predictor.outputs(batch.images, maps=bool(args.explain))
            for i, (index, p, pred) in enumerate(zip(batch.indices.tolist(), out.probs, out.decisions)):
                cells = predictor.row(self.inputs[index], p, pred, out.score(i), self.labelled)
                if out.maps is not None:
                    cells.insert(
                        self.columns.index("heatmap"),
                        explain_row(
                            self.explained,
                            self.inputs[index],
                            out.maps[i],
                            pred,
                            p,
                            out.unlike[i],
                            self.class_names,
                            self.ckpt,
                            args,
                            self.task,
                        ),
                    )
                    if index in maps_at:
                        maps_at[index] = out.maps[i]
                features = None if out.features is None else out.features[i].numpy()
                packed.append(prediction_output.pack_row(index, cells, pred, p.numpy(), out.unlike[i], features))
        for bad in batch.bad:
            packed.append(
                prediction_output.pack_row(
                    bad.index, predictor.error_row(self.inputs[bad.index], bad.reason, self.columns, self.labelled)
                )
            )
        return sorted(packed)


def predict_shares(partial, rows, compute, args, plot_at):
    """This process's share of the images not yet in the partial folder, predicted and appended to its part file a
    batch at a time. Returns (images predicted here, stopped by a signal, {index: heat map} of the figure's
    images with --explain). Every process runs as many steps as the largest share, so that they poll the stop
    flag together."""
    dist, device = compute.dist, compute.device
    done = torch.from_numpy(partial.open()) if dist.is_main else torch.zeros(partial.n, dtype=torch.uint8)
    done = broadcast_from_main(done, dist, device)  # rank 0 read (and repaired) the folder
    remaining = np.flatnonzero(done.numpy() == 0)  # ascending input indices
    mine = prediction_output.share(remaining, dist.rank, dist.world_size)
    steps = math.ceil(len(prediction_output.share(remaining, 0, dist.world_size)) / args.batch_size)  # the largest
    tf = data_loader.Preprocess.of(rows.ckpt).transform()
    dataset = data_loader.ImageDataset(
        ((f, 0) for f, _ in rows.inputs),
        tf,  # the labels stay in inputs
        short_side=data_loader.Preprocess.of(rows.ckpt).draft_side(),
    )
    workers = args.num_workers
    if workers is None:
        workers = data_loader.default_num_workers(device.type, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    loader = data_loader.make_loader(dataset, args.batch_size, mine, workers, pin_memory=device.type == "cuda")
    progress = Progress(len(remaining), "predict", dist.is_main and args.verbose >= 1, scale=dist.world_size)
    maps, n_new, batches = dict.fromkeys(plot_at) if args.explain else {}, 0, iter(loader)
    stopped = False
    try:
        with partial.writer(dist.rank) as part, rows.explained:  # --explain's heatmaps.npz: kept only when done
            with torch.no_grad() if args.explain else torch.inference_mode():  # Grad-CAM takes gradients
                for _ in bar(range(steps), compute, "predict"):
                    batch = next(batches, None)  # None: this share is done, the others are not
                    if batch is not None:
                        part.write(rows.of_batch(batch, compute, maps))
                        n_new += len(batch.labels)
                        progress.update(len(batch.labels) + len(batch.bad))
                    if compute.stop_requested():  # every process at the same step
                        raise Stopped
    except Stopped:
        stopped = True
    del loader, batches  # the loader workers end
    if dist.enabled and not stopped:
        torch.distributed.barrier()  # every share written before rank 0 reads them back
    return int(all_reduce_sum([n_new], dist, device)[0]), stopped, maps


class Stopped(Exception):
    """A stop signal seen at a batch's end: out of the loop, with the unfinished outputs dropped."""


def write_result(partial, output, columns, rows, plot_at, maps, unchanged, store=None):
    """--output from the partial folder's rows, in input order (written whole, then the folder removed), and the
    rows' features into `store` (a data_loop.FeatureStore) when given. Returns the summary's counts (read back from
    the rows) with the labelled rows' tally and the figure's samples."""
    task, inputs = rows.task, rows.inputs
    counts = dict(done=0, bad=0, accepted=0, unlike=0)
    tally, samples, reason = task.tally(), [], None  # reason: the first unreadable row's error
    with (
        atomic_open(output, "w", newline="", encoding="utf-8-sig") as f,  # Excel-friendly
        store if store is not None else nullcontext(),
    ):
        writer = csv.writer(f)
        writer.writerow(columns)
        for index, cells, pred, probs, unlike, features in partial.rows_in_order():
            writer.writerow(cells)
            if probs is None:
                counts["bad"] += 1
                reason = reason or f"{cells[0]}: {cells[-1]}"
                continue
            pred = tuple(pred) if isinstance(pred, list) else pred  # a multi-label decision, from JSON
            probs = torch.from_numpy(probs.copy())
            if store is not None:
                store.add(index, features, float(rows.predictor.uncertainty(probs[None])[0]))
            counts["done"] += 1
            counts["accepted"] += task.accepted(pred)
            counts["unlike"] += bool(unlike)
            label = inputs[index][1]
            if label != -1:
                tally.add(label, pred, probs)
            if index in plot_at:
                samples.append((inputs[index], pred, probs, unlike, maps.get(index)))
        if counts["done"] == 0:
            partial.remove()  # nothing to go on from
            first = "" if len(inputs) == 1 else "the first "
            raise CLIError(f"none of the {len(inputs)} images could be read ({first}{reason}); {unchanged}")
    if partial.repeated:
        print(f"warning: {partial.repeated} rows were predicted twice (the later ones kept)", file=sys.stderr)
    partial.remove()
    return counts, tally, samples


def print_results(args, predictor, summary, timing, explained, outputs):
    """The summary lines, the labelled rows' report and the figure. summary: write_result's (counts, tally,
    samples for the figure); timing: (images predicted by this run, seconds); outputs: (labelled, report path,
    confusion matrix path)."""
    counts, tally, samples_for_plot = summary
    n_done, n_bad, n_accepted, n_unlike = (counts[k] for k in ("done", "bad", "accepted", "unlike"))
    n_new, seconds = timing
    labelled, report_path, confusion_path = outputs
    ckpt, task, calibration, rejecting = predictor.ckpt, predictor.task, predictor.calibration, predictor.rejecting
    class_names, reference, ood_threshold = predictor.class_names, predictor.reference, predictor.ood_threshold
    earlier = f", {n_done - n_new} of them from the interrupted run" if n_new < n_done else ""
    print(
        f"predicted {n_done} image{'' if n_done == 1 else 's'} in {seconds:.1f}s "
        f"({n_new / max(seconds, 1e-9):.1f} img/s{earlier})"
        + (f"; {n_bad} unreadable (see the error column)" if n_bad else "")
        + f" -> {args.output}"
    )
    print_ood_summary(reference, ood_threshold, n_unlike, n_done, args)
    if "int8" in ckpt:  # an export.py --int8 build: what its gate measured against fp32
        print(int8.Figures.from_metadata(ckpt["int8"]).line())
        warning = int8.warning_for(ckpt, predictor.compute.device.type)
        if warning:
            print(warning, file=sys.stderr)
    if args.explain:
        empty = f" ({explained.empty} with an empty map: no evidence for the class)" if explained.empty else ""
        print(
            f"heat maps (Grad-CAM of the {task.explained_class} class): {explained.count} overlays{empty} -> "
            f"{args.explain}/, "
            f"maps -> {Path(args.explain) / 'heatmaps.npz'}"
        )
    if rejecting:
        rules = " and ".join(
            ([f"threshold {args.threshold:g}"] if args.threshold is not None else [])
            + (["--reject_ood"] if args.reject_ood else [])
        )
        print(
            f"{rules}: {n_accepted}/{n_done} accepted ({n_accepted / n_done:.1%}), "
            f"the rest predicted as {args.unknown_label!r}"
        )
    labelled = labelled and len(tally) > 0  # every labelled image may have been unreadable
    if labelled:
        lines, report = tally.summary(class_names, args.threshold, rejecting, calibration)
        print("\n".join(lines))
        evaluation.write_report(report, report_path)
        print(f"per-class report -> {report_path}\n{evaluation.format_report(report)}")
    if samples_for_plot:
        plot_predictions(samples_for_plot, class_names, ckpt, args.plot, args.show, args.unknown_label, task)
        print(f"figure -> {args.plot}")
        if labelled and task.confusion_matrix:
            save_confusion_matrix(
                tally.confusion(len(class_names), rejecting),
                class_names,
                confusion_path,
                extra_column=args.unknown_label if rejecting else None,
            )
            print(f"confusion matrix -> {confusion_path}")


def print_ood_summary(reference, threshold, n_unlike, n_done, args):
    """How many images the checkpoint's out-of-distribution reference calls unlike the training images."""
    if reference is None:
        print(
            f"out-of-distribution: {args.model_fn} has no reference (trained before train.py kept one, or with "
            "--ood_method none): no ood_score column"
        )
    elif threshold is None:
        print(
            f"out-of-distribution: ood_score written ({reference['method']}); the checkpoint has no threshold "
            "(too few validation images), so in_distribution is empty"
            + (" and --reject_ood rejects nothing" if args.reject_ood else "")
        )
    else:
        print(
            f"out-of-distribution: {n_unlike}/{n_done} images ({n_unlike / n_done:.1%}) unlike the training "
            f"images (ood_score > {threshold:.4g}, {reference['method']})"
        )


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
