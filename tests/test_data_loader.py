import csv

import numpy as np
import pytest
import torch
from PIL import Image

import data_loader as dl
from cli import CLIError


def write(path, img, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def test_eval_transform_normalizes_with_given_mean_std():
    img = Image.new("RGB", (40, 30), (255, 128, 0))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = dl.build_transforms(24, 28, mean, std, train=False)(img)
    assert x.shape == (3, 24, 24)
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 128, 0), mean, std)]
    assert torch.allclose(x.mean((1, 2)), torch.tensor(expected), atol=1e-3)


def test_eval_transform_is_deterministic_and_train_transform_augments():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
    ev = dl.build_transforms(32, 36, dl.IMAGENET_MEAN, dl.IMAGENET_STD, train=False)
    tr = dl.build_transforms(32, 36, dl.IMAGENET_MEAN, dl.IMAGENET_STD, train=True)
    assert torch.equal(ev(img), ev(img))
    torch.manual_seed(0)
    a, b = tr(img), tr(img)
    assert a.shape == (3, 32, 32) and not torch.equal(a, b)


def test_default_resize_keeps_torchvision_ratio():
    assert dl.default_resize(224) == 256
    assert dl.default_resize(28) == 32


def test_stratified_split_is_seeded_and_keeps_class_shares():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    t1, v1 = dl.stratified_split(labels, 0.2, seed=1)
    t2, v2 = dl.stratified_split(labels, 0.2, seed=1)
    t3, v3 = dl.stratified_split(labels, 0.2, seed=2)
    assert (t1, v1) == (t2, v2) and v1 != v3
    assert sorted(t1 + v1) == list(range(100)) and not set(t1) & set(v1)
    assert [sum(labels[i] == c for i in v1) for c in range(3)] == [10, 6, 4]


def test_stratified_split_gives_small_classes_a_validation_image():
    train, valid = dl.stratified_split([0, 0, 1, 1, 1, 1, 1, 1, 1, 1], 0.1, seed=0)
    assert {0, 1} <= {[0, 0, 1, 1, 1, 1, 1, 1, 1, 1][i] for i in valid}


def test_build_splits_and_split_lists(tiny_data, tmp_path):
    splits = dl.build_splits(tiny_data, 0.25, seed=3)
    assert splits.class_names == ["bag", "sneaker", "trouser"]
    assert len(splits.valid) == 12 and len(splits.train) == 36 and len(splits.test) == 18
    dl.write_split_lists(splits, tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "valid_files.csv", encoding="utf-8")))
    assert [(r["path"], r["class"]) for r in rows] == [(p, splits.class_names[y]) for p, y in splits.valid]
    assert len(list(csv.DictReader(open(tmp_path / "train_files.csv", encoding="utf-8")))) == 36


def test_valid_folder_is_used_instead_of_a_split(tiny_data, tmp_path):
    root = tmp_path / "d"
    for c in ("a", "b"):
        for i in range(3):
            write(root / "train" / c / f"{i}.png", Image.new("L", (8, 8), i * 40))
        write(root / "valid" / c / "v.png", Image.new("L", (8, 8), 9))
    splits = dl.build_splits(root, 0.5, seed=0)
    assert len(splits.train) == 6 and len(splits.valid) == 2 and splits.valid_source == "valid/ folder"


def test_hidden_and_non_image_files_are_ignored(tmp_path):
    write(tmp_path / "a" / "x.PNG", Image.new("RGB", (8, 8)))
    write(tmp_path / "a" / ".hidden.png", Image.new("RGB", (8, 8)))
    (tmp_path / "a" / "notes.txt").write_text("hi")
    (tmp_path / "a" / ".DS_Store").write_bytes(b"\0")
    write(tmp_path / "a" / "sub" / "y.jpeg", Image.new("RGB", (8, 8)))
    assert [p.relative_to(tmp_path).as_posix() for p in dl.list_images(tmp_path)] == ["a/sub/y.jpeg", "a/x.PNG"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda r: None, "does not exist"),
        (lambda r: r.mkdir(), "no class subfolders"),
        (lambda r: ((r / "train" / "a").mkdir(parents=True), (r / "train" / "b").mkdir()), "has no images"),
        (lambda r: write(r / "train" / "only" / "x.png", Image.new("RGB", (8, 8))), "only one class"),
    ],
)
def test_bad_folders_raise_clear_errors(tmp_path, make, message):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(CLIError, match=message):
        dl.build_splits(root, 0.2, 0)


def test_odd_modes_become_correct_rgb(tmp_path):
    gray16 = Image.fromarray(np.full((4, 4), 128 * 257, dtype=np.uint16))
    assert np.asarray(dl.to_rgb(gray16))[0, 0].tolist() == [128, 128, 128]  # scaled, not clipped to white
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white background
    assert np.asarray(dl.to_rgb(rgba))[0, 0].tolist() == [255, 255, 255]
    la = Image.new("LA", (4, 4), (10, 255))
    assert np.asarray(dl.to_rgb(la))[0, 0].tolist() == [10, 10, 10]
    cmyk = write(tmp_path / "c.jpg", Image.new("CMYK", (8, 8), (0, 255, 255, 0)))
    r, g, b = np.asarray(dl.load_rgb(cmyk))[4, 4].tolist()
    assert r > 200 and g < 60 and b < 60
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.info["transparency"] = 0
    path = write(tmp_path / "p.png", pal, transparency=0)
    assert np.asarray(dl.load_rgb(path))[0, 0].tolist() == [0, 255, 0]


def test_exif_rotated_jpeg_is_turned_upright(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = write(tmp_path / "r.jpg", img, exif=exif)
    assert dl.load_rgb(path).size == (20, 40)


@pytest.mark.parametrize("content", [b"", b"not an image at all", "truncated"])
def test_unreadable_files_become_bad_samples(tmp_path, content):
    path = tmp_path / "bad.png"
    if content == "truncated":
        good = write(
            tmp_path / "good.png",
            Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)),
        )
        content = good.read_bytes()[:-400]
    path.write_bytes(content)
    ds = dl.ImageDataset([(str(path), 0)], dl.build_transforms(16, 18, dl.IMAGENET_MEAN, dl.IMAGENET_STD, False))
    item = ds[0]
    assert isinstance(item, dl.BadSample) and item.index == 0 and item.reason
    batch = dl.collate([item])
    assert batch.images.numel() == 0 and batch.bad == [item]


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = write(tmp_path / "big.png", Image.new("L", (200, 200)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30000)  # 40,000 px: over the limit, under twice it
    with pytest.raises(Image.DecompressionBombWarning):
        dl.load_rgb(path)


def test_train_sampler_is_seeded_per_epoch_and_shards_evenly():
    s = dl.TrainSampler(10, seed=5)
    s.set_epoch(0)
    e0 = [i for i, _ in s]
    s.set_epoch(1)
    e1 = [i for i, _ in s]
    s.set_epoch(0)
    assert [i for i, _ in s] == e0 and e0 != e1 and sorted(e0) == list(range(10))
    shards = []
    for rank in range(3):
        r = dl.TrainSampler(10, seed=5, rank=rank, world_size=3)
        shards.append([i for i, _ in r])
    assert [len(x) for x in shards] == [4, 4, 4]
    assert set(sum(shards, [])) == set(range(10))


def test_shard_sampler_covers_each_sample_once():
    parts = [list(dl.ShardSampler(10, r, 3)) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(10))


def test_balanced_sampler_draws_classes_evenly():
    weights = [1 / 90] * 90 + [1 / 10] * 10
    s = dl.TrainSampler(100, seed=0, weights=weights)
    drawn = [i for i, _ in s]
    minority = sum(i >= 90 for i in drawn)
    assert 30 <= minority <= 70


def test_loader_yields_batches_with_indices(tiny_data):
    splits = dl.build_splits(tiny_data, 0.25, 0)
    loaders = dl.build_loaders(splits, 24, 28, dl.IMAGENET_MEAN, dl.IMAGENET_STD, 8, 0, seed=0)
    batch = next(iter(loaders.valid))
    assert batch.images.shape == (8, 3, 24, 24) and batch.indices.tolist() == list(range(8))
    assert batch.labels.tolist() == [y for _, y in splits.valid[:8]]
    loaders.train.sampler.set_epoch(0)
    a = next(iter(loaders.train)).images
    b = next(iter(loaders.train)).images
    assert torch.equal(a, b)  # same epoch: same order and same augmentation, whatever the RNG state


def photo(path, size):
    """A JPEG with detail at every scale: smooth colour fields plus fine noise."""
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    noisy = np.asarray(base).astype(np.int16) + rng.integers(-10, 10, (size[1], size[0], 3), dtype=np.int16)
    return write(path, Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)), quality=90)


def test_large_jpegs_decode_at_a_reduced_scale_that_still_only_shrinks(tmp_path):
    """1600x1200 with a 64 px resize: 1/8 gives 200x150 (short side 150 >= 64); with 256 px, 1/4 (300 >= 256,
    1/8 would give 150); the model's input from it stays close to the full decode's; PNGs decode in full. A
    model resizing to 64 px decodes at twice that at least (1/8 would give 150 >= 128)."""
    big = photo(tmp_path / "big.jpg", (1600, 1200))
    assert dl.load_rgb(big).size == (1600, 1200)
    assert dl.load_rgb(big, 64).size == (200, 150) and dl.load_rgb(big, 256).size == (400, 300)
    assert dl.load_rgb(big, 700).size == (1600, 1200)  # 1/2 would give a 600 px short side: too small
    prep = dl.Preprocess(56, 64, dl.IMAGENET_MEAN, dl.IMAGENET_STD)
    tf = prep.transform()
    full, drafted = tf(dl.load_rgb(big)), tf(dl.load_rgb(big, prep.draft_side()))
    assert (full - drafted).abs().mean() < 0.05  # normalized units: a few grey levels
    png = write(tmp_path / "big.png", Image.open(big))
    assert dl.load_rgb(png, 64).size == (1600, 1200)
    assert prep.draft_side() == 128 and dl.load_rgb(big, prep.draft_side()).size == (200, 150)
    assert prep.draft_side(train=True) == 130  # the smallest random crop's side (0.43 of it) still >= 56 px
    dataset = dl.ImageDataset([(str(big), 0)], tf, short_side=prep.draft_side())
    assert torch.equal(dataset[0][0], drafted)
