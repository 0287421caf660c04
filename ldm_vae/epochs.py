"""Which latent samples each rank and dataloader worker reads in an epoch (the loader's lower half).

The epoch is the shards in an order drawn from (seed, epoch), cut into W equal contiguous ranges
of samples, one per rank, each cut again among the rank's dataloader workers; a range may start
or end inside a shard. ``total mod W`` samples (fewer than W) sit out each epoch. The per-shard
sample counts (and, for buckets, shapes) come from stats.json or from the shards' own headers.
"""

from __future__ import annotations

import glob
import itertools
import multiprocessing as mp
import random
from pathlib import Path

import torch
import webdataset as wds
from webdataset.gopen import gopen_schemes

from . import s3
from .samples import LATENT
from .shards import shard_keys, tar_samples


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """webdataset's opener for ``s3://`` shards: a streamed GET with the AWS variables (:mod:`ldm_vae.s3`)."""
    if mode != "rb":
        raise ValueError(f"{url}: the loader only reads")
    return s3.open_read(url)


# webdataset opens shards through its scheme table: s3:// is added (never replacing another's).
gopen_schemes.setdefault("s3", _gopen_s3)


def expand_shards(shards) -> list[str]:
    if isinstance(shards, (str, Path)):
        shards = [shards]
    out: list[str] = []
    for s in map(str, shards):
        if s.startswith("s3://"):
            out.extend(s3.glob(s, suffix=".tar"))  # a URL, a glob or a prefix ending in '/'
        elif "://" in s:
            out.append(s)  # a URL (webdataset streams http(s), pipe: etc.)
        else:
            out.extend(sorted(glob.glob(s)) if any(ch in s for ch in "*?[") else [s])
    if not out:
        raise FileNotFoundError(f"no latent shards match {shards}")
    return out


class EpochState:
    """The epoch, rank and world size in shared memory: ``set_epoch`` reaches persistent
    dataloader workers, and workers (where torch.distributed is not initialised) use the rank of
    the process that made the loader or last set the epoch."""

    def __init__(self):
        self._state = mp.get_context("spawn").Array("q", [0, *_node()], lock=False)  # epoch, rank, world

    def set_epoch(self, epoch: int) -> None:
        self._state[:] = [int(epoch), *_node()]

    @property
    def epoch(self) -> int:
        return self._state[0]

    @property
    def rank(self) -> int:
        return self._state[1]

    def _where(self) -> tuple[int, int, int, int]:
        """(rank, world, worker, workers) of the caller."""
        if torch.utils.data.get_worker_info() is None:
            self._state[1:] = list(_node())  # in the trainer's own process: ask now
        rank, world = self._state[1:]
        _, _, worker, workers = wds.utils.pytorch_worker_info()
        return rank, world, worker, workers


def epoch_slices(urls: list[str], counts: list[int], order_seed: str, where: tuple[int, int, int, int]):
    """{"url", "skip", "take"} of this rank's and worker's part of one epoch of ``urls``: the
    shards in an order drawn from ``order_seed``, cut into equal ranges per rank, then per worker."""
    rank, world, worker, workers = where
    order = list(range(len(urls)))
    random.Random(order_seed).shuffle(order)  # the same on every rank and worker
    per_rank = sum(counts) // world  # the remainder (< world samples) sits out this epoch
    base, extra = divmod(per_rank, workers)  # workers' shares differ by one sample at most
    lo = rank * per_rank + worker * base + min(worker, extra)
    hi = lo + base + (worker < extra)
    pos = 0
    for i in order:
        n = counts[i]
        if pos < hi and pos + n > lo:
            yield {"url": urls[i], "skip": max(0, lo - pos), "take": min(hi, pos + n) - max(lo, pos)}
        pos += n


class EpochPlan(EpochState, torch.utils.data.IterableDataset):
    """The first stage in epoch mode: {"url", "skip", "take"} for this rank's and worker's part of
    the epoch (see the module's docstring)."""

    def __init__(self, urls: list[str], counts: list[int], seed: int):
        super().__init__()
        self.urls, self.counts, self.seed = urls, counts, seed

    def __iter__(self):
        return epoch_slices(self.urls, self.counts, f"{self.seed}:{self.epoch}", self._where())


def _node() -> tuple[int, int]:
    """(rank, world size): RANK / WORLD_SIZE, else torch.distributed, else (0, 1)."""
    rank, world, _, _ = wds.utils.pytorch_worker_info()
    return rank, world


def read_slices(entries):
    """Samples [skip, skip + take) of each shard; fewer than promised is an error (a rank with
    fewer batches than the others would leave DDP waiting)."""
    for entry in entries:
        reader = tar_samples([{"url": entry["url"]}])
        got = 0
        try:
            for sample in itertools.islice(reader, entry["skip"], entry["skip"] + entry["take"]):
                got += 1
                yield sample
        finally:
            reader.close()
        if got < entry["take"]:
            raise ValueError(f"{entry['url']}: has fewer samples than its count says ({entry['skip'] + got} "
                             f"< {entry['skip'] + entry['take']}): stats.json is stale, re-run encode")


class EpochShuffle:
    """A shuffle buffer seeded by (seed, epoch, rank, worker): another order every epoch."""

    def __init__(self, size: int, seed: int, plan: EpochPlan):
        self.size, self.seed, self.plan = size, seed, plan

    def __call__(self, src):
        _, _, worker, _ = wds.utils.pytorch_worker_info()
        return wds.shuffle(self.size, seed=f"{self.seed}:{self.plan.epoch}:{self.plan.rank}:{worker}")(src)


def shard_counts(urls: list[str], stats=None, counts: dict[str, int] | None = None) -> list[int]:
    """Samples per shard: ``counts``, then stats.json's ``shard_counts``, then (local files) the
    shard's own headers; by file name."""
    known: dict[str, int] = {}
    if stats is not None:
        st = s3.load_json(stats)
        for split in st.get("splits", {}).values():
            known.update({Path(k).name: int(v) for k, v in split.get("shard_counts", {}).items()})
    known.update({Path(k).name: int(v) for k, v in (counts or {}).items()})
    out = []
    for url in urls:
        name = url.rstrip("/").rsplit("/", 1)[-1]
        if name in known:
            out.append(known[name])
        elif "://" in url or url.startswith("pipe:"):
            raise ValueError(f"{url}: epoch mode needs each shard's sample count: pass stats= (stats.json "
                             "lists them) or counts=, or use resampled=True")
        else:
            out.append(len(shard_keys(url)))
    return out


def _first_shape(sample: dict) -> tuple:
    """A latent sample's shape: its mean's [C, h, w]; VQ tokens: the json's latent_shape (the codes')."""
    mean = LATENT.get(sample, "mean")
    if mean is not None:
        return tuple(mean.shape)
    return tuple(LATENT.get(sample, "meta")["latent_shape"])


def shard_shapes(urls: list[str], stats=None) -> list[tuple | None]:
    """The latent shape [C, h, w] of each shard's samples: stats.json's ``shard_shapes``, else
    (local files) its first sample's; None where unknown (a URL without stats)."""
    known: dict[str, tuple] = {}
    if stats is not None:
        st = s3.load_json(stats)
        for split in st.get("splits", {}).values():
            known.update({Path(k).name: tuple(v) for k, v in split.get("shard_shapes", {}).items()})
    out: list[tuple | None] = []
    for url in urls:
        name = url.rstrip("/").rsplit("/", 1)[-1]
        if name in known or "://" in url or url.startswith("pipe:"):
            out.append(known.get(name))
            continue
        reader = tar_samples([{"url": url}])
        try:
            first = next(reader, None)
        finally:
            reader.close()
        out.append(_first_shape(first) if first is not None else None)
    return out
