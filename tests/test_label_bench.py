"""bench/label_bench.py's alternative rankings (the script itself runs, small, in test_e2e's README check):
the normalized margin and the cosine k-nearest-neighbour vote, on numbers worked out by hand."""

import pytest
import torch

from helpers import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench/label_bench.py")


def test_margin_is_given_minus_the_largest_other_and_orders_the_ranking(bench):
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.4, 0.4, 0.2]])
    labels = torch.tensor([0, 0, 2])
    margin = bench.margin_scores(probs, labels)
    assert torch.allclose(margin, torch.tensor([0.5 - 0.3, 0.1 - 0.6, 0.2 - 0.4]))  # 0.2, -0.5, -0.2
    ranking, flagged = bench.ranked(["f0", "f1", "f2"], labels, probs, ["a", "b", "c"], margin)
    assert ranking == ["f1", "f2", "f0"]
    # by self-confidence (the check's order) f1 (0.1) and f2 (0.2) also lead, but f0 (0.5) stays last
    assert bench.ranked(["f0", "f1", "f2"], labels, probs, ["a", "b", "c"])[0] == ["f1", "f2", "f0"]
    assert "f1" in flagged


def test_knn_vote_counts_the_labels_of_the_most_similar_other_images(bench):
    # directions: x0 0 deg, x1 ~5.7 deg, x2 90 deg, x3 ~88 deg (longer: cosine ignores length), x4 45 deg
    features = torch.tensor([[1.0, 0.0], [2.0, 0.2], [0.0, 1.0], [0.1, 3.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1, 0])
    votes = bench.knn_votes(features, labels, 2, 2)
    # cosines: x0 -> x1 .995, x4 .707; x1 -> x0 .995, x4 .774; x2 -> x3 .999, x4 .707;
    # x3 -> x2 .999, x4 .730; x4 -> x1 .774, x3 .730 (never itself)
    assert torch.allclose(votes, torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]))
