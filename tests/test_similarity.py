"""similarity.py and train.py --check_data's near_duplicates.csv and outliers.csv: planted copies found as leaks and
conflicts, a planted foreign image ranked first, distinct images left alone; the blocked search and the picks."""

import csv
import random
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageEnhance

import similarity
from conftest import ROOT, copy_subset, run_script


def read(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def resaved(src, dst, factor=0.7, quality=70):
    img = Image.open(src).convert("RGB").resize((112, 112), Image.BICUBIC)  # as a photo would be: larger than 28 px
    img.resize((round(112 * factor),) * 2, Image.BICUBIC).save(dst, quality=quality)


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """Three sample classes at 112 px (as train/ and test/), a re-saved copy of a train image in test/ (a leak), a
    copy of another in another class's folder (a conflict), a solar-cell-like foreign image; --check_data as a user
    runs it with EfficientNet-Lite0's ImageNet weights."""
    root = tmp_path_factory.mktemp("similar")
    data = copy_subset(root / "raw", ["bag", "sneaker", "trouser"], 20, 6)
    for f in sorted(data.rglob("*.png")):
        target = root / "data" / f.relative_to(data)
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(f).convert("RGB").resize((112, 112), Image.BICUBIC).save(target)
    data = root / "data"
    leaked = sorted((data / "train" / "bag").glob("*.png"))[3]
    resaved(leaked, data / "test" / "bag" / "leaked_copy.jpg")
    twice = sorted((data / "train" / "sneaker").glob("*.png"))[5]
    resaved(twice, data / "train" / "trouser" / "sneaker_in_the_trouser_folder.jpg", 0.8, 85)
    rng = random.Random(0)
    cell = Image.new("L", (112, 112), 90)
    for y in (30, 60, 90):
        for x in range(112):
            cell.putpixel((x, y), 20 + rng.randrange(10))
    ImageEnhance.Contrast(cell.convert("RGB")).enhance(1.5).save(data / "train" / "bag" / "foreign.png")
    out = root / "check"
    proc = run_script(
        "train.py",
        "--check_data",
        "--data_dir",
        data,
        "--model_name",
        "efficientnet_lite0",
        "--use_pretrained",
        "--input_size",
        64,
        "--log_dir",
        out,
        "--num_workers",
        0,
        "--verbose",
        1,
    )
    return data, out, proc, leaked, twice


def test_planted_copies_are_a_leak_and_a_conflict_and_fail_the_check(audited):
    data, out, proc, leaked, twice = audited
    assert proc.returncode == 1, proc.stdout + proc.stderr  # a leak: the test figure would be a lie
    rows = read(out / "near_duplicates.csv")
    groups = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    by_file = {r["file"]: r for r in rows}
    leak = by_file[str(data / "test" / "bag" / "leaked_copy.jpg")]
    assert leak["kind"] == "leak" and by_file[str(leaked)]["group"] == leak["group"]
    assert {r["split"] for r in groups[leak["group"]]} >= {"test"} and float(leak["similarity"]) >= 0.95
    conflict = by_file[str(data / "train" / "trouser" / "sneaker_in_the_trouser_folder.jpg")]
    assert "conflict" in conflict["kind"] and by_file[str(twice)]["group"] == conflict["group"]
    assert {r["label"] for r in groups[conflict["group"]]} == {"sneaker", "trouser"}
    assert len(groups) == 2, rows  # the sample's other, distinct images form no group
    assert "near-duplicates: 2 groups" in proc.stdout and "leak: " in proc.stdout


def test_a_foreign_image_ranks_first_among_the_outliers(audited):
    data, out, proc, *_ = audited
    rows = read(out / "outliers.csv")
    assert rows[0]["file"] == str(data / "train" / "bag" / "foreign.png") and len(rows) == 3 * 26 + 3
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and "outliers: the most unusual" in proc.stdout


def test_the_blocked_search_equals_the_whole_one_and_groups_join():
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(300, 16), dim=1)
    small_i, small_s = similarity.neighbours(emb, 4, block=7)
    whole = emb @ emb.T
    whole.fill_diagonal_(-2)
    s, i = whole.topk(4, dim=1)
    assert torch.equal(small_i, i) and torch.allclose(small_s, s)
    classes = torch.arange(300) % 3
    own, _ = similarity.neighbours(emb, 4, within=classes)
    assert bool((classes[own] == classes[:, None]).all())
    assert sorted(map(sorted, similarity.groups_of([(0, 5), (5, 9), (2, 3)], 10))) == [[0, 5, 9], [2, 3]]


def test_k_center_picks_spread_out_rows_not_a_cluster_of_copies():
    """Twenty copies of one uncertain image and a few other uncertain ones: the picks take one of the copies, then
    the others."""
    torch.manual_seed(1)
    cluster = torch.nn.functional.normalize(torch.randn(1, 8), dim=1).repeat(20, 1)
    others = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    emb = torch.cat([cluster, others])
    uncertainty = torch.cat([torch.full((20,), 0.9), torch.full((6,), 0.5)])
    picks = similarity.k_center(emb, 5, uncertainty, pool=10)
    assert picks[0] < 20 and sum(p < 20 for p in picks) == 1 and len(set(picks)) == 5


def test_distinct_small_look_alikes_are_no_leak_but_a_copy_of_one_is(tmp_path):
    """Three pairs of distinct 28 px trousers of the shipped sample that score 0.91-0.92 as crops (their thumbnails
    are blown up, smooth): below the small-image bar, no group. A byte-for-byte copy of one in test/ is a leak."""
    sample = ROOT / "data" / "fashion_sample"
    names = ["train_00038", "train_00644", "train_00209", "t10k_00131", "train_00285", "t10k_00002"]
    files = [str(next(sample.rglob(f"{n}.png"))) for n in names]
    copy = tmp_path / "copy_of_train_00038.png"
    shutil.copy(files[0], copy)
    files.append(str(copy))
    spatial = torch.nn.functional.normalize(torch.randn(3, 16).repeat_interleave(2, 0), dim=1)
    spatial = torch.cat([spatial, spatial[:1]]) + 1e-3 * torch.randn(7, 16)  # each pair (and the copy) neighbours
    splits = ["train", "train", "train", "test", "train", "test", "test"]
    rows, counts, _, _ = similarity.near_duplicate_rows(files, spatial, ["trouser"] * 7, splits)
    assert counts == {"leak": 1}, rows
    assert sorted(Path(r["file"]).name for r in rows) == ["copy_of_train_00038.png", "train_00038.png"]
