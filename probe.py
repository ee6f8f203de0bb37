"""The linear probe of LP-FT (linear probe, then fine-tune; Kumar et al. 2022): before any backbone weight
moves, the new head is fitted to convergence on the frozen backbone's cached features with full-batch L-BFGS,
once per L2 penalty of a grid, and the penalty with the lowest validation loss is kept. Fine-tuning then
starts from a head that already fits, so its first gradients do not tear into the pretrained features."""

import copy
import time
from dataclasses import dataclass, field

import torch

L2_GRID = (
    10.0,
    3.0,
    1.0,
    3e-1,
    1e-1,
    3e-2,
    1e-2,
    3e-3,
    1e-3,
    3e-4,
    1e-4,
)  # strongest first; each fit starts from the last
DEFAULT_L2 = 1e-3  # without validation features to choose with
MAX_ITER = 100  # L-BFGS iterations per penalty (each at most 1.25x as many loss evaluations)


@dataclass
class ProbeResult:
    l2: float  # the penalty kept
    train_loss: float  # the training objective's data term at that penalty
    valid: dict  # the task's validation metrics (loss, accuracy, count, ...) of the kept head
    seconds: float
    tried: list = field(default_factory=list)  # (l2, validation loss) of every penalty, in order


def fit_head(head, x, y, criterion, l2, max_iter=MAX_ITER):
    """head's parameters minimising criterion(head(x), y) + l2/2 * (sum of its weight matrices squared), from
    where they are (full batch, L-BFGS with a strong-Wolfe line search); returns the data term at the end."""
    params = [p for p in head.parameters() if p.requires_grad]
    weights = [p for p in params if p.dim() > 1]
    opt = torch.optim.LBFGS(
        params,
        lr=1,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
    )

    def objective():
        opt.zero_grad(set_to_none=True)
        loss = criterion(head(x).float(), y)
        total = loss + 0.5 * l2 * sum((w * w).sum() for w in weights)
        total.backward()
        return total

    opt.step(objective)
    with torch.no_grad():
        return float(criterion(head(x).float(), y))


def fit_probe(head, train_x, train_y, valid_x, valid_y, criterion, task, grid=L2_GRID, stop=lambda: False):
    """Fit `head` (in place, in eval mode) on the training features at every penalty of `grid` and keep the one
    whose validation loss (the task's plain loss) is lowest. None when `stop()` turned true (the head is then
    left as it was)."""
    start = time.perf_counter()
    head.eval()
    initial = copy.deepcopy(head.state_dict())
    if not len(valid_y):
        grid = (DEFAULT_L2,)
    best, tried = None, []
    for l2 in grid:
        with torch.enable_grad():
            train_loss = fit_head(head, train_x, train_y, criterion, l2)
        if stop():
            head.load_state_dict(initial)
            return None
        with torch.no_grad():
            valid = task.metrics(head(valid_x).float(), valid_y) if len(valid_y) else {"loss": float("nan")}
        tried.append((l2, valid["loss"]))
        if best is None or valid["loss"] < best[2]["loss"]:
            best = (l2, train_loss, valid, copy.deepcopy(head.state_dict()))
    l2, train_loss, valid, state = best
    head.load_state_dict(state)
    return ProbeResult(l2, train_loss, valid, time.perf_counter() - start, tried)
