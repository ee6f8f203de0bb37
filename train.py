"""Train an image classifier on a folder of images (one subfolder per class) from an ImageNet-pretrained
torchvision backbone: freeze it and train a new head (--freeze), or fine-tune everything with a smaller
learning rate on the pretrained part. Runs unchanged under torchrun for several GPUs or machines."""

import cli  # before torch: Ctrl-C while the imports below load is one quiet line, not a traceback

if __name__ == "__main__":
    cli.exit_quietly_on_stop_signals()
    cli.check_installation()  # a torch/torchvision pair that does not match: one line, not a traceback

import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import audit
import data_loader
import evaluation
import explain
import label_check
import lr_finder
import model_loader
import ood
import run_log
import stages
import tasks
import train_flags
import trainer
from cli import CLIError, StopFlag, run_cli  # noqa: E402
from metrics import N_BINS
from run_paths import RunPaths, check_writable
from train_flags import DEFAULT_BATCHNORM, DEFAULT_LAYER_DECAY, check_args
from utils import (
    Compute,
    DistInfo,
    amp_dtype_for,
    dist_info_from_env,
    precision_for,
    process_group,
    resolve_device,
    seed_everything,
)


def build_parser():
    return train_flags.build_parser(__doc__)


def parse_args(argv=None):
    """The flags (train_flags.py); with --resume, the interrupted run's own are the defaults."""
    return train_flags.parse_args(argv, __doc__)


def default_run_dir(model_name):
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}_{model_name}"


def last_path(model_fn):
    model_fn = Path(model_fn)
    return model_fn.with_name(f"{model_fn.stem}_last.pth")


def model_meta(args, model_name):
    """Model name and preprocessing: --input_size and --resize_size, else the backbone's own."""
    defaults = model_loader.model_defaults(model_name)
    input_size = args.input_size or defaults["input_size"]
    return {
        "model_name": model_name,
        "input_size": input_size,
        "resize_size": args.resize_size or data_loader.default_resize(input_size),
        "mean": defaults["mean"],
        "std": defaults["std"],
    }


def fine_tuning(args, model, head, pretrained):
    """(probe, BatchNorm policy, layer decay) of a fine-tune: the flags', else the defaults: the linear probe
    first for a pretrained backbone, BatchNorm DEFAULT_BATCHNORM for a pretrained backbone that has BatchNorm
    (else "train"), DEFAULT_LAYER_DECAY. One error line for a policy the model cannot follow."""
    has_bn = bool(model_loader.batchnorm_layers(model))
    if args.batchnorm and not has_bn:
        raise CLIError(f"--batchnorm {args.batchnorm}: {args.model_name} has no BatchNorm layers; leave the flag out")
    batchnorm = args.batchnorm or (DEFAULT_BATCHNORM if has_bn and pretrained else "train")
    decay = DEFAULT_LAYER_DECAY if args.layer_decay is None else args.layer_decay
    if decay != 1.0 and not model_loader.backbone_blocks(model, head):
        if args.layer_decay is not None:
            raise CLIError(
                f"--layer_decay: {args.model_name}'s backbone blocks could not be told apart; leave the flag out"
            )
        decay = 1.0
    # the probe: at the end of a --freeze run, or as the first stage of a pretrained fine-tune (LP-FT)
    probe = not args.no_probe and (args.freeze or pretrained and not args.unfreeze_after)
    return probe, batchnorm, decay


def fit_config(args, lr=None, backbone_lr_scale=None, class_weights=None, tuning=(False, "train", 1.0)):
    """The Fitter's settings (trainer.FitConfig) from the flags: lr and backbone_lr_scale as train.py adjusts
    them (--scale_lr; a backbone from random init learns at the full rate), else the flags'; `tuning` as
    fine_tuning() gives."""
    probe, batchnorm, layer_decay = tuning
    return trainer.FitConfig(
        probe=probe,
        batchnorm=batchnorm,
        layer_decay=layer_decay,
        n_epochs=args.n_epochs,
        frozen_epochs=args.n_epochs if args.freeze else args.unfreeze_after,
        lr=args.lr if lr is None else lr,
        backbone_lr_scale=args.backbone_lr_scale if backbone_lr_scale is None else backbone_lr_scale,
        weight_decay=args.weight_decay,
        warmup=args.warmup,
        lr_schedule=args.lr_schedule,
        label_smoothing=args.label_smoothing,
        patience=args.patience,
        seed=args.seed,
        feature_cache=(args.freeze or args.unfreeze_after > 0) and not args.no_feature_cache,
        cache_views=args.cache_views,
        cache_memory_mb=args.cache_memory_mb,
        save_interval=args.save_interval,
        class_weights=None if class_weights is None else tuple(class_weights),
        flags=dict(vars(args)),
    )


def check_outputs(args, run_dir, splits, model_fn=None):
    """One error line before any work when a file of the run would replace something it reads (an image, the CSV
    of labels, --weights, --resume other than the run's own _last.pth) or another output, or the run folder (its
    figures and tables) would sit among the images or in a folder searched for them (run_paths.py)."""
    paths = RunPaths().reads_images([f for part in (splits.train, splits.valid, splits.test) for f, _ in part])
    paths.reads(args.labels_csv, "the CSV of labels --labels_csv").reads(args.weights, "the weights file --weights")
    if args.resume:
        paths.reads(args.resume, "the checkpoint --resume continues", replaced_by="--model_fn's _last.pth")
    for folder in splits.folders:
        paths.searches(folder, "the images")
    if model_fn:
        paths.writes(model_fn, "--model_fn", replaces="checkpoint")
        paths.writes(last_path(model_fn), "--model_fn's _last.pth", replaces="checkpoint")
    paths.writes_folder(run_dir, "--log_dir" if args.log_dir else "the run folder")
    paths.check()


def check_data(args, data_dir, model_name, task):
    """--check_data: the audit, then the label check when a pretrained backbone is given (label_check.py).
    Exits 1 on unreadable files or leaks; labels flagged as wrong alone do not fail it."""
    if args.check_views < 0:
        raise CLIError(f"--check_views must be 0 or more; got {args.check_views}")
    if args.labels_csv:
        splits = data_loader.build_splits(
            None, args.valid_ratio, args.seed, args.labels_csv, args.image_root, task=task
        )
        status = audit.audit_samples(audit.csv_parts(splits), splits.class_names, print, task)
    else:
        status = audit.audit_data(data_dir, print)
    if not (args.use_pretrained or args.weights):
        print(
            "label check, near-duplicates and outliers: skipped; they need a pretrained backbone (--use_pretrained or "
            "--weights FILE)"
        )
    else:
        device = resolve_device(args.gpu_id)
        run_dir = Path(args.log_dir) if args.log_dir else default_run_dir(f"{model_name}_labels")
        splits = data_loader.build_splits(
            data_dir, args.valid_ratio, args.seed, args.labels_csv, args.image_root, task=task
        )
        check_outputs(args, run_dir, splits)
        meta = model_meta(args, model_name)
        seed_everything(args.seed)
        model, head = model_loader.build_model(
            model_name,
            len(splits.class_names),
            args.use_pretrained,
            args.weights,
            print if args.verbose >= 1 else (lambda *a: None),
        )
        channels_last = model_loader.is_convolutional(model) and not args.no_channels_last
        workers = data_loader.default_num_workers(device.type) if args.num_workers is None else args.num_workers
        stop = StopFlag().install()
        made = not run_dir.exists()  # a check that fails or is stopped leaves no empty run folder behind
        try:
            compute = Compute(
                device,
                amp_dtype_for(device, args.amp, print),
                channels_last,
                False,
                DistInfo(),
                stop,
                progress=args.verbose >= 2,
            )
            checked = label_check.check_labels(
                model.to(device),
                head,
                splits,
                meta,
                compute,
                run_dir,
                task,
                views=args.check_views,
                batch_size=args.batch_size,
                num_workers=workers,
                seed=args.seed,
                budget_mb=args.cache_memory_mb,
            )
        finally:
            stop.restore()
            if made and run_dir.is_dir() and not any(run_dir.iterdir()):
                run_dir.rmdir()
        if checked is None:
            print("label check: interrupted; nothing written")
            sys.exit(stop.exit_status())
        status = max(status, checked[1])  # copies leaking across splits, or labelled two ways
    if status:
        sys.exit(status)
    return None


def ood_reference(args, fitter, calibration, compute):
    """(the best model's out-of-distribution reference (ood.py) or None, the line to print or None)."""
    if args.ood_method == "none":
        return None, None
    start = time.perf_counter()
    temperature = calibration.scalar_temperature() if calibration else 1.0
    try:
        reference = ood.reference_for_run(
            fitter.model,
            fitter.head,
            fitter.loaders,
            fitter.cache,
            compute,
            args.ood_method,
            args.ood_keep,
            temperature,
            len(fitter.splits.class_names),
            args.seed,
        )
    except CLIError as e:  # the checkpoint is complete without it
        return None, f"out-of-distribution reference: none kept ({e})"
    if reference is None:
        return None, "out-of-distribution reference: none kept (interrupted)"
    return reference, f"{ood.describe(reference)}; {time.perf_counter() - start:.1f}s"


def top_losses(fitter, calibration, logits, labels, index, run_dir):
    """top_losses.csv/.png of the best model's validation logits (explain.py); the line to print or None."""
    if not len(labels):
        return "top losses: no validation images could be read"
    if not fitter.dist.is_main:
        return None
    files = [fitter.loaders.valid.dataset.samples[i][0] for i in index.tolist()]
    path = explain.write_top_losses(
        files,
        logits,
        labels,
        calibration,
        fitter.splits.class_names,
        fitter.meta,
        run_dir,
        fitter.task,
        writer=fitter.files.open_writer(fitter.state.epoch),
        step=fitter.state.epoch,
    )
    return f"top losses: {len(files)} validation images, highest loss first -> {path}, {path.with_suffix('.png').name}"


def finish_run(args, fitter, result, run_dir):
    """After the epochs, one sequence on the best model: calibrate it on the validation images, test it, fit the
    out-of-distribution reference, rank the top losses, then write the best checkpoint once with what was
    fitted. Fills result's calibration, test metrics and report; returns the lines to print."""
    if result.interrupted or not result.state.best_metrics:
        return []
    task, compute, names = fitter.task, fitter.compute, fitter.splits.class_names
    fitter.load_best()
    logits, labels, index = trainer.validation_logits(fitter)  # one pass (none on the feature cache) for both uses
    result.calibration = calibration = task.calibrate(logits, labels, names)
    if compute.dist.is_main and calibration is not None:
        evaluation.save_reliability_diagram(logits, labels, calibration, run_dir / "reliability.png", task)
    if fitter.loaders.test is not None:
        test_logits, test_labels = evaluation.collect_logits(fitter.model, fitter.loaders.test, compute, "test")
        result.test_metrics, result.test_report = task.test_results(test_logits, test_labels, calibration, names)
        if compute.dist.is_main and result.test_report is not None:
            evaluation.write_report(result.test_report, run_dir / "test_report.csv")
    run_log.log_summary(fitter, calibration, result.test_metrics)
    reference, ood_line = ood_reference(args, fitter, calibration, compute)
    top_line = top_losses(fitter, calibration, logits, labels, index, run_dir)
    fitter.files.add_to_best(
        {
            **(calibration.checkpoint_entries() if calibration else {}),
            **({"ood": reference} if reference is not None else {}),
        },
        {**(calibration.metrics if calibration else {}), **test_figures(result.test_metrics)},
    )
    return [line for line in (ood_line, top_line) if line]


def test_figures(test_metrics):
    """The test split's figures as the checkpoint's metrics keep them (test_accuracy, test_loss, test_count, ...:
    plain numbers), for the model card of serve.py and export.py's metadata."""
    return {f"test_{k}": float(v) for k, v in test_metrics.items() if isinstance(v, (int, float))}


def build_fitter(args, model_name, splits, meta, resume, run_dir, task, compute_parts, log, say):
    """The model (pretrained, or the resumed run's), the loaders and the Fitter, restored when resuming; returns
    (fitter, where the backbone's weights came from). compute_parts: (device, dist, stop)."""
    device, dist, stop = compute_parts
    n_classes = len(splits.class_names)
    if resume is not None:  # its trained weights replace the backbone's: no ImageNet file is needed again
        source = f"the resumed checkpoint {args.resume}"
        model, head = model_loader.build_model(model_name, n_classes, log=log)
    else:
        source = model_loader.weights_source(model_name, args.use_pretrained, args.weights)
        model, head = model_loader.build_model(model_name, n_classes, args.use_pretrained, args.weights, log)
        if args.freeze and not (args.use_pretrained or args.weights) and dist.is_main:
            print(
                "warning: --freeze without --use_pretrained or --weights freezes a randomly initialised "
                "backbone: only the head trains, on random features",
                file=sys.stderr,
            )
    if resume is not None:
        check_resumable(args, resume, model_name, splits, task)
    pretrained = bool(args.use_pretrained or args.weights)
    tuning = fine_tuning(args, model, head, pretrained)
    channels_last = model_loader.is_convolutional(model) and not args.no_channels_last
    train_cl = trainer.train_channels_last(device, channels_last)
    model = model.to(device, memory_format=torch.channels_last if train_cl else torch.preserve_format)
    if args.sync_bn and dist.enabled and device.type == "cuda" and not args.freeze:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    lr = args.lr * (dist.world_size if args.scale_lr else 1)
    # the smaller rate is for pretrained weights; a backbone from random init learns at the full rate
    lr_scale = args.backbone_lr_scale if pretrained else 1.0
    balance = task.loss_weights(splits.train, n_classes)
    workers = args.num_workers
    if workers is None:
        workers = data_loader.default_num_workers(device.type, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    loaders = data_loader.build_loaders(
        splits,
        meta["input_size"],
        meta["resize_size"],
        meta["mean"],
        meta["std"],
        args.batch_size,
        workers,
        args.seed,
        dist.rank,
        dist.world_size,
        pin_memory=device.type == "cuda",
        class_weights=balance if args.balanced_sampler else None,
        task=task,
        augment=args.augment,
        any_orientation=args.any_orientation,
    )
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        data_loader.write_split_lists(splits, run_dir, task)
    forward_dtype, train_dtype, precision = precision_for(device, args.amp)
    compute = Compute(
        device,
        forward_dtype,
        channels_last,
        train_cl,
        dist,
        stop,
        progress=dist.is_main and args.verbose >= 2,
        train_amp_dtype=train_dtype,
    )
    config = fit_config(args, lr, lr_scale, balance if args.class_weights == "auto" else None, tuning)
    if not args.freeze:
        log(f"precision: {precision}; training memory format: {'channels_last' if train_cl else 'NCHW'}")
    fitter = trainer.Fitter(
        model, head, splits, loaders, compute, config, meta, args.model_fn, last_path(args.model_fn), run_dir, log, task
    )
    if resume is not None:
        fitter.restore(resume)
        log(f"resumed from {args.resume} after epoch {fitter.state.epoch}")
        patience = resume["args"].get("patience")  # the run's own: did it stop early?
        if patience and fitter.state.bad_epochs >= patience and fitter.state.epoch < args.n_epochs:
            fitter.state.bad_epochs = 0  # asked for more epochs after an early stop: count again
            say(
                f"the resumed run had stopped early (no better validation loss for {patience} epochs); its "
                f"patience starts again, up to --n_epochs {args.n_epochs}"
            )
    return fitter, source


def check_resumable(args, resume, model_name, splits, task):
    """One error line when --resume's checkpoint was trained another way than this run asks for."""
    if tasks.for_checkpoint(resume).multi_label != task.multi_label:
        raise CLIError(
            f"--resume {args.resume!r} was trained with{'' if resume.get('multi_label') else 'out'} "
            f"--multi_label; resume it the same way"
        )
    if resume.get("model_name") != model_name or resume.get("class_names") != splits.class_names:
        raise CLIError(
            f"--resume {args.resume!r} was trained as {resume.get('model_name')} on classes "
            f"{resume.get('class_names')}, not {model_name} on this data"
        )


def interrupted_line(state, model_fn):
    """What a run stopped by a signal says: how far it got and how to go on."""
    if state.probe and state.epoch == 0:
        return (
            f"interrupted after the head stage ({model_fn} holds its head); continue with: python train.py "
            f"--resume {last_path(model_fn)}"
        )
    if state.epoch == 0:  # resuming from nothing would be a fresh start
        return (
            "interrupted before the first epoch finished: nothing was trained yet and nothing was saved; run the "
            "same command again to start"
        )
    return f"interrupted after epoch {state.epoch}; continue with: python train.py --resume {last_path(model_fn)}"


def print_summary(args, result, run_dir, task, lines, say):
    """What a finished run prints: the best epoch, the calibration, the reference and top losses, the test."""
    state = result.state
    if result.transfer_note:
        say(result.transfer_note)
    if state.best_metrics:
        m = state.best_metrics
        kept = stages.HEAD_NAMES[state.probe.get("kept", "probe")] if state.probe else "the linear probe"
        best = f"best epoch {state.best_epoch}" if state.best_epoch else f"best: {kept}"
        say(f"{best}: valid loss {m['valid_loss']:.4f}, valid {task.describe_best(m)} -> {args.model_fn}")
        say(
            f"calibration: {result.calibration.summary()}; {run_dir / 'reliability.png'}"
            if result.calibration
            else "calibration: no validation images could be read; temperature stays 1.0"
        )
        for line in result.calibration.warnings() if result.calibration else []:
            say(line)
    for line in lines:
        say(line)
    if result.test_metrics.get("count"):
        t = result.test_metrics
        say(task.describe_test(t))
        if result.calibration is not None and t["loss_calibrated"] != t["loss"]:
            say(
                f"calibration on the test images: {task.loss_name} {t['loss']:.4f} -> {t['loss_calibrated']:.4f}, "
                f"ECE ({N_BINS} bins) {t['ece']:.4f} -> {t['ece_calibrated']:.4f}"
            )
    if result.test_report is not None:
        say(f"test report -> {run_dir / 'test_report.csv'}\n{evaluation.format_report(result.test_report)}")
    say(f"run folder: {run_dir}  (tensorboard --logdir {run_dir if args.log_dir else run_dir.parent})")


def main(args):
    dist = dist_info_from_env()
    log = tqdm.write if dist.is_main and args.verbose >= 1 else (lambda *a, **k: None)
    say = print if dist.is_main else (lambda *a, **k: None)  # the summary, even at --verbose 0
    check_args(args)
    for name in ("data_dir", "labels_csv", "image_root"):  # absolute in the checkpoint: found from any folder
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    model_name = model_loader.resolve_model_name(args.model_name)
    data_dir = data_loader.dataset_root(args.data_dir, args.dataset_name)
    if args.weights and args.use_pretrained:
        raise CLIError("give --use_pretrained or --weights, not both")
    if args.labels_csv and (args.data_dir or args.dataset_name):
        raise CLIError("give --labels_csv or --data_dir/--dataset_name, not both")
    if args.image_root and not args.labels_csv:
        raise CLIError("--image_root goes with --labels_csv")
    task = tasks.for_run(args.multi_label, args.label_delim)  # one label per image, or a set of classes
    if args.check_data:
        return check_data(args, data_dir, model_name, task)
    if args.find_lr and (args.resume or dist.enabled):
        raise CLIError(
            "--find_lr starts from the initial weights in one process: run it with python, without --resume or torchrun"
        )
    device = resolve_device(args.gpu_id, dist.local_rank)
    if dist.is_main:
        check_writable(args.model_fn, "--model_fn")
    splits = data_loader.build_splits(
        data_dir, args.valid_ratio, args.seed, args.labels_csv, args.image_root, say, task
    )
    n_classes = len(splits.class_names)
    if args.n_classes is not None and args.n_classes != n_classes:
        where = f"labels of {args.labels_csv}" if args.labels_csv else f"class folders in {data_dir}"
        raise CLIError(
            f"--n_classes {args.n_classes} does not match the {n_classes} {where}: {', '.join(splits.class_names[:10])}"
        )

    resume = model_loader.safe_load(args.resume, "--resume checkpoint") if args.resume else None
    run_dir = Path(args.log_dir or (resume or {}).get("run_dir") or default_run_dir(model_name))
    if dist.is_main:
        check_outputs(args, run_dir, splits, args.model_fn)
    meta = model_meta(args, model_name)

    fitter = None
    stop = StopFlag().install()
    try:
        with process_group(dist, device):
            if dist.enabled:  # every rank uses rank 0's run folder (the default name holds the time)
                shared = [str(run_dir)]
                torch.distributed.broadcast_object_list(shared, src=0)
                run_dir = Path(shared[0])
            seed_everything(args.seed)
            fitter, source = build_fitter(
                args, model_name, splits, meta, resume, run_dir, task, (device, dist, stop), log, say
            )
            mode = fitter.plan.describe(fitter.model) + (
                ""
                if args.freeze
                else f"; augment {args.augment}" + (" + any orientation" if args.any_orientation else "")
            )
            log(
                f"{model_name} on {device} ({mode}); {n_classes} classes: {', '.join(splits.class_names[:10])}; "
                f"{len(splits.train)} train / {len(splits.valid)} valid ({splits.valid_source}) / "
                f"{len(splits.test)} test; input {meta['input_size']}px; backbone weights: {source}; "
                f"run folder {run_dir}"
            )
            if args.find_lr:
                test = lr_finder.find_lr(fitter, run_dir, say)
                if test is None and stop.requested:
                    say("--find_lr: interrupted; nothing suggested")
                    sys.exit(stop.exit_status())
                return test
            result = fitter.fit()
            lines = finish_run(args, fitter, result, run_dir)
    finally:
        stop.restore()
        if fitter is not None:
            fitter.files.close_writer()

    if result.skipped_per_class:
        say(f"skipped unreadable images per class: {result.skipped_per_class}")
    if result.interrupted:
        say(interrupted_line(result.state, args.model_fn))
        sys.exit(stop.exit_status())
    print_summary(args, result, run_dir, task, lines, say)
    if stop.requested:  # arrived after the last epoch, during calibration and the test pass: all was written
        say(f"interrupted at the end of training; {args.model_fn} is complete")
        sys.exit(stop.exit_status())
    return result


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
