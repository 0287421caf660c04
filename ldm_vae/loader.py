"""Streaming latent shards into a diffusion trainer.

    from ldm_vae.loader import latent_loader
    loader = latent_loader("data/latents/train/*.tar", stats="data/latents/stats.json",
                           batch_size=64, num_workers=4)
    for epoch in range(epochs):
        loader.set_epoch(epoch)      # a new shard order and shuffle, the same on every rank
        for batch in loader:
            z = batch["latent"]      # [B, C, h, w], normalised to ~N(0, 1)
            captions, labels = batch["caption"], batch["label"]
            # SDXL's size conditioning, [B, 6] long: original_size (h, w), crop_top_left
            # (top, left), target_size (h, w), in the order of SDXL's add_time_ids
            time_ids = batch["time_ids"]

Epoch mode (the default) gives every rank (torch.distributed, or RANK / WORLD_SIZE) the same
number of samples and so the same number of batches, whatever the shard and sample counts, as
``DistributedSampler`` does: a DDP trainer never waits at a step that another rank does not
reach. The epoch is the shards in an order drawn from (seed, epoch), cut into W equal contiguous
ranges of samples, one per rank, each cut again among the rank's dataloader workers; a range may
start or end inside a shard. ``total mod W`` samples (fewer than W) are left out of each epoch:
the last ones of that epoch's order, so other ones each epoch. Per-shard sample counts come from
stats.json (encode writes them), or from the shards' headers for local files.

Aspect-ratio buckets (``data.crop: bucket``): when the shards hold latents of several shapes (one
shape a shard; stats.json's ``shard_shapes``), every batch holds one shape. The epoch is planned
per bucket as above (each bucket's shards in their own order, cut into equal ranges per rank and
worker), so a worker holds the same number of samples of each bucket on every rank; it mixes its
buckets in a random order weighted by what each has left, passes them through the shuffle buffer,
and emits a batch whenever one shape has filled one. Each rank thus gets the same number of
batches, and each bucket's share of batches follows its share of samples. An epoch leaves out
``n mod W`` samples of each bucket (fewer than W per bucket); ``drop_last`` also drops each
worker's last partial batch of each bucket. ``bucket_batch="pixels"`` scales the batch size of
each bucket so that a batch holds about as many latent pixels as ``batch_size`` latents of the
largest bucket (memory stays flat across buckets).

``resampled=True`` instead draws shards at random forever (each rank and worker with its own
seed): for step-based training. Each sample is drawn from the stored posterior (mean + std *
eps) or taken at its mean, and normalised with the per-channel statistics of stats.json, the VAE
config's scaling/shift factors, or not at all.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds

from .epochs import (
    EpochPlan,
    EpochShuffle,
    EpochState,
    epoch_slices,
    expand_shards,
    read_slices,
    shard_counts,
    shard_shapes,
)
from .latent_batches import Collate, ToRaw, packed, tensors, unpacked
from .s3 import load_json
from .shards import ShardError, tar_samples

NORMALIZE = ("channel", "vae", "none")


@dataclass(frozen=True)
class LoaderOptions:
    """How stored samples become the trainer's items: the options of :func:`latent_loader`,
    :func:`latent_dataset` and :func:`~ldm_vae.token_batches.token_loader`, documented once."""
    sample_posterior: bool = True  # z = mean + std * eps, a fresh eps each time; False: the mean
    flip: bool = True  # a random one of the stored views (encode.flip: the mirrored image's latents)
    normalize: str = "channel"  # channel: per-channel N(0, 1) by stats.json | vae: the config's factors | none
    stats: str | Path | None = None  # stats.json (a path or URL): shard counts and shapes, channel statistics
    vae_config: dict | str | Path | None = None  # normalize="vae": the VAE's config (or its folder)
    shuffle: int = 1000  # shuffle buffer, in samples (0: none)
    resampled: bool = False  # shards drawn at random forever (step-based training) instead of epochs
    seed: int = 0  # the epoch orders, the shuffle and (resampled) the shard draws
    counts: dict[str, int] | None = None  # shard file name -> samples: overrides stats.json's (URL shards)


class _Affine:
    """z -> (z - shift) * scale, or with ``inverse`` back; shift and scale are floats or [C, 1, 1]
    tensors. A class, not a closure: dataloader workers started by spawn must pickle it."""

    def __init__(self, shift, scale, inverse: bool = False):
        self.shift, self.scale, self.inverse = shift, scale, inverse

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        shift, scale = self._factors(z)
        return z / scale + shift if self.inverse else (z - shift) * scale

    def apply_(self, z: torch.Tensor) -> torch.Tensor:
        """The same, in place (the loader's batches: no new array)."""
        shift, scale = self._factors(z)
        return z.div_(scale).add_(shift) if self.inverse else z.sub_(shift).mul_(scale)

    def _factors(self, z: torch.Tensor):
        if isinstance(self.shift, torch.Tensor):
            return self.shift.to(z.device), self.scale.to(z.device)
        return self.shift, self.scale


def _normalizer(normalize: str, stats, vae_config, inverse: bool = False) -> _Affine:
    """z -> normalised z (or, with ``inverse``, back to the raw latent the VAE decodes)."""
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize={normalize!r}: allowed: {', '.join(NORMALIZE)}")
    if normalize == "none":
        return _Affine(0.0, 1.0)
    if normalize == "channel":
        if stats is None:
            raise ValueError("normalize='channel' needs stats= (stats.json path or dict)")
        st = load_json(stats)
        mean = torch.tensor(st["channel_mean"], dtype=torch.float32)[:, None, None]  # [C, 1, 1]
        std = torch.tensor(st["channel_std"], dtype=torch.float32)[:, None, None]
        return _Affine(mean, 1.0 / std, inverse)
    if vae_config is None:
        raise ValueError("normalize='vae' needs vae_config= (the VAE's config dict or folder)")
    cfg = vae_config
    if isinstance(cfg, (str, Path)):
        cfg = json.loads((Path(cfg) / "config.json").read_text())
    return _Affine(cfg.get("shift_factor") or 0.0, cfg["scaling_factor"], inverse)


class _ToItem:
    """A stored sample -> {latent [C, h, w] float32, key, caption, label, time_ids [6]}, as one
    item of :func:`latent_dataset` (picklable, as above)."""

    def __init__(self, sample_posterior: bool, flip: bool, norm: _Affine):
        self.raw, self.collate = ToRaw(sample_posterior, flip), Collate(sample_posterior, norm, packs=False)

    def __call__(self, sample: dict) -> dict:
        return {k: v[0] for k, v in tensors(self.collate([self.raw(sample)])).items()}


def latent_dataset(shards, *, sample_posterior: bool = True, flip: bool = True, normalize: str = "channel",
                   stats=None, vae_config=None, shuffle: int = 1000, resampled: bool = False,
                   seed: int = 0, counts: dict[str, int] | None = None) -> wds.DataPipeline:
    """A webdataset pipeline of dicts {latent [C, h, w] float32, key, caption, label}, one per
    sample (the options: :class:`LoaderOptions`).

    Epoch mode: ``set_epoch(epoch)`` on the result (or the loader) before each epoch. URL shards
    need ``stats`` or ``counts``.
    """
    opts = LoaderOptions(sample_posterior, flip, normalize, stats, vae_config, shuffle, resampled, seed, counts)
    urls = expand_shards(shards)
    to_item = _ToItem(opts.sample_posterior, opts.flip, _normalizer(opts.normalize, opts.stats, opts.vae_config))
    return sample_pipeline(urls, [wds.map(to_item)], opts)


def sample_pipeline(urls: list[str], tail: list, opts: LoaderOptions) -> wds.DataPipeline:
    """Samples in epoch order (or resampled), through a shuffle buffer, then the ``tail`` stages."""
    if opts.resampled:
        return wds.DataPipeline(*_resampled(urls, opts.shuffle, opts.seed), *tail)
    plan = EpochPlan(urls, shard_counts(urls, opts.stats, opts.counts), opts.seed)
    stages = [plan, read_slices]
    if opts.shuffle:
        stages.append(EpochShuffle(opts.shuffle, opts.seed, plan))
    pipeline = wds.DataPipeline(*stages, *tail)
    pipeline.set_epoch = plan.set_epoch
    return pipeline


def _resampled(urls: list[str], shuffle: int, seed: int) -> list:
    """The stages of resampled mode: shards drawn at random forever (seeded per rank and worker by
    webdataset), their samples, a shuffle buffer."""
    stages = [wds.ResampledShards(urls, seed=seed, deterministic=True), tar_samples]
    if shuffle:
        stages.append(wds.shuffle(shuffle, seed=seed))
    return stages


class Batched:
    """Raw items -> batches of ``batch_size`` (the last one partial unless ``drop_last``), collated
    in the process that reads them and handed on as :func:`~ldm_vae.latent_batches.packed` says."""

    def __init__(self, collate: Collate, batch_size: int, drop_last: bool):
        self.collate, self.batch_size, self.drop_last = collate, batch_size, drop_last

    def __call__(self, raws):
        return packed(self._batches(raws))

    def _batches(self, raws):
        group: list[dict] = []
        for raw in raws:
            group.append(raw)
            if len(group) == self.batch_size:
                yield self.collate(group)
                group = []
        if group:
            # Collated even when dropped: its noise is drawn, so the random stream (and what a
            # seeded run trains on) is the one a per-item loader gave.
            batch = self.collate(group)
            if not self.drop_last:
                yield batch


class BucketBatches(EpochState, torch.utils.data.IterableDataset):
    """Epoch mode over shards of several latent shapes: batches (collated dicts) of one shape
    each, the same number on every rank (see the module's docstring)."""

    def __init__(self, urls: list[str], counts: list[int], shapes: list[tuple], batch_sizes: dict[tuple, int],
                 to_raw: ToRaw, collate: Collate, shuffle: int, seed: int, drop_last: bool):
        super().__init__()
        self.groups: dict[tuple, tuple[list[str], list[int]]] = {}
        for url, n, shape in zip(urls, counts, shapes):
            g = self.groups.setdefault(shape, ([], []))
            g[0].append(url)
            g[1].append(n)
        self.batch_sizes, self.to_raw, self.collate, self.shuffle = batch_sizes, to_raw, collate, shuffle
        self.batch_size = max(batch_sizes.values())
        self.seed, self.drop_last = seed, drop_last

    def __iter__(self):
        where = self._where()
        readers, labels = {}, []
        for shape, (urls, counts) in sorted(self.groups.items()):
            entries = list(epoch_slices(urls, counts, f"{self.seed}:{self.epoch}:{shape}", where))
            readers[shape] = read_slices(entries)
            labels += [shape] * sum(e["take"] for e in entries)
        # The buckets mixed in a random order: at every point, each one's chance of coming next is
        # its share of what is left, so batches of every bucket spread over the whole epoch.
        random.Random(f"{self.seed}:{self.epoch}:{where[0]}:{where[2]}:mix").shuffle(labels)
        stream = (next(readers[shape]) for shape in labels)
        if self.shuffle:
            stream = wds.shuffle(self.shuffle, seed=f"{self.seed}:{self.epoch}:{where[0]}:{where[2]}")(stream)
        try:
            yield from packed(bucket_batches(map(self.to_raw, stream), self.batch_sizes, self.batch_size,
                                             self.drop_last, self.collate))
        finally:
            for reader in readers.values():
                reader.close()


def bucket_batches(items, batch_sizes: dict[tuple, int], default: int, drop_last: bool = False, collate=None):
    """Items (dicts with a ``latent`` [C, h, w]; with ``collate``, raw items with a ``mean``) ->
    collated batches of one latent shape each: a batch as soon as a shape has
    ``batch_sizes[shape]`` items (``default`` for a shape not listed); the partial ones at the end
    (in shape order) unless ``drop_last``."""
    field = "latent" if collate is None else collate.field
    collate = collate or torch.utils.data.default_collate
    sizes = {tuple(x)[-2:]: n for x, n in batch_sizes.items()}  # by (h, w): tokens have no channel axis
    pending: dict[tuple, list[dict]] = {}
    for item in items:
        shape = tuple(item[field].shape)
        group = pending.setdefault(shape, [])
        group.append(item)
        if len(group) >= sizes.get(shape[-2:], default):
            yield collate(pending.pop(shape))
    if not drop_last:
        for shape in sorted(pending):
            yield collate(pending[shape])


BUCKET_BATCH = ("samples", "pixels")


def bucket_batch_sizes(shapes, batch_size: int, policy: str = "samples") -> dict[tuple, int]:
    """Batch size per latent shape [C, h, w]: ``batch_size`` for each ("samples"), or ("pixels")
    as many as hold the latent pixels of ``batch_size`` latents of the largest shape."""
    if policy not in BUCKET_BATCH:
        raise ValueError(f"bucket_batch={policy!r}: allowed: {', '.join(BUCKET_BATCH)}")
    shapes = {tuple(x) for x in shapes}
    if policy == "samples" or not shapes:
        return {x: batch_size for x in shapes}
    most = max(h * w for _, h, w in shapes)
    return {x: max(1, batch_size * most // (x[1] * x[2])) for x in shapes}


class LatentLoader(torch.utils.data.DataLoader):
    """A DataLoader with ``set_epoch`` (epoch mode), whose error for a damaged shard says so on its
    first line, naming the shard and how to find every damaged file (not at the bottom of a worker's
    traceback)."""

    _held: list  # arena blocks of the workers' packs this process still holds (latent_batches.py)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._held = []

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __iter__(self):
        try:
            yield from unpacked(super().__iter__(), self.num_workers, self._held)  # workers' packs (latent_batches.py)
        except ShardError as e:
            raise ShardError(f"damaged shard {_shard_problem(e)}; {ShardError.HINT}") from e


def _shard_problem(e: ShardError) -> str:
    """"<shard>: <what>" of a ShardError, raised here or re-raised from a loader worker (whose
    message is the worker's traceback, ending with the original error's line)."""
    lines = [line.split("ShardError: ", 1)[1] for line in str(e).splitlines() if "ShardError: " in line]
    return lines[-1] if lines else str(e).splitlines()[0]


def latent_loader(shards, batch_size: int, num_workers: int = 2, drop_last: bool = False, *,
                  bucket_batch: str = "samples", sample_posterior: bool = True, flip: bool = True,
                  normalize: str = "channel", stats=None, vae_config=None, shuffle: int = 1000,
                  resampled: bool = False, seed: int = 0, counts: dict[str, int] | None = None) -> LatentLoader:
    """A DataLoader of batches {latent [B, C, h, w] float32, key, caption, label [B], time_ids [B, 6]}:
    over :func:`latent_dataset`'s items, or one shape a batch when the shards hold latents of
    several shapes (buckets). The sample options are :class:`LoaderOptions`'.

    ``drop_last``: only full batches. Each loader worker drops its own last partial batch (of each
    bucket), so an epoch loses fewer than ``max(1, num_workers) * batch_size`` samples per rank
    (per bucket), and every rank still gets the same number of batches (their worker shares are
    equal). ``bucket_batch``: "samples" or "pixels" (see the module's docstring)."""
    opts = LoaderOptions(sample_posterior, flip, normalize, stats, vae_config, shuffle, resampled, seed, counts)
    urls = expand_shards(shards)
    shapes = shard_shapes(urls, opts.stats)
    collate = Collate(opts.sample_posterior, _normalizer(opts.normalize, opts.stats, opts.vae_config))
    items = (ToRaw(opts.sample_posterior, opts.flip), collate)
    return batch_loader(urls, shapes, items, batch_size, num_workers, drop_last, bucket_batch, opts)


def batch_loader(urls: list[str], shapes: list, items: tuple, batch_size: int, num_workers: int, drop_last: bool,
                 bucket_batch: str, opts: LoaderOptions) -> LatentLoader:
    """The loader over ``urls`` with ``items`` = (to_raw: a sample -> a raw item, collate: raw items
    -> a batch): one pipeline for one shape, :func:`bucket_dataset` for several (also the token
    loader's, ldm_vae.token_batches)."""
    if len({x for x in shapes if x is not None}) > 1:
        dataset = bucket_dataset(urls, batch_size, drop_last, bucket_batch, shapes, items, opts)
    else:
        dataset = sample_pipeline(urls, [wds.map(items[0]), Batched(items[1], batch_size, drop_last)], opts)
    # Batches come collated from the dataset (latent_batches.py), so the loader passes them on as they are.
    return LatentLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
                        collate_fn=as_is)


def as_is(batch):
    return batch


def bucket_dataset(urls: list[str], batch_size: int, drop_last: bool, bucket_batch: str, shapes: list, items: tuple,
                   opts: LoaderOptions):
    """Batches of one latent shape each (``items``: see :func:`batch_loader`), for shards of
    several shapes: epoch mode (:class:`BucketBatches`) or ``resampled``. ``shapes``: each shard's
    latent shape (:func:`~ldm_vae.epochs.shard_shapes`)."""
    unknown = [u for u, x in zip(urls, shapes) if x is None]
    if unknown:
        raise ValueError(f"{unknown[0]}: the latent shape of its samples is unknown: pass stats= (stats.json lists "
                         "each shard's shape); with several shapes every batch must hold one")
    sizes = bucket_batch_sizes(shapes, batch_size, bucket_batch)
    to_raw, collate = items
    if opts.resampled:
        return wds.DataPipeline(*_resampled(urls, opts.shuffle, opts.seed), wds.map(to_raw), _ResampledBuckets(
            collate, sizes, batch_size, drop_last))
    return BucketBatches(urls, shard_counts(urls, opts.stats, opts.counts), shapes, sizes, to_raw, collate,
                         opts.shuffle, opts.seed, drop_last)


class _ResampledBuckets:
    """Resampled mode's stage: raw items -> one-shape batches (picklable, unlike a lambda)."""

    def __init__(self, collate: Collate, sizes: dict[tuple, int], default: int, drop_last: bool):
        self.collate, self.sizes, self.default, self.drop_last = collate, sizes, default, drop_last

    def __call__(self, raws):
        return packed(bucket_batches(raws, self.sizes, self.default, self.drop_last, self.collate))


@torch.no_grad()
def decode_latents(vae, z: torch.Tensor, normalize: str = "channel", stats=None) -> torch.Tensor:
    """Normalised latents [B, C, h, w] (as the loader gave them) -> images [B, 3, 8h, 8w] in [0, 1].

    ``normalize`` and ``stats`` must be what the loader used; ``vae`` is the exported
    ``AutoencoderKL`` (its config provides the factors for ``normalize="vae"``).
    """
    raw = _normalizer(normalize, stats, dict(vae.config), inverse=True)(z)
    param = next(vae.parameters())
    images = vae.decode(raw.to(param.device, param.dtype)).sample
    return ((images.float().clamp(-1, 1) + 1) / 2).cpu()
