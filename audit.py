"""The data audit of `train.py --check_data`: every image decoded once; unreadable files, per-class counts and
imbalance, files shared by train/valid/test (the same bytes), tiny images, unusual modes. (The label check that
follows with a pretrained backbone is label_check.py's.)"""

import hashlib
import io
import warnings
from collections import Counter, defaultdict

from PIL import Image

from cli import describe_error
from data_loader import resolve_data_dir, scan_class_folders
from tasks import SingleLabel

TINY_SIDE = 16  # images with a side below this many pixels are reported as tiny
MODE_NAMES = {
    "RGB": "colour (RGB)",
    "L": "grayscale (L)",
    "RGBA": "colour with transparency (RGBA)",
    "P": "palette (P)",
    "CMYK": "CMYK",
    "LA": "grayscale with transparency (LA)",
    "1": "black-and-white (1)",
    "I;16": "16-bit grayscale (I;16)",
    "I": "32-bit grayscale (I)",
    "F": "floating-point grayscale (F)",
    "YCbCr": "YCbCr",
    "PA": "palette with transparency (PA)",
}  # Pillow's mode codes in words


def audit_data(data_dir, out=print):
    """Decode every image once: unreadable files, per-class counts and imbalance, files shared by
    train/valid/test (same bytes), tiny images, unusual modes. Returns the exit status: 1 on
    unreadable files or leaks, else 0."""
    root = resolve_data_dir(data_dir)
    parts = [(n, root / n) for n in ("train", "valid", "test") if (root / n).is_dir()] or [("train", root)]
    class_names, scanned = None, []
    for part, folder in parts:
        class_names, samples = scan_class_folders(folder, class_names if part != "train" else None, f"{part} folder")
        scanned.append((part, samples))
    return audit_samples(scanned, class_names, out)


def csv_parts(splits):
    """audit_samples' parts of a CSV of labels: its train (with the held-out valid rows), valid and test rows."""
    if splits.valid_source.startswith("seeded split"):
        return [("train", splits.train + splits.valid), ("test", splits.test)]
    return [("train", splits.train), ("valid", splits.valid), ("test", splits.test)]


def audit_samples(parts, class_names, out=print, task=None):
    """audit_data's checks on [(part name, [(path, label)])] (multi-label: images showing each class)."""
    unreadable, tiny, modes, owners = [], [], Counter(), defaultdict(set)
    for part, samples in parts:
        if not samples:
            continue
        counts = (task or SingleLabel()).counts(samples, len(class_names))
        shown = ", ".join(f"{c} {n}" for c, n in zip(class_names, counts))
        ratio = max(counts) / max(1, min(counts))
        out(f"{part}: {len(samples)} images; {shown}; imbalance {ratio:.1f}x")
        for path, _ in samples:
            with open(path, "rb") as f:
                content = f.read()  # read once: hashed for leaks, then decoded
            owners[hashlib.sha1(content).hexdigest()].add((part, path))
            buffer = io.BytesIO(content)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    with Image.open(buffer) as img:
                        img.load()
                        modes[img.mode] += 1
                        if min(img.size) < TINY_SIDE:
                            tiny.append(f"{path} ({img.size[0]}x{img.size[1]})")
            except Exception as e:  # Pillow names the buffer it read (<_io.BytesIO ...>): name the file
                unreadable.append(f"{path}: {describe_error(e).replace(repr(buffer), repr(str(path)))}")
    leaks = [sorted(p for _, p in group) for group in owners.values() if len({part for part, _ in group}) > 1]
    shown = ", ".join(f"{n} {MODE_NAMES.get(m, m)}" for m, n in modes.most_common())
    out(
        f"image modes: {shown or 'none'}"
        + ("" if set(modes) <= {"RGB", "L"} else "; all are converted to RGB when loaded")
    )
    for title, items in (
        ("unreadable", unreadable),
        ("tiny", tiny),
        ("identical files in more than one of train/valid/test", [" = ".join(g) for g in leaks]),
    ):
        out(f"{title}: {len(items)}")
        for item in items[:20]:
            out(f"  {item}")
        if len(items) > 20:
            out(f"  ... and {len(items) - 20} more")
    return 1 if unreadable or leaks else 0
