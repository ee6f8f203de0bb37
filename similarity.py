"""Which images are near-copies of each other, which are unlike the rest, which to label next, from one pass of the
frozen backbone over the images (the label check's pass).

Near-duplicates. One global embedding and one threshold do not separate copies from look-alikes: on
electroluminescence solar cells two distinct cells score higher in the pooled embedding than a cell and its own
re-encoded copy. So candidates are shortlisted by their nearest neighbours in a spatially aware embedding (the first
backbone block at the last feature resolution, pooled to at most GRID x GRID cells, each cell's channels normalized,
projected to PROJECTED dimensions: where things are counts, not only what), then each candidate pair is checked on the
images themselves: grayscale thumbnails with their shading removed (a high-pass) and the set's mean thumbnail taken
off (the structure every image of a look-alike set shares: a solar cell's grid), aligned over mirror images, crops and
shifts, compared by correlation. Measured on two sets (bench/near_dup_bench.py, docs/data_loop.md): a re-saved copy
(resized to 50-90%, JPEG 50-90) scores 0.96-0.99 there; two distinct Fashion-MNIST products at most 0.93, but two
distinct solar cells up to 0.97. So the pixel score that makes a copy is set per data set: above PAIR_FLOOR, and above
what the set's own distinct neighbours reach (their SET_QUANTILE quantile, plus MARGIN). A pair between the floor and
that bar is a look-alike: the check cannot tell a copy from another object that alike, and says so.

Outliers: 1 - the mean cosine similarity of an image's pooled embedding to its nearest ones (5% of the set), over the
whole set and within its own class (an image in the wrong folder), the larger of the two. Labelling picks: the most
uncertain predictions, spread over the feature space by k-center greedy, so that twenty copies of one uncertain image
are not all picked.

Every search is blocked (BLOCK query rows at a time against all rows), so memory grows with the images, not with
their square."""

import math
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

import data_loader

GRID = 7  # the spatial embedding's cells per side at most
PROJECTED = 256  # its dimensions after the random projection
BLOCK = 1024  # query rows per block of a neighbour search
NEIGHBOURS = 5  # nearest neighbours looked at per image
SHORTLIST = 3  # of them, candidates for the pixel check
THUMB = 128  # side of the thumbnails the pixel check compares
SCALES = tuple(
    round(1 - 0.01 * i, 2) for i in range(11)
)  # centre crops tried (1.0 to 0.9), for copies cropped by <= 10%
MAX_SHIFT = 12  # pixels of a thumbnail a crop may be off centre by (about 9%)
PAIR_FLOOR = 0.95  # a pixel score below this is never a copy (distinct products of Fashion-MNIST: at most 0.93)
CROP_FLOOR = 0.9  # the same for a crop aligned with a whole image (distinct Fashion-MNIST products: at most 0.8x)
SMALL = THUMB // 2  # an image whose short side is under this many pixels is blown up into the thumbnail: smooth
# thumbnails of distinct things correlate more (two trousers of the 28 px Fashion-MNIST sample: 0.91-0.92 as crops),
# so a crop of such an image counts as a copy only above PAIR_FLOOR
OUTLIER_SHARE, OUTLIER_K = 0.05, 50  # an outlier's neighbours: 5% of the set, 5 to 50 of them
SET_QUANTILE, MARGIN = 0.99, 0.005  # the copy bar: above the set's own distinct neighbours' 99th percentile


# ----------------------------------------------------------------------------- the spatial embedding


def embedding_layer(model, head, input_size, device):
    """The module whose output the spatial embedding pools: among the model's blocks (modules two levels deep or
    less, outside the classifier), the first to finish at the smallest spatial size over 1 pixel (stride 32 at 224
    px: EfficientNet's and MobileNet's first block there, ResNet's layer4.0). None when no block keeps a map."""
    found, reached = [], []

    def keep(name):
        def hook(module, inputs, out):
            if not reached and torch.is_tensor(out) and out.dim() == 4 and out.shape[2] * out.shape[3] > 1:
                found.append((name, module, out.shape[2] * out.shape[3]))

        return hook

    blocks = [(n, m) for n, m in model.named_modules() if n and n.count(".") <= 1 and not n.startswith(head)]
    hooks = [m.register_forward_hook(keep(n)) for n, m in blocks]
    hooks.append(model.get_submodule(head).register_forward_pre_hook(lambda m, i: reached.append(True)))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, input_size, input_size, device=device))
    finally:
        for h in hooks:
            h.remove()
    if not found:
        return None
    smallest = min(size for _, _, size in found)
    return next(module for _, module, size in found if size == smallest)


@contextmanager
def capture_maps(module):
    """Inside: a list that gets `module`'s output of every forward pass (nothing when module is None)."""
    taken = []
    handle = None if module is None else module.register_forward_hook(lambda m, i, out: taken.append(out.detach()))
    try:
        yield taken
    finally:
        if handle is not None:
            handle.remove()


def spatial_embedding(feature_map, seed=0):
    """(N, PROJECTED) unit rows of (N, C, h, w) maps: pooled to at most GRID x GRID, each cell's channel vector
    normalized (every part of the image weighs the same), flattened, randomly projected (Gaussian, seeded: the same
    matrix for every batch), normalized."""
    side = min(GRID, feature_map.shape[2], feature_map.shape[3])
    cells = torch.nn.functional.adaptive_avg_pool2d(feature_map.float(), side)
    flat = torch.nn.functional.normalize(cells, dim=1).flatten(1)
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(flat.shape[1], PROJECTED, generator=generator) / math.sqrt(PROJECTED)
    return torch.nn.functional.normalize(flat.cpu() @ matrix, dim=1)


# ----------------------------------------------------------------------------- neighbour search


def neighbours(emb, k=NEIGHBOURS, block=BLOCK, within=None):
    """(indices (N, k), cosine similarities (N, k)) of each row's k nearest other rows of the unit rows `emb`,
    searched BLOCK rows at a time; `within`: per row a group id (its class), to search only its own group."""
    n = len(emb)
    k = max(0, min(k, n - 1))
    found_i = torch.zeros(n, k, dtype=torch.long)
    found_s = torch.full((n, k), -math.inf)
    for start in range(0, n, block):
        stop = min(n, start + block)
        sims = emb[start:stop] @ emb.T
        sims[torch.arange(stop - start), torch.arange(start, stop)] = -math.inf  # not itself
        if within is not None:
            sims[within[start:stop, None] != within[None, :]] = -math.inf
        found_s[start:stop], found_i[start:stop] = sims.topk(k, dim=1)
    return found_i, found_s


# ----------------------------------------------------------------------------- the pixel check


def high_pass(image):
    a = np.asarray(image, dtype=np.float32)
    return a - np.asarray(image.filter(ImageFilter.GaussianBlur(2)), dtype=np.float32)


class PixelCheck:
    """Pixel scores of image pairs: the best normalized cross-correlation of their high-passed thumbnails, minus the
    set's mean thumbnail, over mirror images, SCALES crops of either and shifts up to MAX_SHIFT pixels."""

    def __init__(self, files):
        self.files = files
        self.cache, self.sides = {}, {}
        self.mean = np.zeros((THUMB, THUMB), np.float32)
        step = max(1, len(files) // 256)  # the shared structure, from up to 256 images spread over the set
        sample = [self.thumb(f, 1.0) for f in files[::step]]
        sample = [s for s in sample if s is not None]
        if sample:
            self.mean = np.mean(sample, axis=0)

    def thumb(self, path, scale):
        try:
            image = ImageOps.grayscale(data_loader.load_rgb(path))
        except Exception:  # noqa: BLE001 - unreadable: no pixel score
            return None
        w, h = image.size
        self.sides[path] = min(w, h)
        box = tuple(
            round(v) for v in ((1 - scale) * w / 2, (1 - scale) * h / 2, (1 + scale) * w / 2, (1 + scale) * h / 2)
        )
        return high_pass(image.crop(box).resize((THUMB, THUMB), Image.BILINEAR))

    def small(self, i, j):
        """Whether either image of the pair is under SMALL pixels on its short side (after its thumbnails were made)."""
        return min(self.sides.get(self.files[i], SMALL), self.sides.get(self.files[j], SMALL)) < SMALL

    def spectra(self, i):
        """(the whole thumbnail minus the set's mean, and its mirror image; per SCALES crop, the plain thumbnail and its
        mirror image), as rfft2s of unit-norm arrays; None for an unreadable image. The mean is taken off the whole
        thumbnails only: a crop's shared structure sits elsewhere, and taking the mean off it would add, not remove."""
        if i not in self.cache:
            views = []
            for scale in SCALES:
                t = self.thumb(self.files[i], scale)
                if t is None:
                    self.cache[i] = None
                    return None
                views.append(pair(t))
            self.cache[i] = (pair(self.thumb(self.files[i], 1.0) - self.mean), views)
        return self.cache[i]

    def score(self, i, j):
        """(whole: the whole thumbnails, the set's mean taken off, one against the other and its mirror image;
        cropped: one image whole against the other's crops and their mirror images, plain), each the best
        correlation over shifts up to MAX_SHIFT pixels; (0, 0) for an unreadable image."""
        a, b = self.spectra(i), self.spectra(j)
        if a is None or b is None:
            return 0.0, 0.0
        whole = max(correlation(a[0][0], other) for other in b[0])
        cropped = max(
            correlation(fixed[0][0], other)
            for fixed, moving in ((a[1], b[1]), (b[1], a[1]))
            for view in moving[1:]
            for other in view
        )
        return whole, cropped


def pair(t):
    t = t - t.mean()
    t = t / (np.linalg.norm(t) + 1e-6)
    return np.fft.rfft2(t), np.fft.rfft2(t[:, ::-1].copy())


def correlation(fa, fb):
    """The best circular cross-correlation of two unit-norm thumbnails (their rfft2s) over shifts up to MAX_SHIFT."""
    cross = np.fft.irfft2(fa * np.conj(fb), s=(THUMB, THUMB))
    return float(np.roll(np.roll(cross, MAX_SHIFT, 0), MAX_SHIFT, 1)[: 2 * MAX_SHIFT + 1, : 2 * MAX_SHIFT + 1].max())


def copy_bar(distinct_scores, floor=PAIR_FLOOR, quantile=None):
    """The pixel score a pair needs to count as a copy in this set: above PAIR_FLOOR and above the set's own
    distinct neighbours (their SET_QUANTILE quantile, plus MARGIN)."""
    if len(distinct_scores) == 0:
        return floor
    return max(floor, float(np.quantile(distinct_scores, quantile or SET_QUANTILE)) + MARGIN)


def groups_of(pairs, n):
    """Connected groups (sorted index lists of 2 or more) of the pairs (i, j) over n images."""
    parent = list(range(n))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        parent[root(i)] = root(j)
    found = {}
    for i in range(n):
        found.setdefault(root(i), []).append(i)
    return [g for g in found.values() if len(g) > 1]


# ----------------------------------------------------------------------------- outliers and labelling picks


def outlier_scores(emb, classes=None):
    """Per image: 1 - the mean cosine similarity to its k nearest neighbours (k: OUTLIER_SHARE of the set, NEIGHBOURS
    to OUTLIER_K), over the whole set and within its own class; the larger. A k that small lets a handful of foreign
    images shield each other (ten planted solar cells among 600 products ranked 48th to 588th with k = 5; 1st to
    10th with k = 33: docs/data_loop.md). emb: unit rows (the pooled embedding)."""
    k = max(NEIGHBOURS, min(OUTLIER_K, math.ceil(OUTLIER_SHARE * len(emb))))
    _, whole = neighbours(emb, k)
    score = 1 - whole.mean(1)
    if classes is not None and len(classes):
        counts = torch.bincount(classes)
        own_k = min(k, int(counts[counts > 0].min()) - 1)
        if own_k >= NEIGHBOURS:
            _, own = neighbours(emb, own_k, within=classes)
            score = torch.maximum(score, 1 - own.mean(1))
    return score


def k_center(emb, n, uncertainty, pool=4):
    """n row indices to label first: among the pool x n most uncertain rows, the most uncertain, then each next the
    row farthest (cosine distance) from every pick so far (k-center greedy). emb: unit rows."""
    order = torch.argsort(uncertainty, descending=True)
    candidates = order[: min(len(order), max(n, pool * n))]
    picks = [0]  # positions in candidates
    distance = 1 - emb[candidates] @ emb[candidates[0]]
    distance[0] = -math.inf
    while len(picks) < min(n, len(candidates)):
        best = int(torch.argmax(distance))
        picks.append(best)
        distance = torch.minimum(distance, 1 - emb[candidates] @ emb[candidates[best]])
        distance[picks] = -math.inf
    return [int(candidates[p]) for p in picks]


# ----------------------------------------------------------------------------- the audit's two tables

DUPLICATE_COLUMNS = ["group", "file", "split", "label", "similarity", "kind"]
OUTLIER_COLUMNS = ["file", "split", "label", "score"]
OUTLIER_SHOWN = 0.02  # the summary names the top 2% of outliers.csv


def near_duplicate_rows(files, spatial, labels, splits):
    """(rows of near_duplicates.csv, {kind: groups}, the copy bars (whole, cropped), pairs checked). labels: per file
    as text."""
    n = len(files)
    if n < 2:
        return [], {}, (PAIR_FLOOR, PAIR_FLOOR), 0
    idx, _ = neighbours(spatial, NEIGHBOURS)
    check = PixelCheck(files)
    pairs = {tuple(sorted((i, int(j)))) for i in range(n) for j in idx[i, :SHORTLIST].tolist()}
    scores = {p: check.score(*p) for p in sorted(pairs)}
    step = max(1, n // 300)  # the set's distinct neighbours: each sampled image and its farthest of the NEIGHBOURS
    distinct = [check.score(i, int(idx[i, -1])) for i in range(0, n, step) if idx.shape[1] > SHORTLIST]
    bar = (copy_bar([w for w, _ in distinct]), copy_bar([c for _, c in distinct], CROP_FLOOR, 1.0))
    is_copy = {
        p: w >= bar[0] or c >= (max(bar[1], PAIR_FLOOR) if check.small(*p) else bar[1]) for p, (w, c) in scores.items()
    }
    copy_groups = groups_of([p for p, yes in is_copy.items() if yes], n)
    in_copies = {i for g in copy_groups for i in g}
    alike = [p for p, (w, _) in scores.items() if w >= PAIR_FLOOR and not is_copy[p] and not set(p) & in_copies]
    alike_groups = groups_of(alike, n)
    rows, counts = [], {}
    for number, (group, alike) in enumerate([(g, False) for g in copy_groups] + [(g, True) for g in alike_groups], 1):
        kind = "look-alike" if alike else group_kind([splits[i] for i in group], [labels[i] for i in group])
        counts[kind] = counts.get(kind, 0) + 1
        for i in group:
            best = max((max(s) for p, s in scores.items() if i in p and set(p) <= set(group)), default=0.0)
            rows.append(
                {
                    "group": number,
                    "file": files[i],
                    "split": splits[i],
                    "label": labels[i],
                    "similarity": round(best, 4),
                    "kind": kind,
                }
            )
    return rows, counts, bar, len(scores) + len(distinct)


def group_kind(splits, labels):
    """leak: the copies span train/valid/test; conflict: they carry different labels; copy: neither."""
    kinds = (["leak"] if len(set(splits)) > 1 else []) + (["conflict"] if len(set(labels)) > 1 else [])
    return "+".join(kinds) or "copy"


def outlier_rows(files, pooled, classes, labels, splits):
    """Rows of outliers.csv, most unusual first (outlier_scores)."""
    if len(files) < 2:
        return []
    score = outlier_scores(pooled, classes)
    order = sorted(range(len(files)), key=lambda i: (-float(score[i]), files[i]))
    return [
        {"file": files[i], "split": splits[i], "label": labels[i], "score": round(float(score[i]), 4)} for i in order
    ]
