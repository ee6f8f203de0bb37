"""Images in, tensors out: folder scanning, image decoding, transforms, the seeded split, samplers, loaders."""

import csv
import math
import os
import warnings
from collections import defaultdict, namedtuple
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

import labels_csv
from cli import CLIError, describe_error, ignore_stop_signals
from tasks import SingleLabel
from utils import atomic_open

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RRC_SCALE = (0.25, 1.0)  # RandomResizedCrop area range; torchvision's 0.08 is too harsh for small transfer sets
# --augment: the training transform's policies, each keeping the label of an ordinary photo
AUGMENT_POLICIES = {
    "none": "the eval view (resize, center crop): no augmentation",
    "light": "a crop of 70-100% of the image and a horizontal flip: small sets, small details that decide the class",
    "default": "a crop of 25-100% of the image and a horizontal flip",
    "strong": "a crop of 25-100%, a horizontal flip, TrivialAugment's colour and shape changes and random erasing: "
    "larger sets, long runs",
}
DRAFT_MARGIN = 2  # eval: large JPEGs decoded down to this many times the resize size (1 doubled the change in
# EfficientNet-Lite0's ImageNet probabilities on 12 MP photos, 0.019 against 0.0095, for 11 ms less an image)


# ----------------------------------------------------------------------------- files and decoding


def is_image_file(path):
    path = Path(path)
    return not path.name.startswith(".") and path.suffix.lower() in IMG_EXTENSIONS


def list_images(folder):
    """Image files under `folder`, recursively, sorted; hidden files and folders are skipped."""
    folder = Path(folder)
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in filenames if is_image_file(f))
    return sorted(found)


def to_rgb(img):
    """Any Pillow mode to 8-bit RGB: 16-bit gray is scaled (not clipped), transparency goes on white."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode != "I" or arr.max(initial=0) > 255:
            arr = arr / 257.0  # 0..65535 -> 0..255
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        img = Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def draft_jpeg(img, short_side):
    """A JPEG about to be decoded: at 1/2, 1/4 or 1/8 of its size (Pillow's draft mode, scaled in the DCT, much
    faster for large photos) when its short side stays at least `short_side` pixels; other images as they are."""
    if img.format != "JPEG" or not short_side or min(img.size) < 2 * short_side:
        return
    w, h = img.size
    scale = short_side / min(w, h)
    img.draft(img.mode, (math.ceil(w * scale), math.ceil(h * scale)))  # the largest reduction keeping this size


def load_rgb(path, short_side=None):
    """Decode one image fully (a truncated file raises), turn it upright by its EXIF tag, make it RGB.
    Pillow's decompression-bomb warning is treated as an error. `short_side`: a large JPEG may be decoded at a
    reduced scale whose short side is still at least this many pixels (draft_jpeg)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            draft_jpeg(img, short_side)
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)


# ----------------------------------------------------------------------------- transforms


def default_resize(input_size):
    return int(math.floor(input_size * 256 / 224))


class RandomQuarterTurn(torch.nn.Module):
    """A turn by 0, 90, 180 or 270 degrees, drawn from torch's generator (so the per-image seed decides it)."""

    def forward(self, img):
        k = int(torch.randint(4, ()))
        return (
            img
            if k == 0
            else img.transpose(
                (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)[k - 1]
            )
        )


def build_transforms(input_size, resize_size, mean, std, train, augment="default", any_orientation=False):
    """Eval: resize the short side, then center crop. Train: the --augment policy (AUGMENT_POLICIES), with
    vertical flips and quarter turns added for images that have no natural orientation. Both normalize."""
    eval_steps = [T.Resize(resize_size, antialias=True), T.CenterCrop(input_size)]
    if augment not in AUGMENT_POLICIES:
        raise ValueError(f"unknown augmentation policy {augment!r}")
    after = []
    if not train or augment == "none":
        steps = list(eval_steps)
    elif augment == "light":
        steps = [
            T.RandomResizedCrop(input_size, scale=(0.7, 1.0), ratio=(0.9, 1.1), antialias=True),
            T.RandomHorizontalFlip(),
        ]
    else:
        steps = [T.RandomResizedCrop(input_size, scale=RRC_SCALE, antialias=True), T.RandomHorizontalFlip()]
        if augment == "strong":
            steps.append(T.TrivialAugmentWide())
            after = [T.RandomErasing(p=0.25)]
    if train and any_orientation:
        steps += [T.RandomVerticalFlip(), RandomQuarterTurn()]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)] + after)


def display_transform(input_size, resize_size):
    """The eval geometry without normalization: what the model saw, in real colours."""
    return T.Compose([T.Resize(resize_size, antialias=True), T.CenterCrop(input_size)])


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input: resize the short side to resize_size and center crop input_size
    (training: a random resized crop and flip instead), then normalize with mean and std. A checkpoint, an
    export's metadata and train.py's model meta all hold these four keys."""

    input_size: int
    resize_size: int
    mean: tuple
    std: tuple

    @classmethod
    def of(cls, record):
        """From a dict with the keys input_size, resize_size, mean and std (a checkpoint, a model's meta; without
        mean and std, ImageNet's)."""
        return cls(
            int(record["input_size"]),
            int(record["resize_size"]),
            tuple(record.get("mean", IMAGENET_MEAN)),
            tuple(record.get("std", IMAGENET_STD)),
        )

    def transform(self, train=False):
        return build_transforms(self.input_size, self.resize_size, self.mean, self.std, train)

    def display(self):
        """What the model saw, in real colours (no normalization)."""
        return display_transform(self.input_size, self.resize_size)

    def draft_side(self, train=False):
        """The short side a large JPEG may be decoded down to (load_rgb) with its transform still only shrinking
        it: eval resizes the short side to resize_size (decoded at DRAFT_MARGIN times that, so that the resize
        still does most of the reduction); training's smallest random crop (RRC_SCALE's area at the 3:4 aspect
        ratio) has sides of sqrt(area x 3/4) of the short side, resized to input_size."""
        if train:
            return math.ceil(self.input_size / math.sqrt(RRC_SCALE[0] * 3 / 4))
        return DRAFT_MARGIN * self.resize_size


# ----------------------------------------------------------------------------- datasets

BadSample = namedtuple("BadSample", "index reason")


class ImageDataset(Dataset):
    """(path, label) pairs -> (tensor, label, index). An unreadable file yields a BadSample instead of
    raising, so one bad image never stops an epoch; the collate function sorts them out. The task (tasks.py)
    turns the labels into a tensor."""

    def __init__(self, samples, transform, task=None, short_side=None):
        self.samples = list(samples)
        self.transform = transform
        self.task = task or SingleLabel()
        self.short_side = short_side  # large JPEGs decoded at a reduced scale down to this short side (load_rgb)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        if isinstance(index, tuple):  # (index, seed) from TrainSampler: augmentation fixed per image and epoch
            index, seed = index
            torch.manual_seed(seed)
        path, label = self.samples[index]
        try:
            image = load_rgb(path, self.short_side)
        except Exception as e:  # any decoder failure: zero bytes, truncated, not an image, too large
            return BadSample(index, describe_error(e))
        return self.transform(image), label, index


@dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    bad: list = field(default_factory=list)  # BadSample for each unreadable file of this batch

    def pin_memory(self):
        self.images, self.labels = self.images.pin_memory(), self.labels.pin_memory()
        return self


class SkipLog:
    """Unreadable files: one warning each, and a count per class for the summary."""

    def __init__(self, samples, class_names, warn, task=None):
        self.samples, self.class_names, self.warn = samples, class_names, warn
        self.task = task or SingleLabel()
        self.seen = {}

    def add(self, bad_items, samples=None):
        samples = samples or self.samples
        for item in bad_items:
            path, label = samples[item.index]
            if path not in self.seen:
                self.seen[path] = label
                self.warn(f"warning: skipping unreadable image {path} ({item.reason})")

    def restore(self, seen):
        """The unreadable files of a resumed run (a checkpoint stores multi-hot labels as lists)."""
        self.seen.update({path: self.task.restore(y) for path, y in seen.items()})

    def per_class(self):
        counts = {}
        for label in self.seen.values():
            name = self.task.text(label, self.class_names, " ") or "?"
            counts[name] = counts.get(name, 0) + 1
        return counts


def collate(items, task=SingleLabel()):
    good = [it for it in items if not isinstance(it, BadSample)]
    bad = [it for it in items if isinstance(it, BadSample)]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), bad)
    images = torch.stack([g[0] for g in good])
    labels = task.tensor(g[1] for g in good)
    indices = torch.tensor([g[2] for g in good], dtype=torch.long)
    return Batch(images, labels, indices, bad)


# ----------------------------------------------------------------------------- folders and split


def scan_class_folders(root, class_names=None, what="data folder"):
    """ImageFolder layout root/<class>/**/image. Returns (class_names, [(path, label)]).
    With `class_names` given (valid/ and test/ folders), folders must be a subset of them."""
    root = Path(root)
    if not root.is_dir():
        raise CLIError(f"{what} {str(root)!r} does not exist or is not a folder")
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise CLIError(f"{what} {str(root)!r} has no class subfolders (expected {root}/<class_name>/<image files>)")
    if class_names is None:
        class_names = folders
    else:
        unknown = [f for f in folders if f not in class_names]
        if unknown:
            raise CLIError(f"{what} {str(root)!r} has class folders that train/ lacks: {', '.join(unknown[:5])}")
    index = {c: i for i, c in enumerate(class_names)}
    samples = []
    for name in folders:
        files = list_images(root / name)
        if not files:
            raise CLIError(f"class folder {str(root / name)!r} has no images ({', '.join(IMG_EXTENSIONS)})")
        samples.extend((str(p), index[name]) for p in files)
    return class_names, samples


def stratified_split(labels, valid_ratio, seed):
    """Seeded split keeping each class's share: every class with 2+ images gets at least one of each."""
    generator = torch.Generator().manual_seed(seed)
    by_class = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    train, valid = [], []
    for y in sorted(by_class):
        members = by_class[y]
        order = torch.randperm(len(members), generator=generator).tolist()
        n_valid = round(len(members) * valid_ratio)
        if len(members) >= 2:
            n_valid = min(max(n_valid, 1), len(members) - 1)
        else:
            n_valid = 0
        valid.extend(members[j] for j in order[:n_valid])
        train.extend(members[j] for j in order[n_valid:])
    return sorted(train), sorted(valid)


@dataclass
class DataSplits:
    class_names: list
    train: list  # [(path, label)]
    valid: list
    test: list  # empty when there is no test/ folder
    valid_source: str  # "valid/ folder" or "split of train/"
    folders: tuple = ()  # the folders searched for the images (none for a CSV of labels)


SHIPPED = Path(__file__).resolve().parent / "data"  # data sets that live in this repository's data/
DEFAULT_DATASET = "fashion_sample"  # 4 Fashion-MNIST classes, PNG


def dataset_root(data_dir=None, dataset_name=None):
    """--data_dir DIR, or --dataset_name NAME for data/NAME; neither: the shipped sample."""
    if data_dir and dataset_name:
        raise CLIError("give --data_dir or --dataset_name, not both")
    if data_dir:
        return Path(data_dir)
    return SHIPPED / (dataset_name or DEFAULT_DATASET)


def resolve_data_dir(data_dir):
    """The data folder, checked to exist and be a folder (build_splits then reads its train/, valid/ and test/, or
    takes a bare ImageFolder root/<class>/ as the training folder)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise CLIError(f"data folder {str(root)!r} does not exist or is not a folder")
    return root


def build_splits(data_dir, valid_ratio, seed, csv_path=None, image_root=None, warn=print, task=None):
    """The train/valid/test samples of a class-folder data set, or of a CSV of labels (labels_csv.py), read
    as the task (tasks.py) says: one class per row, or a set of classes."""
    if csv_path:
        return csv_splits(csv_path, image_root, valid_ratio, seed, warn, task or SingleLabel())
    root = resolve_data_dir(data_dir)
    train_dir = root / "train" if (root / "train").is_dir() else root
    class_names, train = scan_class_folders(train_dir, what="training folder")
    if len(class_names) < 2:
        raise CLIError(
            f"training folder {str(train_dir)!r} has only one class ({class_names[0]}); "
            "a classifier needs at least two class subfolders"
        )
    if (root / "valid").is_dir():
        _, valid = scan_class_folders(root / "valid", class_names, what="validation folder")
        valid_source = "valid/ folder"
    else:
        if not 0 < valid_ratio < 1:
            raise CLIError(
                f"--valid_ratio must be between 0 and 1 (exclusive) when there is no valid/ folder; got {valid_ratio}"
            )
        train_idx, valid_idx = stratified_split([y for _, y in train], valid_ratio, seed)
        if not valid_idx:
            raise CLIError("too few images to hold out a validation set; add images or a valid/ folder")
        train, valid = [train[i] for i in train_idx], [train[i] for i in valid_idx]
        valid_source = f"seeded split of train/ (valid_ratio={valid_ratio}, seed={seed})"
    test = []
    if train_dir != root and (root / "test").is_dir():
        _, test = scan_class_folders(root / "test", class_names, what="test folder")
    folders = [train_dir] + [root / s for s in ("valid", "test") if train_dir != root and (root / s).is_dir()]
    return DataSplits(class_names, train, valid, test, valid_source, tuple(folders))


def csv_splits(path, image_root, valid_ratio, seed, warn=print, task=None):
    """DataSplits from a CSV of labels: its split column, else the seeded stratified split of its rows
    (stratified as the task says: by class, or by the set of labels)."""
    task = task or SingleLabel()
    parts = labels_csv.read_labels(path, image_root, warn, task)
    if None in parts:  # no split column: every row is a training row, split as train/ would be
        parts = {"train": parts[None]}
    if "train" not in parts:
        raise CLIError(f"--labels_csv {path} has no train rows")
    class_names = labels_csv.class_names_of(parts["train"], task)
    if len(class_names) < 2:
        raise CLIError(
            f"--labels_csv {path}: the train rows have only one label ({', '.join(class_names) or 'none'});"
            " a classifier needs at least two"
        )
    train = labels_csv.indexed(parts["train"], class_names, path, "train", task)
    task.check_format(class_names, train, f"--labels_csv {path}", warn)
    test = labels_csv.indexed(parts.get("test", []), class_names, path, "test", task)
    if "valid" in parts:
        valid = labels_csv.indexed(parts["valid"], class_names, path, "valid", task)
        return DataSplits(class_names, train, valid, test, f"valid rows of {Path(path).name}")
    if not 0 < valid_ratio < 1:
        raise CLIError(
            f"--valid_ratio must be between 0 and 1 (exclusive) when the CSV has no valid rows; got {valid_ratio}"
        )
    train_idx, valid_idx = stratified_split(task.strata(y for _, y in train), valid_ratio, seed)
    if not valid_idx:
        raise CLIError("too few images to hold out a validation set; add rows or valid rows")
    return DataSplits(
        class_names,
        [train[i] for i in train_idx],
        [train[i] for i in valid_idx],
        test,
        f"seeded split of the train rows of {Path(path).name} (valid_ratio={valid_ratio}, seed={seed})",
    )


def write_split_lists(splits, run_dir, task=None):
    """train_files.csv and valid_files.csv in the run folder: path,class per line."""
    for name, samples in (("train", splits.train), ("valid", splits.valid)):
        with atomic_open(Path(run_dir) / f"{name}_files.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "class"])
            writer.writerows((p, (task or SingleLabel()).text(y, splits.class_names, " ")) for p, y in samples)


# ----------------------------------------------------------------------------- samplers and loaders


class TrainSampler(Sampler):
    """Shuffles with a generator seeded by (seed, epoch), so a resumed run sees the same order, and gives
    each image a seed for its augmentation, so results do not depend on workers or interruptions.
    Shards across processes, padding so every rank gets the same number of samples (DDP needs it).
    With `weights`, draws with replacement in proportion to them (the balanced sampler)."""

    def __init__(self, n, seed, rank=0, world_size=1, weights=None):
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def sample_seed(self, epoch, index):
        return (self.seed * 1000003 + epoch) * 1000003 + index

    def __len__(self):
        return math.ceil(self.n / self.world_size)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g).tolist()
        total = len(self) * self.world_size
        order = (order * math.ceil(total / max(1, len(order))))[:total]
        return iter((i, self.sample_seed(self.epoch, i)) for i in order[self.rank :: self.world_size])


class ShardSampler(Sampler):
    """Evaluation: rank r takes r, r+world, ...; every sample exactly once over all ranks, no padding."""

    def __init__(self, n, rank=0, world_size=1):
        self.n, self.rank, self.world_size = n, rank, world_size

    def __len__(self):
        return len(range(self.rank, self.n, self.world_size))

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world_size))


def default_num_workers(device_type="cpu", processes_per_machine=1):
    """Loader processes per training/prediction process. With a GPU doing the maths, keep the CPUs
    decoding. On the CPU the workers compete with the compute threads: on 2 cores one worker cost a
    ResNet-34 fine-tune 35% and decoding is ~4% of its time, so small machines decode in-process."""
    cpus = max(1, (os.cpu_count() or 1) // max(1, processes_per_machine))
    if device_type in ("cuda", "mps"):
        return min(8, max(1, cpus - 1))
    return 0 if cpus <= 4 else min(4, cpus // 4)


def make_loader(dataset, batch_size, sampler, num_workers, pin_memory=False, drop_last=False):
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=partial(collate, task=dataset.task),  # the task turns labels into a tensor
        pin_memory=pin_memory,
        drop_last=drop_last,
        worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )


@dataclass
class Loaders:
    train: DataLoader
    valid: DataLoader
    test: DataLoader  # None without a test/ folder
    train_eval: DataLoader  # the training images with eval transforms (feature cache)


def build_loaders(
    splits,
    input_size,
    resize_size,
    mean,
    std,
    batch_size,
    num_workers,
    seed,
    rank=0,
    world_size=1,
    pin_memory=False,
    class_weights=None,
    task=None,
    augment="default",
    any_orientation=False,
):
    """Train loader with augmentation (the `augment` policy) and a seeded, sharded sampler; the others with eval
    transforms, each image seen exactly once over all processes. `class_weights` turns on the balanced sampler;
    the task (tasks.py) turns the labels into tensors."""
    preprocess = Preprocess(input_size, resize_size, tuple(mean), tuple(std))
    train_tf = build_transforms(
        input_size, resize_size, mean, std, train=True, augment=augment, any_orientation=any_orientation
    )
    eval_tf = preprocess.transform()
    sample_weights = None
    if class_weights is not None:
        sample_weights = [class_weights[y] for _, y in splits.train]
    train_sampler = TrainSampler(len(splits.train), seed, rank, world_size, sample_weights)
    per_rank = len(train_sampler)
    drop_last = per_rank > batch_size and per_rank % batch_size == 1  # a lone last sample breaks BatchNorm
    train = make_loader(
        ImageDataset(splits.train, train_tf, task, preprocess.draft_side(train=True)),
        batch_size,
        train_sampler,
        num_workers,
        pin_memory,
        drop_last,
    )

    def eval_loader(samples):
        if not samples:
            return None
        return make_loader(
            ImageDataset(samples, eval_tf, task, preprocess.draft_side()),
            batch_size,
            ShardSampler(len(samples), rank, world_size),
            num_workers,
            pin_memory,
        )

    return Loaders(train, eval_loader(splits.valid), eval_loader(splits.test), eval_loader(splits.train))


def eval_subset(loader, indices, rank=0, world_size=1):
    """An eval loader like `loader` over its samples at `indices` (each once over all processes)."""
    samples = [loader.dataset.samples[i] for i in indices]
    dataset = loader.dataset
    return make_loader(
        ImageDataset(samples, dataset.transform, dataset.task, dataset.short_side),
        loader.batch_size,
        ShardSampler(len(samples), rank, world_size),
        loader.num_workers,
        loader.pin_memory,
    )
