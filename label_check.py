"""The label check of `train.py --check_data`: which images' labels are probably wrong, before training.

Features of every train and valid image from the frozen pretrained backbone (the eval view, plus seeded
augmented views when asked), out-of-fold probabilities from a multinomial logistic regression on them
(stratified, seeded k-fold; its L2 strength chosen by the out-of-fold log loss over a small grid; the
folds drawn a few times and averaged), the images ranked by the out-of-fold probability of their given
label (self-confidence; lower = more suspicious), and flagged by confident learning's per-class
thresholds (Northcutt, Jiang and Chuang, "Confident Learning", JAIR 2021):
a class's threshold is the mean probability of that class over the images labelled with it, and an
image is flagged when another class's probability reaches that class's threshold and exceeds the
probability of its given label (an off-diagonal entry of the confident joint).

Multi-label (--multi_label): each class is its own two-class problem (present or absent), checked the same
way; an image is flagged when any of its classes is (a label missing, or one too many), its suggested label
set flips those classes, and its score is the lowest out-of-fold probability of a class's given state.
"""

import csv
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import data_loader
import features
import model_loader
import similarity
from utils import atomic_open, save_image_grid

FOLDS = 5  # out-of-fold probabilities from 5-fold cross-validation (fewer when a class has fewer images)
REPEATS = 3  # the folds are drawn this many times (seed, seed+1, ...) and the probabilities averaged
L2_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)  # L2 strengths tried, per image, on standardized features
# fits below this many (problems x rows x channels) run on one thread: 400 images took 3.8 s there against
# 32.6 s on 2 threads of a busy 2-core machine, where the threads wait for each other on such small products
SMALL_FIT = 2**28
MAX_ITER = 100  # L-BFGS iterations per batched fit at most (the problem is convex; a cap, not a schedule)
GRID_IMAGES = 24  # suspects shown in label_issues.png
CLEAN_DRAWS = 20  # simulated clean label sets behind the expected number of flags (their mean is printed)
TEMPERATURES = tuple(float(t) for t in torch.exp(torch.linspace(-2, 2, 81)))  # tried by as_if_clean, e^-2 to e^2
NOISE_SHARES = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)  # shares of random labels tried by as_if_clean
COLUMNS = ["file", "given", "suggested", "score", "flagged", "suggested_score", "split"]


# ----------------------------------------------------------------------------- folds and the classifier


def stratified_folds(labels, k, seed):
    """Fold number (0..k-1) of each image: every class is shuffled (seeded) and dealt round the folds,
    continuing where the previous class stopped, so folds differ in size by at most one image."""
    labels = torch.as_tensor(labels)
    generator = torch.Generator().manual_seed(seed)
    folds = torch.empty(len(labels), dtype=torch.long)
    position = 0
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        folds[members] = (torch.arange(len(members)) + position) % k
        position += len(members)
    return folds


def choose_folds(labels, class_names, k=FOLDS):
    """k, reduced to the smallest class's size (at least 2), and a note when it was reduced."""
    counts = torch.bincount(torch.as_tensor(labels), minlength=len(class_names))
    present = [(int(n), name) for n, name in zip(counts.tolist(), class_names) if n > 0]
    smallest, name = min(present)
    if smallest >= k:
        return k, None
    reduced = max(2, smallest)
    note = f"class {name} has {smallest} image{'s' if smallest != 1 else ''}: {reduced}-fold instead of {k}-fold"
    if smallest < 2:
        note += f"; with a single image, {name} is missing from its training fold and its score means little"
    return reduced, note


def standardize(features):
    """Zero mean, unit spread per channel over every image and view. It uses no labels, so computing it
    once over all folds leaks nothing into the held-out folds."""
    flat = features.reshape(-1, features.shape[-1])
    std = flat.std(0).clamp_min(1e-6)  # channels that never fire (ReLU) have no spread
    return (features - flat.mean(0)) / std


def fit_softmax(x, y, masks, l2s, n_classes):
    """Several multinomial logistic regressions at once on the rows x (N, dim), labels y (N,): problem p
    fits the rows where masks[p] is 1 with mean cross-entropy + l2s[p]/2 * |W_p|^2 (bias not penalised).
    They share no parameter, so minimising the sum of their losses (L-BFGS, full batch) minimises each;
    one batched problem costs a few large matrix products instead of many small ones.
    Returns (P, dim + 1, n_classes) weights, each problem's bias in its last row."""
    n_problems = len(masks)
    w = torch.zeros(n_problems, x.shape[1] + 1, n_classes, requires_grad=True)
    counts = masks.sum(1).clamp_min(1)
    optimizer = torch.optim.LBFGS(
        [w],
        lr=1,
        max_iter=MAX_ITER,
        history_size=20,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        logits = torch.matmul(x, w[:, :-1]) + w[:, -1:]  # (P, N, classes)
        nll = -logits.log_softmax(-1).gather(-1, y.expand(n_problems, -1)[..., None])[..., 0]
        loss = ((nll * masks).sum(1) / counts).sum() + 0.5 * (l2s * w[:, :-1].square().sum((1, 2))).sum()
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    if n_problems * x.numel() < SMALL_FIT:
        torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            optimizer.step(closure)
    finally:
        torch.set_num_threads(threads)
    return w.detach()


def predict_softmax(w, x):
    """Probabilities of one fitted problem (weights as fit_softmax returns them) for rows x."""
    return (x @ w[:-1] + w[-1]).softmax(-1)


def out_of_fold(features, labels, n_classes, fold_draws, l2s):
    """features: (views, n, dim), standardized. For every fold draw and L2 strength, each fold's images
    get probabilities from a model fitted on the other folds' images (each view of them a training row),
    averaged over their own views. Returns (draws, len(l2s), n, classes)."""
    views, n, dim = features.shape
    x, y = features.reshape(views * n, dim), labels.repeat(views)
    problems = [
        (d, fold, l2)
        for d, folds in enumerate(fold_draws)
        for fold in range(int(folds.max()) + 1)
        for l2 in range(len(l2s))
    ]
    masks = torch.stack([(fold_draws[d] != fold).float().repeat(views) for d, fold, _ in problems])
    w = fit_softmax(x, y, masks, torch.tensor([float(l2s[g]) for _, _, g in problems]), n_classes)
    probs = torch.zeros(len(fold_draws), len(l2s), n, n_classes)
    with torch.no_grad():
        for p, (d, fold, g) in enumerate(problems):
            held = fold_draws[d] == fold
            probs[d, g, held] = predict_softmax(w[p], features[:, held]).mean(0)
    return probs


def log_loss(probs, labels):
    return float(-probs[torch.arange(len(labels)), labels].clamp_min(1e-12).log().mean())


def cross_validated_probs(features, labels, n_classes, k, seed, l2_grid=L2_GRID, repeats=REPEATS):
    """Out-of-fold probabilities for the L2 strength of l2_grid with the lowest out-of-fold log loss of
    the given labels (on the first fold draw), averaged over `repeats` seeded fold draws.
    Returns (probs, l2, {l2: log loss})."""
    labels = torch.as_tensor(labels)
    features = standardize(features)
    first = stratified_folds(labels, k, seed)
    probs = out_of_fold(features, labels, n_classes, [first], l2_grid)[0]
    losses = {l2: log_loss(p, labels) for l2, p in zip(l2_grid, probs)}
    best = min(range(len(l2_grid)), key=lambda g: losses[l2_grid[g]])
    chosen = probs[best]
    if repeats > 1:
        more = [stratified_folds(labels, k, seed + r) for r in range(1, repeats)]
        chosen = (chosen + out_of_fold(features, labels, n_classes, more, [l2_grid[best]])[:, 0].sum(0)) / repeats
    return chosen, l2_grid[best], losses


# ----------------------------------------------------------------------------- ranking and flags


def confident_learning_flags(probs, labels, n_classes):
    """Per-class thresholds t_j = mean probability of class j over the images labelled j; an image is
    flagged when some other class k has p_k >= t_k and p_k > p_given. Returns (flags, thresholds)."""
    labels = torch.as_tensor(labels)
    thresholds = torch.ones(n_classes)  # a class with no readable image: only a probability of 1 reaches it
    for c in range(n_classes):
        mine = labels == c
        if mine.any():
            thresholds[c] = probs[mine, c].mean()
    given = probs[torch.arange(len(labels)), labels]
    other = (probs >= thresholds) & (probs > given[:, None])
    other[torch.arange(len(labels)), labels] = False
    return other.any(1), thresholds


def expected_flags(problems, seed, draws=CLEAN_DRAWS):
    """How many images confident learning flags, on average, in a set labelled as right as the model can tell:
    each image's label drawn from its own out-of-fold probabilities (seeded, `draws` times) and the flags
    recomputed from the same probabilities. If those probabilities are calibrated, a correctly labelled set's
    labels are distributed like these draws, so its flags are false alarms at about this rate. problems:
    [(n, classes) probabilities]: one for a single-label set, one two-class problem per class for a multi-label
    one (an image counts once when any of them flags it)."""
    generator = torch.Generator().manual_seed(seed)
    total = 0
    for _ in range(draws):
        flagged = torch.zeros(len(problems[0]), dtype=torch.bool)
        for probs in problems:
            labels = torch.multinomial(probs, 1, generator=generator)[:, 0]
            flagged |= confident_learning_flags(probs, labels, probs.shape[1])[0]
        total += int(flagged.sum())
    return total / draws


def as_if_clean(probs, labels, temperatures=TEMPERATURES, noise=NOISE_SHARES):
    """The out-of-fold probabilities re-tempered to what they would be without the wrong labels they measure: a
    temperature T and a share e of labels drawn at random (uniform over the classes) are fitted together by the
    likelihood of the given labels, p(given) = (1 - e) * softmax(log(probs) / T)[given] + e / classes, and the
    tempered probabilities returned. The plain probabilities come from a fit whose L2 strength the wrong labels
    pushed up (one confidently wrong label costs more log loss than many soft predictions), so they were softer
    than a clean set's, and the flags simulated from them rose with the very errors the check finds (1 on a clean
    easy set, 6-9 with 8 planted errors; bench in docs/label_check.md); with the wrong labels counted as noise, the
    temperature sharpens them back. Returns (tempered probabilities, T, e)."""
    labels = torch.as_tensor(labels)
    log_p = probs.double().clamp_min(1e-12).log()
    t = torch.as_tensor(temperatures, dtype=torch.float64)
    given = (log_p[None] / t[:, None, None]).log_softmax(-1)[:, torch.arange(len(labels)), labels].exp()  # (T, n)
    e = torch.as_tensor(noise, dtype=torch.float64)
    likelihood = ((1 - e[:, None, None]) * given[None] + e[:, None, None] / probs.shape[1]).clamp_min(1e-300)
    score = likelihood.log().mean(-1)  # (noise, temperatures)
    best = int(score.argmax())
    i, j = divmod(best, len(temperatures))
    return (log_p / t[j]).softmax(-1).to(probs.dtype), float(t[j]), float(e[i])


def clean_set_flags(problems, labels, seed, draws=CLEAN_DRAWS):
    """(flags a correctly labelled set of this size would get (expected_flags on probabilities made as_if_clean),
    the share of labels the fit took for noise, the largest over the problems). problems and labels: one
    (probabilities, labels) pair per problem."""
    cleaned = [as_if_clean(p, y) for p, y in zip(problems, labels)]
    return expected_flags([c[0] for c in cleaned], seed, draws), max((c[2] for c in cleaned), default=0.0)


@dataclass
class LabelIssues:
    files: list
    labels: torch.Tensor  # given label per image
    split: list  # "train" or "valid" per image
    probs: torch.Tensor  # out-of-fold probabilities (n, classes)
    class_names: list

    def table(self):
        """Rows of label_issues.csv, most suspicious first (lowest probability of the given label; ties by path)."""
        n = len(self.files)
        index = torch.arange(n)
        score = self.probs[index, self.labels]
        others = self.probs.clone()
        others[index, self.labels] = -1
        suggested = others.argmax(1)
        flags, _ = confident_learning_flags(self.probs, self.labels, len(self.class_names))
        order = sorted(range(n), key=lambda i: (float(score[i]), self.files[i]))
        return [
            {
                "file": self.files[i],
                "given": self.class_names[int(self.labels[i])],
                "suggested": self.class_names[int(suggested[i])],
                "score": float(score[i]),
                "flagged": int(flags[i]),
                "suggested_score": float(others[i, suggested[i]]),
                "split": self.split[i],
            }
            for i in order
        ]


def per_label_check(features, labels, seed):
    """Multi-label: (probability of each class being present, out-of-fold (n, classes); flags (n, classes):
    the classes whose given state confident learning doubts; the folds used per class)."""
    n, n_classes = labels.shape
    present, flags, folds = torch.zeros(n, n_classes), torch.zeros(n, n_classes, dtype=torch.bool), []
    for c in range(n_classes):
        y = labels[:, c].long()
        if len(torch.unique(y)) < 2:  # every image shows it, or none does: nothing to learn or doubt
            present[:, c] = y.float()
            folds.append(0)
            continue
        k, _ = choose_folds(y, ["absent", "present"])
        probs, _, _ = cross_validated_probs(features, y, 2, k, seed)
        present[:, c] = probs[:, 1]
        flags[:, c] = confident_learning_flags(probs, y, 2)[0]
        folds.append(k)
    return present, flags, folds


def multi_label_rows(files, labels, split, present, flags, class_names, task):
    """label_issues.csv's rows of a multi-label check, most suspicious first."""
    given_state = torch.where(labels.bool(), present, 1 - present)  # probability of each class's given state
    suggested = labels.bool() ^ flags
    suggested_state = torch.where(suggested, present, 1 - present)
    score, other = given_state.min(1).values, suggested_state.min(1).values

    def text(row):
        return task.text(tuple(row), class_names, " ") or "(none)"

    order = sorted(range(len(files)), key=lambda i: (float(score[i]), files[i]))
    return [
        {
            "file": files[i],
            "given": text(labels[i].bool().tolist()),
            "suggested": text(suggested[i].tolist()),
            "score": float(score[i]),
            "flagged": int(flags[i].any()),
            "suggested_score": float(other[i]),
            "split": split[i],
        }
        for i in order
    ]


def write_csv(rows, path):
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "score": f"{row['score']:.6f}", "suggested_score": f"{row['suggested_score']:.6f}"})


def save_suspects(rows, path, input_size, resize_size, n=GRID_IMAGES):
    """The first n rows as a grid, each titled 'given → suggested (score)', red when flagged."""
    show = data_loader.display_transform(input_size, resize_size)
    images, titles, colors = [], [], []
    for row in rows[:n]:
        try:
            images.append(show(data_loader.load_rgb(row["file"])))
        except Exception:  # changed since it was read: leave it out of the picture
            continue
        arrow = "\n→ " if len(row["given"]) + len(row["suggested"]) > 24 else " → "  # long label sets: two lines
        titles.append(f"{row['given']}{arrow}{row['suggested']} ({row['score']:.2f})")
        colors.append("red" if row["flagged"] else "black")
    if images:
        save_image_grid(images, titles, colors, path)
    return len(images)


# ----------------------------------------------------------------------------- the whole check


def backbone_features(
    model,
    head,
    samples,
    views,
    meta,
    batch_size,
    num_workers,
    seed,
    compute,
    skips,
    budget_mb,
    spill_path,
    task=None,
    spatial=False,
):
    """(1 + views, n, dim) frozen-backbone features: the eval view, then `views` augmented ones (the training
    transform, seeded per image and view), with the mask of readable images; spatial=True: a third item, the eval
    view's (n, PROJECTED) spatial embeddings from the same forward passes (similarity.py; None when the model keeps
    no feature map)."""
    pooled = data_loader.DataSplits([], list(samples), [], [], "")
    loaders = data_loader.build_loaders(
        pooled,
        meta["input_size"],
        meta["resize_size"],
        meta["mean"],
        meta["std"],
        batch_size,
        num_workers,
        seed,
        pin_memory=compute.device.type == "cuda",
        task=task,
    )
    view_loaders = [loaders.train_eval] + [features.view_loader(loaders.train, v) for v in range(views)]
    store, _ = features.feature_store(
        len(view_loaders), len(samples), features.feature_dim(model, head), budget_mb, spill_path
    )
    fast = model_loader.optimize_for_inference(model, compute.channels_last)
    layer = similarity.embedding_layer(fast, head, meta["input_size"], compute.device) if spatial else None
    maps_out = torch.zeros(len(samples), similarity.PROJECTED) if layer is not None else None
    with similarity.capture_maps(layer) as maps:

        def after(view, indices):
            if maps and view == 0:
                maps_out[indices] = similarity.spatial_embedding(maps[-1])
            maps.clear()

        ok = features.extract_views(fast, head, view_loaders, store, compute, skips, after=after)
    return (store, ok, maps_out) if spatial else (store, ok)


def check_labels(
    model,
    head,
    splits,
    meta,
    compute,
    run_dir,
    task,
    views=0,
    batch_size=32,
    num_workers=0,
    seed=42,
    budget_mb=2048,
    out=print,
):
    """One backbone pass over every train, valid and test image; then the label check of the train and valid images
    (label_issues.csv and .png, ranked by how unlikely each label is) and the data loop's tables of them all
    (near_duplicates.csv and outliers.csv: similarity.py), in run_dir, with a summary. Returns (the label check's
    rows, most suspicious first; the exit status: 1 when copies leak across splits or carry different labels), or
    None when a stop signal arrived during the pass (nothing written)."""
    run_dir = Path(run_dir)
    samples = splits.train + splits.valid + splits.test
    split = ["train"] * len(splits.train) + ["valid"] * len(splits.valid) + ["test"] * len(splits.test)
    skips = data_loader.SkipLog(samples, splits.class_names, out, task)
    start = time.perf_counter()
    spill = run_dir / "label_features.bin"  # only past budget_mb; removed whatever happens
    try:
        features, ok, spatial = backbone_features(
            model,
            head,
            samples,
            views,
            meta,
            batch_size,
            num_workers,
            seed,
            compute,
            skips,
            budget_mb,
            spill,
            task,
            spatial=True,
        )
        if ok is None:
            return None
        extracted = time.perf_counter()
        keep = torch.nonzero(ok).flatten()
        checked = [i for i in keep.tolist() if split[i] != "test"]  # the labels the model would learn from
        files = [samples[i][0] for i in checked]
        labels = task.tensor(samples[i][1] for i in checked)
        check = per_class_check if task.multi_label else class_check  # several labels: one check per class
        found = check(
            features[:, checked], labels, files, [split[i] for i in checked], splits.class_names, seed, out, task
        )
        pooled = torch.nn.functional.normalize(features[0, keep].float(), dim=1)
        loop = data_loop(samples, split, keep, pooled, spatial, splits.class_names, task, run_dir, out)
        del features
    finally:
        spill.unlink(missing_ok=True)
    if found is None:
        return [], loop
    rows, fit, expected = found
    return report(
        rows, run_dir, meta, splits.class_names, out, start, extracted, views, fit, skips, expected, task.multi_label
    ), loop


def data_loop(samples, split, keep, pooled, spatial, class_names, task, run_dir, out):
    """near_duplicates.csv and outliers.csv of the readable images (similarity.py), and their summary lines; the exit
    status: 1 when a group of copies leaks across splits or carries different labels."""
    files = [samples[i][0] for i in keep.tolist()]
    texts = [task.text(samples[i][1], class_names) for i in keep.tolist()]
    parts = [split[i] for i in keep.tolist()]
    classes = None if task.multi_label else torch.tensor([samples[i][1] for i in keep.tolist()])
    start = time.perf_counter()
    if spatial is None:
        out("near-duplicates: skipped; the model keeps no feature map to compare images by")
        rows, counts, bar, checked = [], {}, (similarity.PAIR_FLOOR,) * 2, 0
    else:
        rows, counts, bar, checked = similarity.near_duplicate_rows(files, spatial[keep], texts, parts)
    write_rows(rows, run_dir / "near_duplicates.csv", similarity.DUPLICATE_COLUMNS)
    failing = sum(n for kind, n in counts.items() if "leak" in kind or "conflict" in kind)
    shown = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "none"
    out(
        f"near-duplicates: {sum(counts.values())} groups ({shown}) among {len(files)} images; a copy's pixel score in "
        f"this set >= {bar[0]:.3f} whole or >= {bar[1]:.3f} cropped (>= {max(bar[1], similarity.PAIR_FLOOR):.3f} "
        f"under {similarity.SMALL} px) ({checked} pairs checked, "
        f"{time.perf_counter() - start:.1f}s) -> {run_dir / 'near_duplicates.csv'}"
    )
    for group in sorted({r["group"] for r in rows if "leak" in r["kind"] or "conflict" in r["kind"]})[:5]:
        members = [r for r in rows if r["group"] == group]
        out(f"  {members[0]['kind']}: " + " = ".join(f"{r['file']} ({r['split']}, {r['label']})" for r in members))
    outliers = similarity.outlier_rows(files, pooled, classes, texts, parts)
    write_rows(outliers, run_dir / "outliers.csv", similarity.OUTLIER_COLUMNS)
    top = outliers[: max(1, round(similarity.OUTLIER_SHOWN * len(outliers)))]
    out(
        f"outliers: the most unusual {len(top)} of {len(outliers)} (score = 1 - similarity to the nearest images) -> "
        f"{run_dir / 'outliers.csv'}; the first {min(5, len(top))}: "
        + ", ".join(f"{r['file']} {r['score']:.3f}" for r in top[:5])
    )
    return 1 if failing else 0


def write_rows(rows, path, columns):
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def class_check(features, labels, files, split, class_names, seed, out, task):
    """(rows, fit, expected flags on a clean set) of a check of one label per image (see report); None when fewer
    than two classes are left."""
    if len(torch.unique(labels)) < 2:
        out("label check: skipped; fewer than two classes have readable images")
        return None
    k, note = choose_folds(labels, class_names)
    if note:
        out(f"label check: {note}")
    probs, l2, _ = cross_validated_probs(features, labels, len(class_names), k, seed)
    rows = LabelIssues(files, labels, split, probs, class_names).table()
    per_class = {name: 0 for name in class_names}
    for r in rows:
        per_class[r["given"]] += r["flagged"]
    accuracy = float((probs.argmax(1) == labels).float().mean()) if len(labels) else 0.0
    fit = (list(per_class.values()), f"{k}-fold logistic regression x{REPEATS} (L2 {l2:g})", "accuracy", accuracy)
    return rows, fit, clean_set_flags([probs], [labels], seed)


def per_class_check(features, labels, files, split, class_names, seed, out, task):
    """(rows, fit, expected flags on a clean set) of a multi-label check: each class its own two-class problem
    (absent, present)."""
    present, flags, folds = per_label_check(features, labels, seed)
    rows = multi_label_rows(files, labels, split, present, flags, class_names, task)
    exact = float(((present >= 0.5) == labels.bool()).all(1).float().mean()) if len(labels) else 0.0
    fit = (
        flags.sum(0).tolist(),
        f"{max(folds) or 'no'}-fold two-class logistic regression per class x{REPEATS}",
        "exact match",
        exact,
    )
    problems = [torch.stack([1 - p, p], 1) for p in present.T]
    expected = clean_set_flags(problems, labels.long().T, seed) if len(labels) else (0.0, 0.0)
    return rows, fit, expected


def report(rows, run_dir, meta, class_names, out, start, extracted, views, fit, skips, expected, multi_label=False):
    """Write label_issues.csv/.png and print the summary; fit = (flags per class, how it was fitted, the
    out-of-fold measure's name, its value); expected: the flags a clean set of this size would get
    (clean_set_flags: the count, the share of labels taken for noise). The printed list holds the flagged rows
    first. Returns the rows."""
    write_csv(rows, run_dir / "label_issues.csv")
    shown = save_suspects(rows, run_dir / "label_issues.png", meta["input_size"], meta["resize_size"])
    fitted = time.perf_counter()
    flagged = [r for r in rows if r["flagged"]]
    per_class = dict(zip(class_names, fit[0]))
    out(
        f"label check: {len(rows)} images ({1 + views} view{'s' if views else ''} each), {fit[1]}, out-of-fold "
        f"{fit[2]} {fit[3]:.3f}; features {extracted - start:.1f}s, fits {fitted - extracted:.1f}s"
    )
    if skips.seen:
        out(f"label check: skipped {len(skips.seen)} unreadable image(s) (named above)")
    out(
        f"flagged: {len(flagged)} of {len(rows)} labels look wrong; per class: "
        + ", ".join(f"{name} {n}" for name, n in per_class.items())
    )
    expected, noise = expected
    out(
        f"a clean set of {len(rows)} images would get about {expected:.0f} flag{'' if round(expected) == 1 else 's'} "
        f"({expected / max(len(rows), 1):.1%}; each label drawn from its out-of-fold probabilities, tempered as "
        f"without the {noise:.1%} of labels the fit takes for noise, mean of {CLEAN_DRAWS} draws): a count near that "
        "is mostly false alarms, one far above it points to wrong labels"
    )
    out(
        "most suspicious, flagged first (given -> suggested, score = out-of-fold probability of the given "
        + ("state of its least likely class):" if multi_label else "label):")
    )
    for r in sorted(rows, key=lambda r: not r["flagged"])[:10]:  # stable: by score within each
        out(f"  {r['file']}  {r['given']} -> {r['suggested']}  {r['score']:.3f}{'  flagged' if r['flagged'] else ''}")
    out(f"label check: {run_dir / 'label_issues.csv'}" + (f", {run_dir / 'label_issues.png'}" if shown else ""))
    return rows
