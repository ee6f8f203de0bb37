"""The label check of train.py --check_data (label_check.py): planted wrong labels rank first, the CSV, the
figure, small classes, unreadable files, and the audit without a backbone."""

import csv
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SAMPLE, run_script

COLOURS = {"blue": (30, 40, 200), "green": (30, 180, 40), "red": (200, 30, 30)}
PER_CLASS = 12
FLIPS = {"red/red_03.png": "green", "green/green_05.png": "blue", "blue/blue_07.png": "red"}  # file -> wrong folder


def make_colour_set(root, seed=0):
    """train/<colour>/*.png: 32 px images of the class's colour with per-pixel noise (no two files alike),
    then one image of each class moved into another class's folder: the planted wrong labels.
    The classes are told apart by colour, which even a randomly initialised ResNet's pooled features
    keep apart linearly; so a random backbone (deterministic, no training, no download) is a backbone
    whose features separate these classes, and what is tested is our ranking, not the backbone."""
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = np.clip(np.array(rgb) + rng.integers(-40, 41, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}_{i:02d}.png")
    wrong = []
    for rel, folder in FLIPS.items():
        dst = root / "train" / folder / rel.split("/")[1]
        shutil.move(root / "train" / rel, dst)
        wrong.append(str(dst))
    return wrong


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18_random.pth"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def checked(tmp_path_factory, random_weights):
    """train.py --check_data --weights as a user runs it, on the colour set plus one unreadable file."""
    root = tmp_path_factory.mktemp("colours")
    wrong = make_colour_set(root)
    broken = root / "train" / "green" / "broken.png"
    broken.write_bytes(b"")
    out = root / "out"
    proc = run_script(
        "train.py",
        "--check_data",
        "--data_dir",
        root,
        "--model_name",
        "resnet18",
        "--weights",
        random_weights,
        "--input_size",
        32,
        "--log_dir",
        out,
        "--verbose",
        0,
        "--num_workers",
        0,
        "--gpu_id",
        -1,
    )
    with open(out / "label_issues.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return root, wrong, broken, out, proc, rows


def test_planted_wrong_labels_rank_first_and_are_flagged(checked):
    root, wrong, _, _, proc, rows = checked
    header, body = rows[0], rows[1:]
    assert sorted(r[0] for r in body[:3]) == sorted(wrong), body[:5]
    assert all(float(r[3]) < 0.5 for r in body[:3]) and all(float(r[3]) > 0.5 for r in body[3:])
    by_file = {r[0]: dict(zip(header, r)) for r in body}
    for rel, folder in FLIPS.items():
        row = by_file[str(root / "train" / folder / rel.split("/")[1])]
        assert row["given"] == folder and row["suggested"] == rel.split("/")[0] and row["flagged"] == "1"
    assert sum(r[4] == "1" for r in body) == 3, [r for r in body if r[4] == "1"]
    assert "flagged: 3 of 36 labels look wrong; per class: blue 1, green 1, red 1" in proc.stdout
    # the 3 planted errors are taken for noise (3/36 = 8%: 5% of the grid's shares or 10%), not as a sign that the
    # colours are hard: a clean set of these colours would get about no flag, so 3 points to wrong labels
    expected = proc.stdout.split("a clean set of 36 images would get about ")[1]
    assert int(expected.split()[0]) <= 1 and "each label drawn from its out-of-fold probabilities" in expected
    assert "tempered as without the 5.0% of labels" in expected or "without the 10.0% of labels" in expected
    top = proc.stdout.split("most suspicious")[1].splitlines()[1:11]
    assert len(top) == 10 and all(r[0] in line for r, line in zip(body[:10], top))


def test_csv_columns_order_and_every_readable_image_once(checked):
    root, _, broken, _, _, rows = checked
    assert rows[0][:5] == ["file", "given", "suggested", "score", "flagged"]
    files = [r[0] for r in rows[1:]]
    readable = sorted(str(p) for p in (root / "train").rglob("*.png") if p != broken)
    assert sorted(files) == readable and len(files) == len(set(files)) == 3 * PER_CLASS
    scores = [float(r[3]) for r in rows[1:]]
    assert scores == sorted(scores)  # most suspicious first
    assert {r[6] for r in rows[1:]} == {"train", "valid"}  # the check covers the validation split too


def test_unreadable_image_is_skipped_named_and_fails_the_audit_as_before(checked):
    _, _, broken, _, proc, rows = checked
    assert proc.returncode == 1, proc.stderr  # the audit's status: an unreadable file
    assert f"warning: skipping unreadable image {broken} (" in proc.stdout
    assert "unreadable: 1" in proc.stdout
    assert str(broken) not in {r[0] for r in rows}


def test_suspects_figure_is_a_real_image(checked):
    out = checked[3]
    with Image.open(out / "label_issues.png") as img:
        img.load()
        assert img.size[0] > 600 and img.size[1] > 200
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.std() > 10  # images and titles, not a blank canvas
    assert (np.abs(pixels.astype(int) - (200, 30, 30)).sum(-1) < 80).sum() > 1000  # the red images are drawn


def test_flagged_labels_alone_do_not_fail_and_without_a_backbone_the_check_is_named(tmp_path, random_weights, capsys):
    import train

    make_colour_set(tmp_path / "data")
    base = [
        "--check_data",
        "--data_dir",
        str(tmp_path / "data"),
        "--model_name",
        "resnet18",
        "--log_dir",
        str(tmp_path / "out"),
        "--input_size",
        "32",
        "--verbose",
        "0",
        "--gpu_id",
        "-1",
    ]
    assert train.main(train.parse_args(base)) is None  # status 0: the audit found nothing wrong
    out = capsys.readouterr().out
    assert (
        "label check, near-duplicates and outliers: skipped; they need a pretrained backbone (--use_pretrained or "
        "--weights FILE)" in out
    )
    assert not (tmp_path / "out").exists()
    assert train.main(train.parse_args(base + ["--weights", str(random_weights)])) is None
    assert "flagged: 3 of 36" in capsys.readouterr().out


def test_a_class_smaller_than_k_gets_fewer_folds_with_a_note():
    import label_check as lc

    names = ["a", "b", "c"]
    labels = [0] * 10 + [1] * 10 + [2] * 3
    k, note = lc.choose_folds(labels, names)
    assert k == 3 and note == "class c has 3 images: 3-fold instead of 5-fold"
    folds = lc.stratified_folds(torch.tensor(labels), k, seed=0)
    for c in range(3):  # every class in every fold, fold sizes within one image
        assert set(folds[torch.tensor(labels) == c].tolist()) == {0, 1, 2}
    assert torch.bincount(folds).tolist() in ([8, 8, 7], [8, 7, 8], [7, 8, 8])
    assert torch.equal(folds, lc.stratified_folds(torch.tensor(labels), k, seed=0))
    assert not torch.equal(folds, lc.stratified_folds(torch.tensor(labels), k, seed=1))
    k, note = lc.choose_folds([0, 0, 0, 1], ["a", "b"])
    assert k == 2 and "class b has 1 image: 2-fold" in note and "means little" in note
    # the whole fit with the small class: each image scored once, probabilities that sum to 1
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 3
    features = (centres[torch.tensor(labels)] + torch.randn(len(labels), 16, generator=g))[None]
    probs, l2, losses = lc.cross_validated_probs(features, labels, 3, 3, seed=0)
    assert probs.shape == (23, 3) and torch.allclose(probs.sum(1), torch.ones(23), atol=1e-5)
    assert (probs.argmax(1) == torch.tensor(labels)).float().mean() > 0.9
    assert l2 in lc.L2_GRID and losses[l2] == min(losses.values())


def test_batched_fits_equal_separate_fits():
    import label_check as lc

    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=g)
    y = (x[:, 0] + 0.5 * torch.randn(60, generator=g) > 0).long() + (x[:, 1] > 1).long()
    masks = torch.stack([torch.arange(60) % 3 != 0, torch.arange(60) % 2 == 0]).float()
    l2s = torch.tensor([0.01, 1.0])
    together = lc.fit_softmax(x, y, masks, l2s, 3)
    for p in range(2):
        alone = lc.fit_softmax(
            x[masks[p].bool()], y[masks[p].bool()], torch.ones(1, int(masks[p].sum())), l2s[p : p + 1], 3
        )
        assert torch.allclose(lc.predict_softmax(together[p], x), lc.predict_softmax(alone[0], x), atol=2e-3)
    assert not torch.allclose(together[0], together[1], atol=1e-2)


def test_confident_learning_flags_use_per_class_thresholds():
    import label_check as lc

    probs = torch.tensor(
        [
            [0.9, 0.1],
            [0.7, 0.3],
            [0.4, 0.6],  # given 0: mean p0 = (0.9+0.7+0.4)/3 = 0.667
            [0.2, 0.8],
            [0.1, 0.9],
            [0.55, 0.45],
        ]
    )  # given 1: mean p1 = (0.8+0.9+0.45)/3 = 0.717
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    flags, thresholds = lc.confident_learning_flags(probs, labels, 2)
    assert torch.allclose(thresholds, torch.tensor([2 / 3, 2.15 / 3]))
    # image 2: p1 0.6 > p0 0.4 but below class 1's threshold 0.717 -> kept; image 5: p0 0.55 < 0.667 -> kept
    assert flags.tolist() == [False] * 6
    probs[2] = torch.tensor([0.2, 0.8])  # now above class 1's threshold (which stays 0.717)
    flags, thresholds = lc.confident_learning_flags(probs, labels, 2)
    assert flags.tolist() == [False, False, True, False, False, False]
    rows = lc.LabelIssues([f"f{i}" for i in range(6)], labels, ["train"] * 6, probs, ["a", "b"]).table()
    assert [r["file"] for r in rows] == ["f2", "f5", "f1", "f3", "f0", "f4"]  # ties by path
    assert rows[0] == {
        "file": "f2",
        "given": "a",
        "suggested": "b",
        "score": pytest.approx(0.2),
        "flagged": 1,
        "suggested_score": pytest.approx(0.8),
        "split": "train",
    }


def test_with_imagenet_features_flipped_sample_images_rank_first(tmp_path):
    """Real images (30 per class of the shipped sample) and real ImageNet features (efficientnet_lite0, whose
    weights come with requirements.txt): one image of each class moved into another class's folder."""
    classes = ["bag", "sneaker", "trouser"]
    for c in classes:
        (tmp_path / "train" / c).mkdir(parents=True)
        for f in sorted((SAMPLE / "train" / c).glob("*.png"))[:30]:
            shutil.copy(f, tmp_path / "train" / c / f.name)
    wrong = {}  # path now -> the class it really is
    for i, (c, to) in enumerate(zip(classes, classes[1:] + classes[:1])):
        moved = sorted((tmp_path / "train" / c).glob("*.png"))[3 + 2 * i]
        wrong[str(shutil.move(moved, tmp_path / "train" / to / moved.name))] = c
    out = tmp_path / "out"
    proc = run_script(
        "train.py",
        "--check_data",
        "--data_dir",
        tmp_path,
        "--model_name",
        "efficientnet_lite0",
        "--use_pretrained",
        "--input_size",
        64,
        "--log_dir",
        out,
        "--verbose",
        0,
        "--num_workers",
        0,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(out / "label_issues.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 90 and sorted(r["file"] for r in rows[:3]) == sorted(wrong), rows[:5]
    assert all(float(r["score"]) < 0.1 for r in rows[:3]) and float(rows[3]["score"]) > 0.1, rows[:4]
    assert all(r["suggested"] == wrong[r["file"]] for r in rows[:3])
    flagged = [r["file"] for r in rows if r["flagged"] == "1"]
    # confident learning flags only what clears the suggested class's own images' average probability for
    # it (high on these easy classes): here 2 of the 3, and nothing else
    assert len(flagged) >= 2 and set(flagged) <= set(wrong), flagged
    assert f"flagged: {len(flagged)} of 90 labels look wrong" in proc.stdout


def test_the_flags_a_clean_set_would_get_are_those_of_labels_drawn_from_the_probabilities():
    import label_check as lc

    # half the images 0.9 class a, half 0.9 class b: drawn labels disagree with the likelier class 10% of the
    # time, and confident learning flags exactly those (0.9 clears each class's mean of about 0.82)
    probs = torch.tensor([[0.9, 0.1]] * 100 + [[0.1, 0.9]] * 100)
    assert 17 < lc.expected_flags([probs], seed=0) < 23
    assert lc.expected_flags([probs], seed=0) == lc.expected_flags([probs], seed=0)  # seeded
    assert lc.expected_flags([torch.tensor([[0.999, 0.001]] * 100 + [[0.001, 0.999]] * 100)], seed=0) < 1
    # multi-label: two such classes, an image counted once when either flags it: 1 - 0.9^2 = 19%
    other = torch.cat([probs[::2], probs[1::2]])  # the second class independent of the first
    assert 33 < lc.expected_flags([probs, other], seed=0) < 43


def test_the_printed_list_holds_the_flagged_rows_first_and_the_expected_false_alarms(tmp_path):
    import data_loader
    import label_check as lc

    rows = [
        {
            "file": str(tmp_path / f"f{i}.png"),
            "given": "a",
            "suggested": "b",
            "score": 0.1 * i,
            "flagged": int(i % 2 == 0),
            "suggested_score": 1 - 0.1 * i,
            "split": "train",
        }
        for i in range(5)
    ]
    said = []
    lc.report(
        rows,
        tmp_path,
        {"input_size": 32, "resize_size": 32},
        ["a", "b"],
        said.append,
        0.0,
        0.0,
        0,
        ([3, 0], "a fit", "accuracy", 0.9),
        data_loader.SkipLog([], ["a", "b"], said.append),
        (2.4, 0.02),
    )
    assert said[1] == "flagged: 3 of 5 labels look wrong; per class: a 3, b 0"
    assert said[2].startswith(
        "a clean set of 5 images would get about 2 flags (48.0%; each label drawn from its "
        "out-of-fold probabilities, tempered as without the 2.0% of labels the fit takes for "
        "noise, mean of 20 draws)"
    )
    assert said[3] == (
        "most suspicious, flagged first (given -> suggested, score = out-of-fold probability of the given label):"
    )  # one label per image: nothing about several
    listed = [line.split()[0] for line in said[4:9]]
    assert listed == [str(tmp_path / f"f{i}.png") for i in (0, 2, 4, 1, 3)]  # flagged, then the rest; by score
    assert [line.endswith("flagged") for line in said[4:9]] == [True] * 3 + [False] * 2
    with open(tmp_path / "label_issues.csv", newline="", encoding="utf-8") as f:
        assert [r["file"] for r in csv.DictReader(f)] == [r["file"] for r in rows]  # the CSV keeps the score order


def test_the_clean_set_estimate_does_not_rise_with_the_wrong_labels_it_measures():
    """Four well-separated classes of 60 feature vectors: with 8 (then 20) labels planted wrong, the check flags
    them, and the flags a clean set of that size would get stay where the clean set's are. The plain out-of-fold
    probabilities (softened by the L2 strength the wrong labels pushed up) gave 1.75 clean and 8.45 with 8."""
    import label_check as lc

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 32, generator=g) * 1.2
    x = torch.cat([centers[c] + torch.randn(60, 32, generator=g) for c in range(4)])[None]
    y = torch.arange(4).repeat_interleave(60)

    def check(labels):
        probs, _, _ = lc.cross_validated_probs(x, labels, 4, 5, 0)
        flags = lc.confident_learning_flags(probs, labels, 4)[0]
        return flags, lc.expected_flags([probs], 0), lc.clean_set_flags([probs], [labels], 0)

    _, plain_clean, (clean, noise_clean) = check(y)
    assert clean <= 1 and noise_clean == 0.0
    order = torch.randperm(len(y), generator=g)
    for n_wrong in (8, 20):
        wrong = y.clone()
        planted = order[:n_wrong]
        wrong[planted] = (wrong[planted] + 1 + torch.randint(3, (n_wrong,), generator=g)) % 4
        flags, plain, (estimate, noise) = check(wrong)
        assert int(flags[planted].sum()) >= n_wrong // 2  # the check finds them
        assert plain > plain_clean + 4  # what the estimate used to be: inflated by the errors
        assert estimate <= clean + 2 and estimate < plain / 4 and 0 < noise <= 0.1, (estimate, noise)


def test_as_if_clean_keeps_calibrated_probabilities_and_finds_the_noise_share():
    """Labels drawn from the probabilities themselves: temperature about 1 and no noise. The same with a fifth
    of the labels replaced at random: the temperature stays near 1 and the noise share is found."""
    import label_check as lc

    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(4000, 3, generator=g) * 2, 1)
    labels = torch.multinomial(probs, 1, generator=g)[:, 0]
    _, t, e = lc.as_if_clean(probs, labels)
    assert abs(t - 1) < 0.1 and e <= 0.01
    noisy = labels.clone()
    swap = torch.rand(4000, generator=g) < 0.2
    noisy[swap] = torch.randint(3, (int(swap.sum()),), generator=g)
    tempered, t, e = lc.as_if_clean(probs, noisy)
    assert abs(t - 1) < 0.15 and e == 0.2 and torch.allclose(tempered.sum(1), torch.ones(4000))
