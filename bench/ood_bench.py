"""Out-of-distribution benchmark (a script, not a test): which ood_score tells images unlike the training
images apart best, and what the product's default does end to end.

  python bench/ood_bench.py                                   # 3 sets x frozen, fine-tuned; ~50 min on 2 CPUs
  python bench/ood_bench.py --sets fashion4 --modes frozen    # the set the method was chosen on, frozen

Needs: the Debian package dataset-fashion-mnist, and `pip install elpv-dataset scikit-image` (solar-cell
images, Buerhop-Lutz et al. 2018, and scikit-image's sample photos: neither is needed by the tool itself).

Sets (images stored at their own size; the model sees them at --input_size):
  fashion4  in: trouser, sneaker, bag, ankle boot (the shipped sample's classes; the set the method was chosen on)
            near: the six other Fashion-MNIST classes; far: solar cells, photos
  fashion6  in: the six other classes; near: the four of fashion4; far: solar cells, photos
  solar     in: monocrystalline solar cells, functional vs defective; near: polycrystalline cells;
            far: Fashion-MNIST (all ten classes), photos

For each set and mode (frozen: --freeze; fine-tuned: all layers; otherwise default flags) it
  1. runs `train.py --model_name efficientnet_lite0 --use_pretrained` as a process, as a user would;
  2. in this process, with the checkpoint it wrote: penultimate features and logits of the run's own train
     and valid split, the test images and the out-of-distribution images; for every method of ood.py the
     reference from the train split and the threshold from the valid split (--ood_keep 0.95, as train.py);
     prints AUROC (test images against each out-of-distribution set), the share of each set accepted at
     the cut that keeps 95% of the test images (FPR@95), and at the validation threshold with the share
     of test images it keeps; and knn's FPR@95 for k = 1 ... 20 neighbours;
  3. runs `predict.py` on the near and far folders and on the test folder, and reads in_distribution from
     result.csv: the product's figures, which must equal step 2's for the default method;
  4. (first set only) the steady prediction rate with and without the score (batches of 64 ready
     tensors, in turns, best of --repeats), and the whole predict.py process with and without it.
"""

import csv
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "data"))

import torch  # noqa: E402

import data_loader as dl  # noqa: E402
import metrics  # noqa: E402
import model_loader as ml  # noqa: E402
import ood  # noqa: E402
from cli import ArgumentParser, CLIError, run_cli  # noqa: E402
from timed import run  # noqa: E402
from utils import Compute, DistInfo  # noqa: E402

SAMPLE = ["trouser", "sneaker", "bag", "ankle_boot"]
K_SWEEP = (1, 3, 5, 10, 20)  # knn neighbour counts compared
PHOTOS = [
    "astronaut",
    "camera",
    "cat",
    "coffee",
    "coins",
    "rocket",
    "stereo_motorcycle",
    "hubble_deep_field",
    "retina",
    "moon",
    "brick",
    "grass",
    "gravel",
    "clock",
    "horse",
    "immunohistochemistry",
]


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument(
        "--work", default=None, help="folder for data, checkpoints and outputs (default: a new temporary one)"
    )
    p.add_argument("--sets", default="fashion4,fashion6,solar", help="comma-separated: fashion4, fashion6, solar")
    p.add_argument("--modes", default="frozen,finetuned", help="comma-separated: frozen, finetuned")
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument(
        "--finetune_epochs",
        type=int,
        default=20,
        help="--n_epochs of the fine-tuned runs (train.py's default; early stopping may end them sooner)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timing rounds (best of)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the data


def save(img, folder, name):
    folder.mkdir(parents=True, exist_ok=True)
    img.save(folder / f"{name}.png")


def fashion_images(split):
    """[(class name, PIL image)] of Fashion-MNIST's train or t10k file, in file order."""
    from PIL import Image
    from prepare import FASHION_CLASSES, FASHION_DIR, read_idx

    prefix = "train" if split == "train" else "t10k"
    (n, rows, cols), pixels = read_idx(FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz")
    _, labels = read_idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz")
    return [
        (
            FASHION_CLASSES[labels[i]],
            Image.frombytes("L", (cols, rows), pixels[i * rows * cols : (i + 1) * rows * cols]),
        )
        for i in range(n)
    ]


def write_fashion(out, split, classes, per_class, flat=False):
    taken = dict.fromkeys(classes, 0)
    for i, (name, img) in enumerate(fashion_images(split)):
        if name in taken and taken[name] < per_class:
            save(img, out if flat else out / name, f"{split}_{i:05d}")
            taken[name] += 1
    return sum(taken.values())


def solar_cells():
    """[(type, defect probability, PIL image)] of the ELPV data set (300 x 300 grayscale)."""
    from elpv_dataset.utils import load_dataset
    from PIL import Image

    images, probs, types = load_dataset()
    return [(str(t), float(p), Image.fromarray(img)) for img, p, t in zip(images, probs, types)]


def write_photos(out, n, seed=0):
    """n seeded square crops (30-100% of the short side) of scikit-image's sample photos."""
    import numpy as np
    import skimage.data
    from PIL import Image

    rng = random.Random(seed)
    photos = []
    for name in PHOTOS:
        img = getattr(skimage.data, name)()
        img = img[0] if isinstance(img, tuple) else img
        photos.append(Image.fromarray(np.asarray(img)).convert("RGB"))
    for i in range(n):
        img = photos[i % len(photos)]
        side = int(min(img.size) * rng.uniform(0.3, 1.0))
        left, top = rng.randint(0, img.width - side), rng.randint(0, img.height - side)
        save(img.crop((left, top, left + side, top + side)), out, f"photo_{i:03d}")


def build_set(name, root):
    """root/{train,test}/<class>/ and root/ood/{near,far_*}/; returns {ood set name: folder}."""
    if (root / "done").exists():
        return {p.name: p for p in sorted((root / "ood").iterdir())}
    rng = random.Random(0)
    others = [c for c in __import__("prepare").FASHION_CLASSES if c not in SAMPLE]
    if name in ("fashion4", "fashion6"):
        classes, near = (SAMPLE, others) if name == "fashion4" else (others, SAMPLE)
        per_train, per_test = (200, 100) if name == "fashion4" else (130, 60)
        write_fashion(root / "train", "train", classes, per_train)
        write_fashion(root / "test", "t10k", classes, per_test)
        write_fashion(root / "ood" / "near", "t10k", near, 360 // len(near), flat=True)
        cells = solar_cells()
        for i, (_, _, img) in enumerate(rng.sample(cells, 300)):
            save(img, root / "ood" / "far_solar", f"cell_{i:04d}")
    else:  # solar: monocrystalline functional vs defective; near: polycrystalline
        cells = solar_cells()
        mono = [c for c in cells if c[0] == "mono"]
        rng.shuffle(mono)
        for cls, keep in (("functional", lambda p: p == 0), ("defective", lambda p: p >= 2 / 3)):
            chosen = [c for c in mono if keep(c[1])][:260]
            for i, (_, _, img) in enumerate(chosen):
                save(img, root / ("test" if i < 60 else "train") / cls, f"{cls}_{i:04d}")
        for i, (_, _, img) in enumerate(rng.sample([c for c in cells if c[0] == "poly"], 360)):
            save(img, root / "ood" / "near", f"poly_{i:04d}")
        write_fashion(root / "ood" / "far_fashion", "t10k", __import__("prepare").FASHION_CLASSES, 30, flat=True)
    write_photos(root / "ood" / "far_photos", 200)
    (root / "done").touch()
    return {p.name: p for p in sorted((root / "ood").iterdir())}


# ----------------------------------------------------------------------------- measuring


def read_rows(path):
    with open(path, encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def features_of(model, head, files, ckpt, compute):
    """(features, logits) of the readable files, through the checkpoint's eval transform."""
    tf = dl.Preprocess.of(ckpt).transform()
    loader = dl.make_loader(dl.ImageDataset([(str(f), 0) for f in files], tf), 64, None, 0)
    features, logits, _ = ood.collect_features(model, head, loader, compute, "features")
    return features, logits


def fpr_at(in_scores, out_scores, keep=0.95):
    """Share of out_scores accepted at the cut that keeps `keep` of in_scores."""
    cut = ood.fit_threshold(in_scores, keep)
    return float((out_scores <= cut).double().mean())


def measure(ckpt_path, run_dir, data, ood_sets):
    """Per method: {'auroc': {set: x}, 'fpr95': {...}, 'accepted': {...}, 'test_kept': x}."""
    ckpt = ml.load_checkpoint(ckpt_path)
    model, head = ml.model_from_checkpoint(ckpt, ckpt_path)
    compute = Compute(torch.device("cpu"), None, True, False, DistInfo())
    model = ml.optimize_for_inference(model, True)
    split = {
        name: [(r["path"], ckpt["class_names"].index(r["class"])) for r in read_rows(run_dir / f"{name}_files.csv")]
        for name in ("train", "valid")
    }
    train_f, _ = features_of(model, head, [p for p, _ in split["train"]], ckpt, compute)
    train_y = torch.tensor([y for _, y in split["train"]])
    valid_f, valid_l = features_of(model, head, [p for p, _ in split["valid"]], ckpt, compute)
    test_f, test_l = features_of(model, head, dl.list_images(data / "test"), ckpt, compute)
    outs = {name: features_of(model, head, dl.list_images(folder), ckpt, compute) for name, folder in ood_sets.items()}
    t = float(ckpt.get("temperature", 1.0))
    results = {}
    for method in ood.METHODS:
        ref = ood.build_reference(method, train_f, train_y, len(ckpt["class_names"]), valid_f, valid_l, t, 0.95)
        test_s = ood.score(ref, t, test_f, test_l)
        r = {"auroc": {}, "fpr95": {}, "accepted": {}, "test_kept": float((test_s <= ref["threshold"]).double().mean())}
        for name, (f, lg) in outs.items():
            s = ood.score(ref, t, f, lg)
            # AUROC of 'out' against 'in' by the score (higher = out): the chance an out image scores above an in one
            r["auroc"][name] = metrics.roc_auc(torch.cat([test_s, s]).tolist(), [False] * len(test_s) + [True] * len(s))
            r["fpr95"][name] = fpr_at(test_s, s)
            r["accepted"][name] = float((s <= ref["threshold"]).double().mean())
        results[method] = r
    for k in K_SWEEP:  # knn's neighbour count: the FPR at 95% kept per ood set
        ref = ood.build_reference("knn", train_f, train_y, len(ckpt["class_names"]), valid_f, valid_l, t, 0.95, k=k)
        test_s = ood.score(ref, t, test_f, test_l)
        results[f"knn k={k}"] = {
            "fpr95": {name: fpr_at(test_s, ood.score(ref, t, f, lg)) for name, (f, lg) in outs.items()}
        }
    return results, ckpt["ood"]


def product_figures(ckpt_path, data, ood_sets, work):
    """predict.py as a user runs it: the share of rows with in_distribution 1 per folder."""
    shares = {}
    for name, folder in [("test", data / "test")] + list(ood_sets.items()):
        out = work / f"predict_{name}.csv"
        run(
            [
                sys.executable,
                ROOT / "predict.py",
                "--model_fn",
                ckpt_path,
                "--data_dir",
                folder,
                "--output",
                out,
                "--n_images",
                "0",
                "--verbose",
                "0",
            ]
        )
        rows = [r for r in read_rows(out) if r["in_distribution"] != ""]
        shares[name] = sum(r["in_distribution"] == "1" for r in rows) / len(rows)
    return shares


def speed(ckpt_path, data, repeats):
    """Steady img/s of the optimized model alone and with the ood score (64-image batches of ready tensors, in
    turns, best of `repeats`), and the whole predict.py process on the test folder with and without it."""
    ckpt = ml.load_checkpoint(ckpt_path)
    model, head = ml.model_from_checkpoint(ckpt, ckpt_path)
    plain = ml.optimize_for_inference(model, True)
    scored = ood.scored_model(ml.optimize_for_inference(model, True), head, ckpt, ckpt_path)
    images = torch.randn(64, 3, ckpt["input_size"], ckpt["input_size"]).contiguous(memory_format=torch.channels_last)
    best = {"plain": 0.0, "scored": 0.0}
    with torch.inference_mode():
        plain(images), scored(images)  # warm-up
        for _ in range(repeats):
            for name, m in (("plain", plain), ("scored", scored)):
                start = time.perf_counter()
                m(images)
                best[name] = max(best[name], 64 / (time.perf_counter() - start))
    bare = ckpt_path.with_name(ckpt_path.stem + "_noood.pth")
    stripped = dict(ckpt)
    stripped.pop("ood")
    ml.save_checkpoint(stripped, bare)
    whole = {"plain": float("inf"), "scored": float("inf")}
    for _ in range(repeats):
        for name, path in (("plain", bare), ("scored", ckpt_path)):
            seconds, _ = run(
                [
                    sys.executable,
                    ROOT / "predict.py",
                    "--model_fn",
                    path,
                    "--data_dir",
                    data / "test",
                    "--output",
                    ckpt_path.with_name(f"speed_{name}.csv"),
                    "--n_images",
                    "0",
                    "--verbose",
                    "0",
                ]
            )
            whole[name] = min(whole[name], seconds)
    return best, whole


def check_sources():
    """The data packages the sets are cut from, with one line saying how to get a missing one."""
    import importlib.util

    from prepare import FASHION_DIR

    if not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        raise CLIError(f"Fashion-MNIST not found in {FASHION_DIR}: apt-get install dataset-fashion-mnist")
    missing = [
        pip
        for module, pip in (("elpv_dataset", "elpv-dataset"), ("skimage", "scikit-image"))
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        raise CLIError(f"the out-of-distribution images need: pip install {' '.join(missing)}")


def main(args):
    check_sources()
    work = Path(args.work or tempfile.mkdtemp(prefix="ood_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}; CPU threads {torch.get_num_threads()}")
    for set_name in args.sets.split(","):
        data = work / set_name
        ood_sets = build_set(set_name, data)
        for mode in args.modes.split(","):
            ckpt_path = work / f"{set_name}_{mode}.pth"
            run_dir = work / f"run_{set_name}_{mode}"
            flags = ["--freeze"] if mode == "frozen" else ["--n_epochs", str(args.finetune_epochs)]
            seconds, out = run(
                [
                    sys.executable,
                    ROOT / "train.py",
                    "--data_dir",
                    data,
                    "--model_name",
                    "efficientnet_lite0",
                    "--use_pretrained",
                    "--input_size",
                    args.input_size,
                    "--model_fn",
                    ckpt_path,
                    "--log_dir",
                    run_dir,
                    "--verbose",
                    "1",
                    *flags,
                ]
            )
            lines = [
                ln for ln in out.splitlines() if ln.startswith(("out-of-distribution", "test accuracy", "calibration"))
            ]
            print(f"\n=== {set_name}, {mode}: train.py {seconds:.0f}s\n" + "\n".join(lines))
            results, reference = measure(ckpt_path, run_dir, data, ood_sets)
            names = list(ood_sets)
            print(
                f"{'method':12s} "
                + " ".join(f"{'AUROC ' + n:>16s}" for n in names)
                + " "
                + " ".join(f"{'FPR95 ' + n:>16s}" for n in names)
                + " "
                + " ".join(f"{'acc@val ' + n:>18s}" for n in names)
                + "  test kept"
            )
            for method in ood.METHODS:
                r = results[method]
                print(
                    f"{method:12s} "
                    + " ".join(f"{r['auroc'][n]:16.3f}" for n in names)
                    + " "
                    + " ".join(f"{r['fpr95'][n]:16.1%}" for n in names)
                    + " "
                    + " ".join(f"{r['accepted'][n]:18.1%}" for n in names)
                    + f"  {r['test_kept']:.1%}"
                )
            print(
                "knn FPR95 by k: "
                + "; ".join(
                    f"k={k} " + ", ".join(f"{n} {results[f'knn k={k}']['fpr95'][n]:.1%}" for n in names)
                    for k in K_SWEEP
                )
            )
            shares = product_figures(ckpt_path, data, ood_sets, work)
            print(
                f"predict.py ({reference['method']}, threshold {reference['threshold']:.4g}): in_distribution 1 on "
                + ", ".join(f"{n} {v:.1%}" for n, v in shares.items())
            )
            if set_name == args.sets.split(",")[0] and mode == args.modes.split(",")[0]:
                steady, whole = speed(ckpt_path, data, args.repeats)
                print(
                    f"speed: steady {steady['plain']:.1f} img/s without the score, {steady['scored']:.1f} with "
                    f"({steady['scored'] / steady['plain']:.3f}x); whole predict.py on {data / 'test'}: "
                    f"{whole['plain']:.1f}s without, {whole['scored']:.1f}s with"
                )


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
