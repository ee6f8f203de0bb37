"""The frozen backbone's features (the classifier's inputs): whether a model's head can train on them
(head_takes_features), their extraction for every image in one or several seeded views, and the cache the
head trains on with --freeze (build_feature_cache). The label check (label_check.py) uses the same
extraction."""

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import model_loader
from data_loader import TrainSampler, make_loader
from utils import Progress, bar


@contextmanager
def capture_head_input(model, head):
    """Inside: the list holds the input of the classifier layer `head` of every forward pass (feature
    extraction and ood.py's passes; ood.ScoredModel keeps a hook of its own, which the exporters trace)."""
    taken = []
    handle = model.get_submodule(head).register_forward_pre_hook(lambda m, inputs: taken.append(inputs[0]))
    try:
        yield taken
    finally:
        handle.remove()


def head_takes_features(model, head, input_size, device):
    """True when the classifier layer is the model's last operation (its output is the logits), so
    training it on cached inputs is the same as training it through the frozen backbone."""
    seen = {}
    hook = model.get_submodule(head).register_forward_hook(lambda m, i, o: seen.update(inp=i[0], out=o))
    try:
        with torch.inference_mode():
            was_training = model.training
            model.eval()
            logits = model(torch.randn(2, 3, input_size, input_size, device=device))
            model.train(was_training)
    finally:
        hook.remove()
    out = seen.get("out")
    return (
        out is not None
        and seen["inp"].dim() == 2
        and out.shape == logits.shape
        and torch.allclose(out.float(), logits.float())
    )


def pooled(features):
    """The classifier's input as (N, dim): a 1x1-conv classifier (SqueezeNet) takes a feature map, whose
    spatial mean is used."""
    return features.flatten(2).mean(2) if features.dim() > 2 else features


@dataclass
class FeatureCache:
    train: torch.Tensor  # (views, n_train, dim): backbone outputs, the classifier's inputs
    train_ok: torch.Tensor  # (n_train,) bool: False for unreadable images
    valid: torch.Tensor  # (1, n_valid, dim)
    valid_ok: torch.Tensor
    seconds: float
    location: str  # "memory" or the spill file


class ViewSampler(TrainSampler):
    """Every index once, in order, each with the seed of its augmented view (for cache_views > 1)."""

    def __init__(self, n, seed, view, rank=0, world_size=1):
        super().__init__(n, seed, rank, world_size)
        self.view = view

    def __len__(self):
        return len(range(self.rank, self.n, self.world_size))

    def __iter__(self):
        return iter((i, self.sample_seed(10_000 + self.view, i)) for i in range(self.rank, self.n, self.world_size))


@torch.inference_mode()
def extract_features(model, head, loader, store, view, compute, skips, progress=None, after=None):
    """Fill store[view, index] with the classifier's input for every image this rank's loader yields; `progress`
    (utils.Progress) counts them; after(view, indices) is called after each batch's forward (a hook's reader)."""
    model.eval()
    ok = torch.zeros(store.shape[1], dtype=torch.bool)
    with capture_head_input(model, head) as captured:
        for batch in bar(loader, compute, f"features {view + 1}"):
            skips.add(batch.bad, loader.dataset.samples)
            if batch.labels.numel():
                captured.clear()
                with compute.autocast():
                    model(compute.to_device(batch.images))
                store[view, batch.indices] = pooled(captured[0].float()).cpu()
                ok[batch.indices] = True
                if after is not None:
                    after(view, batch.indices)
            if progress is not None:
                progress.update(len(batch.indices) + len(batch.bad))
            # ranks hold different numbers of batches here, so no collective check under torchrun
            if not compute.dist.enabled and compute.stop_requested():
                return None
    return ok


def view_loader(train_loader, view, rank=0, world_size=1):
    """The training images through the training transform, each seeded by (image, view): augmented view
    number `view`, the same on every run; every image once, in order (this rank's share)."""
    sampler = ViewSampler(len(train_loader.dataset), train_loader.sampler.seed, view, rank, world_size)
    return make_loader(train_loader.dataset, train_loader.batch_size, sampler, train_loader.num_workers)


def extract_views(model, head, view_loaders, store, compute, skips, progress=None, after=None):
    """store[v, i] = the classifier's input for image i as view_loaders[v] yields it (all loaders walk the
    same images). Returns the mask of images read in some view, or None when a stop signal arrived.
    `model` is best an optimize_for_inference copy."""
    ok = torch.zeros(store.shape[1], dtype=torch.bool)
    for view, loader in enumerate(view_loaders):
        got = extract_features(model, head, loader, store, view, compute, skips, progress, after)
        if got is None:
            return None
        ok |= got
    return ok


def feature_store(views, n, dim, budget_mb, spill_path):
    """A zeroed (views, n, dim) float32 tensor in memory, or memory-mapped from a file past the budget."""
    numel = views * n * dim
    if numel * 4 <= budget_mb * 2**20:
        return torch.zeros(views, n, dim), "memory"
    spill_path = Path(spill_path)
    spill_path.parent.mkdir(parents=True, exist_ok=True)
    spill_path.unlink(missing_ok=True)
    store = torch.from_file(str(spill_path), shared=True, size=numel, dtype=torch.float32).view(views, n, dim)
    store.zero_()
    return store, str(spill_path)


def feature_dim(model, head):
    module = model.get_submodule(head)
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def build_feature_cache(model, head, loaders, views, budget_mb, spill_path, compute, skips, log=lambda *a: None):
    """One frozen-backbone pass over train (x views) and valid; under torchrun each rank does its shard
    and an all-reduce assembles the whole (each row is written by exactly one rank). `log`: a line before the
    pass and one after it. None when a stop signal arrived."""
    n_train, n_valid = len(loaders.train_eval.dataset), len(loaders.valid.dataset)
    log(f"feature cache: one pass of the frozen backbone over {n_train} train + {n_valid} valid images ...")
    cache = extract_cache(model, head, loaders, views, budget_mb, spill_path, compute, skips)
    if cache is not None:
        log(
            f"feature cache: {views} view(s) x {n_train} train + {n_valid} valid images, dim {cache.train.shape[2]}, "
            f"in {cache.seconds:.1f}s ({cache.location})"
        )
    return cache


def extract_cache(model, head, loaders, views, budget_mb, spill_path, compute, skips):
    """build_feature_cache's pass, without its lines."""
    start = time.perf_counter()
    dim = feature_dim(model, head)
    model = model_loader.optimize_for_inference(model, compute.channels_last)  # a faster eval-only copy
    n_train, n_valid = len(loaders.train_eval.dataset), len(loaders.valid.dataset)
    train, location = feature_store(views, n_train, dim, budget_mb, spill_path)
    valid = torch.zeros(1, n_valid, dim)
    # one view: the eval transform; several: augmented views (the training transform, seeded per image and view)
    train_loaders = (
        [loaders.train_eval]
        if views == 1
        else [view_loader(loaders.train, view, compute.dist.rank, compute.dist.world_size) for view in range(views)]
    )
    # where no bar shows (a log file), a line every 10 s: a busy machine may take minutes over the pass
    progress = Progress(views * n_train + n_valid, "feature cache", compute.progress, scale=compute.dist.world_size)
    train_ok = extract_views(model, head, train_loaders, train, compute, skips, progress)
    if train_ok is None:
        return None
    valid_ok = extract_views(model, head, [loaders.valid], valid, compute, skips, progress)
    if valid_ok is None:
        return None
    if compute.dist.enabled:
        for t in (train, valid):
            gathered = t.to(compute.device)
            torch.distributed.all_reduce(gathered)
            t.copy_(gathered.cpu())
        masks = torch.cat([train_ok, valid_ok]).to(compute.device, torch.float32)
        torch.distributed.all_reduce(masks)
        train_ok, valid_ok = (masks.cpu() > 0).split([n_train, n_valid])
    return FeatureCache(train, train_ok, valid, valid_ok, time.perf_counter() - start, location)
