"""calibration.py: what predict.py tallies of the labelled rows."""

import torch

import calibration
import tasks


def test_tally_packs_the_probabilities_and_keeps_their_order(monkeypatch):
    monkeypatch.setattr(calibration.Tally, "PACKED", 2)  # chunks of 2 rows: 5 rows are 2 chunks and 1 row pending
    task = tasks.SingleLabel()
    probs = torch.softmax(torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), 1)
    tally = task.tally()
    for label, p in zip([0, 1, 2, 1, 0], probs):
        tally.add(label, int(p.argmax()), p)
    assert len(tally.packed) == 2 and len(tally.recent) == 1
    assert torch.equal(tally.probs, probs)
    confidence, correct = tally.confidence_correct()
    assert torch.equal(confidence, probs.max(1).values)
    assert correct.tolist() == [int(p.argmax()) == y for p, y in zip(probs, [0, 1, 2, 1, 0])]
