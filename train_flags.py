"""train.py's flags: the parser (every flag, its default and help, grouped as --help shows them), --resume's
saved flags as the defaults, and the checks of their values (one error line each). Only train.py imports it."""

import data_loader
import model_loader
import ood
import tasks
from cli import ArgumentParser, CLIError, flag_adder

DEFAULT_BATCHNORM = "frozen"  # measured: bench/finetune_bench.py, docs/finetune.md
DEFAULT_LAYER_DECAY = 1.0

EXAMPLES = (
    "--augment: " + "; ".join(f"{k}: {v}" for k, v in data_loader.AUGMENT_POLICIES.items()) + "\n"
    "--batchnorm: "
    + "; ".join(f"{k}: {v}" for k, v in model_loader.BATCHNORM_POLICIES.items())
    + """

examples:
  python train.py --model_name resnet18 --input_size 64 --n_epochs 5         # the shipped sample, from scratch
  python train.py --data_dir my_images --use_pretrained --freeze             # mode 1: new head on a frozen backbone
  python train.py --data_dir my_images --use_pretrained --augment light      # mode 2: probe, then fine-tune all"""
)


def build_parser(description=None):
    """train.py's parser (`description`: its docstring): its flags in groups, as --help shows them."""
    p = ArgumentParser(description=description, epilog=EXAMPLES)
    for group in (data_flags, model_flags, training_flags, speed_flags):
        group(p)
    add = flag_adder(p.add_argument_group("several processes (torchrun)"))
    add("--scale_lr", action="store_true", help="multiply --lr by the number of processes (linear scaling)")
    add("--sync_bn", action="store_true", help="synchronize BatchNorm statistics across GPUs when fine-tuning")
    return p


def data_flags(p):
    add = flag_adder(p.add_argument_group("data"))
    add(
        "--data_dir",
        default=None,
        help="ImageFolder root: DIR/train/<class>/*, optional DIR/valid/ and DIR/test/ "
        f"(default: data/{data_loader.DEFAULT_DATASET})",
    )
    add("--dataset_name", default=None, help="shortcut for --data_dir data/NAME")
    add(
        "--labels_csv",
        default=None,
        metavar="FILE",
        help="labels from a CSV instead of class folders: columns file, label and optionally split (train/valid/test)",
    )
    add(
        "--image_root",
        default=None,
        metavar="DIR",
        help="the folder --labels_csv's file column is relative to (default: the CSV's folder)",
    )
    add(
        "--multi_label",
        action="store_true",
        help="with --labels_csv: each label cell lists every class the image "
        "shows (or none); one sigmoid per class, with per-class thresholds fitted on the validation images",
    )
    add(
        "--label_delim",
        default=tasks.DEFAULT_DELIM,
        help="--multi_label: what separates the classes in a label cell (default: a space)",
    )
    add(
        "--valid_ratio", type=float, default=0.2, help="share of train/ held out for validation when there is no valid/"
    )
    add("--input_size", type=int, default=None, help="crop size fed to the model (default: the backbone's, 224)")
    add("--resize_size", type=int, default=None, help="short side before the center crop (default: input_size*256/224)")
    add("--batch_size", type=int, default=32, help="images per batch and per process")
    add(
        "--num_workers",
        type=int,
        default=None,
        help="DataLoader worker processes (default: CPUs - 1 up to 8 "
        "with a GPU; on the CPU 0 up to 4 cores, else a quarter of them)",
    )
    add("--class_weights", choices=["none", "auto"], default="none", help="auto = inverse-frequency loss weights")
    add("--balanced_sampler", action="store_true", help="draw training images with equal class probability")
    add(
        "--check_data",
        action="store_true",
        help="audit the data folder and exit without training; with "
        "--use_pretrained or --weights, also rank the images by how likely their label is wrong (label_issues.csv)",
    )
    add(
        "--check_views",
        type=int,
        default=0,
        help="--check_data: augmented views per image, besides the eval "
        "view, in the label check's features (0 = the eval view only)",
    )


def model_flags(p):
    add = flag_adder(p.add_argument_group("model"))
    add(
        "--model_name",
        default="resnet",
        help="resnet (=resnet34), alexnet, vgg (=vgg16_bn), squeezenet, densenet "
        "(=densenet121), any torchvision classification model (resnet50, efficientnet_b0, vit_b_16, ...), or "
        "efficientnet_lite0 (ImageNet weights installed with pip: --use_pretrained works offline)",
    )
    add("--n_classes", type=int, default=None, help="optional check: must equal the number of class folders")
    add(
        "--use_pretrained",
        action="store_true",
        help="start from ImageNet weights: torchvision's (cached in TORCH_HOME), or efficientnet_lite0's pip package",
    )
    add("--weights", default=None, help="backbone weights from a local file (torchvision state_dict or our checkpoint)")
    add("--freeze", action="store_true", help="mode 1: freeze the backbone, train only the new head")
    add("--unfreeze_after", type=int, default=0, help="mode 2: train the head alone for N epochs, then fine-tune all")
    add("--backbone_lr_scale", type=float, default=0.1, help="mode 2: backbone learning rate = lr * this")
    add(
        "--no_probe",
        action="store_true",
        help="no linear probe (L-BFGS on the cached features, L2 chosen on "
        "validation). By default --freeze ends by fitting it and keeps the better head by validation loss (its SGD "
        "epochs' best or the probe); mode 2 with a pretrained backbone starts from the better of the two, keeps it "
        "when fine-tuning does not beat it, and skips fine-tuning when it already gets every validation image right",
    )
    add(
        "--batchnorm",
        choices=list(model_loader.BATCHNORM_POLICIES),
        default=None,
        help="mode 2: BatchNorm "
        f"while fine-tuning (default: {DEFAULT_BATCHNORM} for pretrained backbones, else train; see the policies "
        "below)",
    )
    add(
        "--layer_decay",
        type=float,
        default=None,
        help="mode 2: discriminative rates: each backbone block "
        f"learns at this times the rate of the block above it (default {DEFAULT_LAYER_DECAY}; 1 = one rate for the "
        "backbone)",
    )
    add(
        "--ood_method",
        choices=list(ood.METHODS) + ["none"],
        default=ood.DEFAULT_METHOD,
        help="how predict.py "
        "scores an image's unlikeness to the training images (ood_score, in_distribution); none = keep no reference",
    )
    add(
        "--ood_keep",
        type=float,
        default=0.95,
        help="share of the validation images the out-of-distribution threshold keeps in distribution",
    )


def training_flags(p):
    add = flag_adder(p.add_argument_group("training"))
    add("--model_fn", "--model_path", default="model.pth", help="where the best checkpoint is written")
    add("--n_epochs", type=int, default=20, help="epochs in all (a resumed run counts those already done)")
    add("--lr", type=float, default=1e-3, help="learning rate of the head (AdamW)")
    add(
        "--find_lr",
        action="store_true",
        help="run the learning-rate range test with these flags instead of "
        "training: lr_find.png in the run folder and a suggested --lr; the model is not saved",
    )
    add("--weight_decay", type=float, default=0.01, help="AdamW's decoupled weight decay")
    add("--lr_schedule", choices=["cosine", "constant"], default="cosine", help="after the warm-up")
    add("--warmup", type=float, default=0.05, help="share of each phase's steps spent warming up linearly")
    add("--label_smoothing", type=float, default=0.0, help="0.1 is a common choice")
    add(
        "--augment",
        choices=list(data_loader.AUGMENT_POLICIES),
        default="default",
        help="the training images' "
        "augmentation (policies below); light for small sets whose classes hang on small details",
    )
    add(
        "--any_orientation",
        action="store_true",
        help="the images have no natural up (cells, slides, aerial "
        "and microscope images): vertical flips and quarter turns are added to the augmentation",
    )
    add("--patience", type=int, default=5, help="epochs without a better validation loss before stopping; 0 = never")
    add("--seed", type=int, default=42, help="seeds the split, the initial head, shuffling and augmentation")
    add(
        "--log_dir",
        default=None,
        help="run folder for TensorBoard, metrics.csv and split lists (default: runs/<date-time>_<model_name>)",
    )
    add(
        "--save_interval",
        type=float,
        default=30,
        help="seconds between checkpoint writes when epochs are "
        "shorter (0 = after every epoch); always written at the end and when stopped",
    )
    add("--resume", default=None, help="continue from a <model_fn stem>_last.pth; its saved flags are the defaults")
    add("--verbose", type=int, default=2, help="0 = summary only, 1 = a line per epoch, 2 = also progress bars")


def speed_flags(p):
    add = flag_adder(p.add_argument_group("speed"))
    add("--gpu_id", type=int, default=None, help="CUDA device; -1 = CPU (default: GPU 0, else Apple MPS, else CPU)")
    add(
        "--amp",
        action="store_const",
        const=True,
        default=None,
        help="mixed precision everywhere: bf16 autocast "
        "(fp16 + GradScaler on GPUs without bf16); by default only fine-tuning steps run in bf16, where the "
        "GPU or CPU (AVX512-BF16, AMX) computes it natively",
    )
    add("--no_amp", dest="amp", action="store_const", const=False, help="fp32 everywhere")
    add("--no_channels_last", action="store_true", help="keep NCHW memory format for convolutional backbones")
    add("--no_feature_cache", action="store_true", help="with --freeze, run the backbone every epoch")
    add("--cache_views", type=int, default=1, help="augmented views cached per training image (1 = eval transform)")
    add(
        "--cache_memory_mb",
        type=int,
        default=2048,
        help="feature cache above this size goes to a file in the run folder",
    )


def parse_args(argv=None, description=None):
    p = build_parser(description)
    args = p.parse_args(argv)
    if args.resume:  # the interrupted run's own flags become the defaults; flags given now still win
        saved = model_loader.safe_load(args.resume, "--resume checkpoint")
        if not isinstance(saved, dict) or "resumable" not in saved or "args" not in saved:
            raise CLIError(f"--resume {args.resume!r} is not a resumable checkpoint (use the *_last.pth file)")
        known = {a.dest for a in p._actions}
        p.set_defaults(**{k: v for k, v in saved["args"].items() if k in known and k != "resume"})
        args = p.parse_args(argv)
    return args


def check_args(args):
    for name in ("batch_size", "n_epochs", "cache_views", "cache_memory_mb"):
        if getattr(args, name) <= 0:
            raise CLIError(f"--{name} must be a positive number; got {getattr(args, name)}")
    for name in ("lr", "backbone_lr_scale"):
        if getattr(args, name) < 0 or (name == "lr" and args.lr == 0):
            raise CLIError(f"--{name} must be positive; got {getattr(args, name)}")
    if (args.num_workers or 0) < 0 or args.patience < 0 or args.unfreeze_after < 0 or args.save_interval < 0:
        raise CLIError("--num_workers, --patience, --unfreeze_after and --save_interval must be 0 or more")
    if args.layer_decay is not None and not 0 < args.layer_decay <= 1:
        raise CLIError(f"--layer_decay must be in (0, 1]; got {args.layer_decay}")
    if args.freeze and (args.batchnorm or args.layer_decay is not None):
        raise CLIError("--batchnorm and --layer_decay shape fine-tuning; --freeze keeps the backbone as it is")
    if not 0 < args.ood_keep <= 1:
        raise CLIError(f"--ood_keep must be in (0, 1]; got {args.ood_keep}")
    if not 0 <= args.label_smoothing < 1 or not 0 <= args.warmup < 1:
        raise CLIError("--label_smoothing and --warmup must be in [0, 1)")
    if args.input_size is not None and args.input_size < 8:
        raise CLIError(f"--input_size must be at least 8; got {args.input_size}")
    if args.freeze and args.unfreeze_after:
        raise CLIError("--freeze keeps the backbone frozen for the whole run; use --unfreeze_after N without --freeze")
    if args.multi_label:
        if not args.labels_csv:
            raise CLIError("--multi_label reads several labels per image from a table: give --labels_csv FILE")
        if not args.label_delim:
            raise CLIError("--label_delim must not be empty")
        refused = [
            why
            for why, on in (
                (
                    "--balanced_sampler is for single-label classes, not --multi_label (--class_weights auto weights "
                    "each "
                    "class's positive images instead)",
                    args.balanced_sampler,
                ),
                ("--label_smoothing is for single-label classes, not --multi_label", args.label_smoothing),
                (
                    f"--ood_method {args.ood_method} is for single-label classes, not --multi_label (use knn or none)",
                    args.ood_method not in ("knn", "none"),
                ),
            )
            if on
        ]
        if refused:
            raise CLIError(refused[0])
    elif args.label_delim != tasks.DEFAULT_DELIM:
        raise CLIError("--label_delim goes with --multi_label (several labels per image)")
