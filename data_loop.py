"""predict.py's part of the data loop: the penultimate features of every row (--embeddings), the input images most
like one image (--similar_to), and the images worth labelling first (--rank_for_labelling), all from the features
and probabilities the prediction pass computes anyway.

The features are the classifier layer's input (its spatial mean for a 1x1-convolution classifier), the ones the
out-of-distribution score reads; similarities are cosines between them. The ranking for labelling takes the most
uncertain images (the calibration's uncertainty: 1 - the top-2 margin, or how close a class is to its multi-label
threshold) and spreads the picks over feature space by k-center greedy (similarity.k_center), so that twenty
near-identical uncertain images do not take twenty places."""

import contextlib
import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import data_loader
import similarity
from cli import CLIError
from utils import atomic_open, atomic_path

SIMILAR_COLUMNS = ["rank", "file_dir", "similarity", "predict"]
TO_LABEL_COLUMNS = ["file", "label", "why", "score"]
TOP = 20  # --similar_to lists this many images unless --top says
POOL = 4  # --rank_for_labelling spreads its N picks over the POOL x N most uncertain images


@dataclass
class Asked:
    """What predict.py's --embeddings, --similar_to (--top) and --rank_for_labelling ask for, beside --output."""

    output: str
    embeddings: str = None
    similar_to: str = None
    top: int = None  # --top K; None: TOP
    rank: int = None  # --rank_for_labelling N
    train_flags: str = ""  # the flags the model was trained with, for the hint (train_flags_of)

    @property
    def features(self):
        """Whether the rows keep their features (any of the three)."""
        return bool(self.embeddings or self.similar_to or self.rank)

    def check(self, n_inputs):
        """One error line, before any work, for values that cannot work or a list to label whose labels were already
        filled in; returns --similar_to's image (RGB), or None."""
        if self.embeddings and Path(self.embeddings).suffix.lower() != ".npy":
            raise CLIError(f"--embeddings {self.embeddings!r}: name an .npy file (numpy.load reads it)")
        if self.rank is not None and not 0 < self.rank <= n_inputs:
            raise CLIError(f"--rank_for_labelling {self.rank}: give a number from 1 to the {n_inputs} images to rank")
        if self.rank and labelled_rows(to_label_path(self.output)):
            raise CLIError(
                f"{to_label_path(self.output)} has labels filled in, which this run would replace: train on it, move "
                "it, or give another --output"
            )
        if not self.similar_to:
            if self.top is not None:  # --top 3 meant as --topk 3 would otherwise change nothing, silently
                raise CLIError(
                    f"--top {self.top} is how many images --similar_to lists: give --similar_to IMAGE with it "
                    "(the k best classes of each image: --topk K)"
                )
            return None
        if self.top is None:
            self.top = TOP
        if self.top <= 0:
            raise CLIError(f"--top must be positive; got {self.top}")
        try:
            return data_loader.load_rgb(self.similar_to)
        except Exception as e:  # a missing file, not an image, truncated, a decompression bomb
            raise CLIError(f"--similar_to {self.similar_to}: cannot be read as an image ({e})") from None

    def write(self, store, files, query_features, log=print):
        """--embeddings' summary line, --similar_to's and --rank_for_labelling's lists, after --output is written."""
        n_rows = int((~np.isnan(store.uncertainty)).sum())
        if self.embeddings:
            unreadable = "; NaN for unreadable images" if n_rows < len(files) else ""
            dim, order = store.features.shape[1], f"rows in {Path(self.output).name}'s order{unreadable}"
            log(f"embeddings: {n_rows} rows of {dim} float32 features ({order}) -> {self.embeddings}")
        if self.similar_to:
            with open(self.output, encoding="utf-8-sig", newline="") as f:
                answers = [row.get("predict", "") for row in csv.DictReader(f)]
            rows = similar_rows(store, files, answers, query_features, self.top, skip=self.similar_to)
            write_csv(similar_path(self.output), SIMILAR_COLUMNS, rows)
            best = f"; the closest {rows[0]['file_dir']} ({rows[0]['similarity']:.3f})" if rows else ""
            log(f"similar to {self.similar_to}: {len(rows)} images{best} -> {similar_path(self.output)}")
        if self.rank:
            path = to_label_path(self.output)
            rows = labelling_rows(store, files, self.rank, path.parent)
            write_csv(path, TO_LABEL_COLUMNS, rows)
            fewer = f" (only {len(rows)} readable, distinct files)" if len(rows) < self.rank else ""
            model_fn = path.with_name(f"{path.stem}.pth")
            log(
                f"to label first: {len(rows)} images{fewer}, uncertain and unlike each other -> {path}; fill in the "
                f"label column and add the rows to the CSV of labels you train on (a model of this list alone knows "
                f"only the classes you label in it), or try it alone: python train.py --labels_csv {path} "
                f"{self.train_flags} --model_fn {model_fn}"
            )


def train_flags_of(ckpt):
    """train.py's flags that made this checkpoint's model: its backbone, its weights, frozen or not, its task."""
    saved = ckpt.get("args", {})
    flags = [f"--model_name {ckpt.get('model_name', saved.get('model_name'))}", f"--input_size {ckpt['input_size']}"]
    flags += ["--use_pretrained"] if saved.get("use_pretrained") else []
    flags += [f"--weights {saved['weights']}"] if saved.get("weights") else []
    flags += ["--freeze"] if saved.get("freeze") else []
    flags += ["--multi_label"] if saved.get("multi_label") else []
    return " ".join(flags)


def labelled_rows(path):
    """How many rows of an existing list to label have a label filled in (0 when there is no such file)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return sum(bool((row.get("label") or "").strip()) for row in csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return 0


def write_csv(path, columns, rows):
    with atomic_open(path, "w", newline="", encoding="utf-8-sig") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)


def similar_path(output):
    """<output stem>_similar.csv, beside --output."""
    return Path(output).with_name(f"{Path(output).stem}_similar.csv")


def to_label_path(output):
    """<output stem>_to_label.csv, beside --output."""
    return Path(output).with_name(f"{Path(output).stem}_to_label.csv")


class FeatureStore:
    """One row of float32 features and one uncertainty per result row, in result.csv's order (NaN for unreadable
    images): an .npy file that appears whole when the block ends (`path`), or memory alone (path None)."""

    def __init__(self, n, path=None):
        self.n, self.path = n, path
        self.features, self.uncertainty = None, np.full(n, np.nan, dtype=np.float32)
        self._files = contextlib.ExitStack()

    def __enter__(self):
        if self.path:
            self.tmp = self._files.enter_context(atomic_path(self.path))
        return self

    def __exit__(self, *exc):
        if self.path and self.features is not None:
            self.features.flush()
            self.features = None  # the memory map closed before the file is renamed into place
        result = self._files.__exit__(*exc)
        if self.path and exc[0] is None:
            self.features = np.load(self.path, mmap_mode="r")  # for --similar_to and --rank_for_labelling
        return result

    def add(self, index, features, uncertainty):
        if features is None:
            return
        if self.features is None:
            shape = (self.n, len(features))
            if self.path:
                self.features = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.float32, shape=shape)
            else:
                self.features = np.empty(shape, dtype=np.float32)
            self.features[:] = np.nan
        self.features[index] = features
        self.uncertainty[index] = uncertainty

    def unit_rows(self):
        """(indices of the rows with features, their features as unit rows in a float32 tensor)."""
        valid = np.flatnonzero(~np.isnan(self.uncertainty))
        emb = torch.from_numpy(np.asarray(self.features[valid], dtype=np.float32))
        return valid, torch.nn.functional.normalize(emb, dim=1)


def similar_rows(store, files, predictions, query, top, skip=None):
    """The `top` rows most like the query features (cosine), most similar first; `skip`: a file (the query
    itself, when it is among the inputs) left out."""
    valid, emb = store.unit_rows()
    sims = emb @ torch.nn.functional.normalize(torch.as_tensor(query, dtype=torch.float32), dim=0)
    order = torch.argsort(sims, descending=True).tolist()
    same = os.path.realpath(skip) if skip else None
    rows = []
    for j in order:
        i = int(valid[j])
        if same and os.path.realpath(files[i]) == same:
            continue
        rows.append({"file_dir": files[i], "similarity": round(float(sims[j]), 4), "predict": predictions[i]})
        if len(rows) == top:
            break
    return [{"rank": r, **row} for r, row in enumerate(rows, 1)]


def labelling_rows(store, files, n, csv_folder):
    """n rows of <output>_to_label.csv: distinct images worth labelling first (k-center greedy over the POOL x n
    most uncertain), with an empty label, why each was picked, and its uncertainty as the score. Paths relative to
    the CSV's folder when the images are under it (train.py --labels_csv's default root), else absolute."""
    valid, emb = store.unit_rows()
    first = {}  # a file listed twice is ranked once
    for j, i in enumerate(valid.tolist()):
        first.setdefault(os.path.realpath(files[i]), j)
    keep = sorted(first.values())
    valid, emb = valid[keep], emb[keep]
    uncertainty = torch.from_numpy(store.uncertainty[valid])
    picks = similarity.k_center(emb, n, uncertainty, pool=POOL)
    rank_of = {int(j): r for r, j in enumerate(torch.argsort(uncertainty, descending=True).tolist(), 1)}
    rows = []
    for k, j in enumerate(picks):
        why = f"uncertainty {float(uncertainty[j]):.3f} ({ordinal(rank_of[j])} of {len(valid)})"
        if k:
            nearest = float((1 - emb[picks[:k]] @ emb[j]).min())
            why += f"; cosine distance {nearest:.3f} to the nearest earlier pick"
        else:
            why += "; the first pick"
        rows.append(
            {
                "file": relative_to(files[int(valid[j])], csv_folder),
                "label": "",
                "why": why,
                "score": round(float(uncertainty[j]), 4),
            }
        )
    return rows


def relative_to(file, folder):
    path = os.path.abspath(file)
    rel = os.path.relpath(path, os.path.abspath(folder))
    return path if rel.split(os.sep)[0] == os.pardir else rel


def ordinal(n):
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"
