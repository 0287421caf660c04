"""From stored latent samples to batches, and from a loader worker to the trainer's process: the
loader's hot path (:mod:`ldm_vae.loader` builds the pipelines around it).

Per sample only what must be: the members parsed, the flip chosen, the label checked
(:class:`ToRaw`). The arithmetic (float16 to float32, the posterior sample, the normalisation) runs
once per batch (:class:`Collate`); torch draws a batch's noise as it would draw each item's in
turn, so the numbers are the ones a per-item loader gives.

A loader worker does not hand batches over one by one. Each handover costs the DataLoader's queue
round trip and, per tensor, a shared-memory file whose descriptor crosses a socket: about 1.5 ms,
as much as the worker's work on 15 latents of 4x32x32 (bench/loader.py, BENCHMARKS.md). A worker
sends *packs* instead: up to PACK_BATCHES consecutive batches, their latents in one tensor (at
most PACK_BYTES), the small fields as arrays inside the pickle; :func:`unpacked`, in the trainer's
process, cuts a pack back into the same batches, in the same order (views of the one tensor). The
worker collates straight into that tensor's shared memory, and reuses it once the trainer's
process has let go of it (:class:`_Arena`).
"""

from __future__ import annotations

import collections
import json
import random

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from .samples import LATENT, npy_load

SIZE_FIELDS = ("original_size", "crop_top_left", "target_size")
PACK_BATCHES = 16
PACK_BYTES = 16 << 20  # latents per pack: 16 MiB; a batch larger than that travels alone


class ToRaw:
    """A stored sample -> {mean, std (None without posterior sampling): float16 [C, h, w], key,
    caption, label, time_ids: int64 [6]} (picklable: dataloader workers started by spawn)."""

    def __init__(self, sample_posterior: bool, flip: bool):
        self.sample_posterior, self.flip = sample_posterior, flip

    def __call__(self, sample: dict) -> dict:
        # LATENT's fields, looked up directly: per sample, this is most of a loader worker's Python
        suffix = ""
        if self.flip and "mean_flip.npy" in sample and random.random() < 0.5:
            suffix = "_flip"
        try:
            mean = npy_load(sample[f"mean{suffix}.npy"])
            std = npy_load(sample[f"std{suffix}.npy"]) if self.sample_posterior else None
        except KeyError as e:
            what = ("it holds VQ tokens: read them with token_loader" if "tokens.npy" in sample
                    else "a latent shard holds mean.npy and std.npy (encode's output)")
            raise KeyError(f"latent sample {sample.get('__key__')!r} has no member {e.args[0]!r}: {what}") from None
        return {"mean": mean, "std": std, **conditioning(sample, mean.shape)}


def conditioning(sample: dict, latent_shape) -> dict:
    """A stored sample's key, caption, label (an int; -1 without) and time_ids int64 [6]."""
    label = LATENT.get(sample, "label", -1) if "cls" in sample else -1
    if not isinstance(label, int):
        raise ValueError(f"latent sample {sample['__key__']!r}: label {label!r} is text; the loader returns "
                         "class indices, so the source's label column must hold integers")
    return {"key": sample["__key__"], "caption": LATENT.get(sample, "caption") if "txt" in sample else "",
            "label": label, "time_ids": size_ids(json.loads(sample["json"]) if "json" in sample else {}, latent_shape)}


def size_ids(meta: dict, latent_shape) -> np.ndarray:
    """SDXL's size conditioning, int64 [6] (see :func:`ldm_vae.loader.time_ids`)."""
    if all(f in meta for f in SIZE_FIELDS):
        return np.array(meta["original_size"] + meta["crop_top_left"] + meta["target_size"], np.int64)
    h, w = 8 * latent_shape[-2], 8 * latent_shape[-1]
    return np.array([h, w, 0, 0, h, w], np.int64)


def small_fields(raws: list[dict]) -> dict:
    """A batch's key, caption (lists), label int64 [B] and time_ids int64 [B, 6]."""
    return {
        "key": [r["key"] for r in raws],
        "caption": [r["caption"] for r in raws],
        "label": np.array([r["label"] for r in raws], np.int64),
        "time_ids": np.stack([r["time_ids"] for r in raws]),
    }


class Collate:
    """Raw items of one latent shape -> a batch {latent: float32 tensor [B, C, h, w], key, caption,
    label: int64 array [B], time_ids: int64 array [B, 6]}. ``norm``: z -> normalised z, on tensors.
    In a loader worker the latent is written straight into shared memory (:class:`_Arena`)."""

    field = "mean"  # the raw item's array, whose shape is the batch's

    def __init__(self, sample_posterior: bool, norm, packs: bool = True):
        self.sample_posterior, self.norm = sample_posterior, norm
        self.packs = packs  # batches for packed(): in a worker, latents go to its arena
        self._scratch: dict[tuple, tuple] = {}  # shape -> buffers (see _buffers)

    def __call__(self, raws: list[dict]) -> dict:
        # One new float32 tensor per batch; the float16 items are stacked into a buffer kept per shape
        # (a copy) and converted by torch (8x numpy's float16 -> float32 on this CPU). Fresh large
        # arrays per batch (8 of them at first) made two workers no faster than one on 16 MB
        # batches: the kernel zeroing new pages took this VM's memory bandwidth (BENCHMARKS.md).
        shape = (len(raws), *raws[0]["mean"].shape)  # [B, C, h, w]
        half, std, eps = self._buffers(shape)
        zt = ARENA.alloc(shape) if self.packs and torch.utils.data.get_worker_info() else torch.empty(shape)
        np.stack([r["mean"] for r in raws], out=half)
        zt.copy_(torch.from_numpy(half))
        if self.sample_posterior:
            np.stack([r["std"] for r in raws], out=half)
            std.copy_(torch.from_numpy(half))
            torch.randn(shape, out=eps)  # the numbers randn_like would draw
            zt.addcmul_(std, eps)  # mean + std * eps, in place
        inplace = getattr(self.norm, "apply_", None)
        latent = inplace(zt) if inplace else self.norm(zt)
        return {"latent": latent, **small_fields(raws)}

    def _buffers(self, shape: tuple) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """float16 items stacked, std and noise (float32): [B, C, h, w] each, kept per shape."""
        if shape not in self._scratch:
            if len(self._scratch) >= 8:  # buckets: a few shapes; a last partial batch: one more
                self._scratch.clear()
            self._scratch[shape] = (np.empty(shape, np.float16), torch.empty(shape), torch.empty(shape))
        return self._scratch[shape]

    def __getstate__(self):  # a spawned worker gets no buffers
        return {**self.__dict__, "_scratch": {}}


def _data_key(batch: dict) -> str:
    """A batch's big tensor: ``latent`` (KL latents) or ``tokens`` (VQ, ldm_vae.token_batches)."""
    return "latent" if "latent" in batch else "tokens"


def data(batch: dict) -> torch.Tensor:
    return batch[_data_key(batch)]


def tensors(batch: dict) -> dict:
    """A batch's arrays as tensors (sharing their memory)."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


class Pack(list):
    """Consecutive batches from one loader worker: a list of chunks, each a run of batches of one
    latent shape, their latents one tensor, with ``sizes`` (the batch sizes, in order). ``last``:
    the worker's final pack of the epoch (possibly empty). ``block``: the worker's arena block the
    latents live in (-1: one of their own), ``free``: the worker's flags of blocks let go of."""

    def __init__(self, chunks, worker: int, last: bool, block: int = -1, free: torch.Tensor | None = None):
        super().__init__(chunks)
        self.worker, self.last, self.block, self.free = worker, last, block, free


POOL_BLOCKS = 8  # blocks a worker keeps for reuse: those in flight (the DataLoader's prefetch, the trainer's)


class _Arena:
    """Where a loader worker's batches are collated: shared-memory blocks, filled in order, of up to
    PACK_BATCHES batches and PACK_BYTES (a larger batch gets a block of its own). A block's batches
    travel as one pack: its tensors pickle as the block's file descriptor, with no copy (a plain
    tensor is copied into a new shared-memory file as it is sent: a tenth of a worker's time, with
    the concatenation that made one tensor of a pack). An epoch's first blocks hold 1, 2, 4, ...
    batches: the trainer's first batch does not wait for a whole pack.

    Blocks are reused: a fresh one costs its pages' first writes, 20x the writes themselves
    (14 ms against 0.7 ms per 16 MiB here), a fifth of a worker's time. A block is written again
    only once the trainer's process has let go of every tensor on it, numpy views included: its
    storage's reference count, checked there (:func:`unpacked`), sets the block's flag in ``free``
    (shared memory). Past POOL_BLOCKS in flight, a block is a fresh one, not kept."""

    def __init__(self):
        self.pool: list[torch.UntypedStorage] = []
        self.free: torch.Tensor | None = None  # uint8 [POOL_BLOCKS], shared: 1 = may be written
        self.ids: dict[int, int] = {}  # a pooled block's address -> its index
        self.block: torch.UntypedStorage | None = None
        self.used = self.batches = 0  # bytes and batches of the current block
        self.limit = 1  # batches of the current block at most

    def alloc(self, shape: tuple, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A tensor of ``shape``, uninitialised, in the current block or a new one."""
        size = torch.empty(0, dtype=dtype).element_size()
        nbytes = size * int(np.prod(shape))
        self.used = -(-self.used // size) * size  # aligned for the type
        if self.block is None or self.used + nbytes > self.block.nbytes() or self.batches == self.limit:
            if self.block is not None:
                self.limit = min(2 * self.limit, PACK_BATCHES)
            self.block = self._take(nbytes)
            self.used = self.batches = 0
        out = torch.empty(0, dtype=dtype).set_(self.block, self.used // size, shape)
        self.used += nbytes
        self.batches += 1
        return out

    def _take(self, nbytes: int) -> torch.UntypedStorage:
        if nbytes <= PACK_BYTES:
            if self.free is None:
                self.free = torch.ones(POOL_BLOCKS, dtype=torch.uint8).share_memory_()
            flags = self.free.numpy()
            for i in np.flatnonzero(flags):
                if i == len(self.pool):
                    self.pool.append(torch.UntypedStorage._new_shared(PACK_BYTES))
                    self.ids[self.pool[i].data_ptr()] = int(i)
                flags[i] = 0
                return self.pool[i]
        return torch.UntypedStorage._new_shared(max(PACK_BYTES, nbytes))

    def block_of(self, latent: torch.Tensor) -> int:
        """The pool index of the block ``latent`` lives on; -1 for none."""
        return self.ids.get(latent.untyped_storage().data_ptr(), -1)

    def seal(self, epoch_start: bool = False) -> None:
        """The current block has been sent: the next batch starts a new one."""
        self.block = None
        if epoch_start:
            self.limit = 1


ARENA = _Arena()  # one per process: a loader worker is a process, and only workers use it


def packed(batches):
    """Batches (from :class:`Collate`) as the loader hands them on: tensors, one by one, in the
    trainer's own process (0 workers); in a loader worker, packs, one per arena block (see the
    module's docstring)."""
    info = torch.utils.data.get_worker_info()
    if info is None:
        yield from map(tensors, batches)
        return
    ARENA.seal(epoch_start=True)  # an epoch's batches never share a block with those sent before it
    pack: list[dict] = []
    for batch in batches:
        if pack and data(batch).untyped_storage().data_ptr() != data(pack[0]).untyped_storage().data_ptr():
            yield _pack(pack, info.id, False)
            pack = []
        pack.append(batch)
    ARENA.seal()
    yield _pack(pack, info.id, True)


def _pack(batches: list[dict], worker: int, last: bool) -> Pack:
    runs: list[list[dict]] = []  # batches of one shape, each right after the one before in the block
    for b in batches:
        prev = data(runs[-1][-1]) if runs else None
        if prev is not None and prev.shape[1:] == data(b).shape[1:] and \
                data(b).storage_offset() == prev.storage_offset() + prev.numel():
            runs[-1].append(b)
        else:
            runs.append([b])
    block = ARENA.block_of(data(batches[0])) if batches else -1
    key = _data_key(batches[0]) if batches else "latent"
    return Pack([{key: _joined([data(b) for b in run]),
                  "key": [k for b in run for k in b["key"]], "caption": [c for b in run for c in b["caption"]],
                  "label": np.concatenate([b["label"] for b in run]),
                  "time_ids": np.concatenate([b["time_ids"] for b in run]),
                  "sizes": [len(b["key"]) for b in run]} for run in runs], worker, last, block,
                ARENA.free if block >= 0 else None)


def _joined(latents: list[torch.Tensor]) -> torch.Tensor:
    """Consecutive tensors of one block -> one view over them all: [sum B, C, h, w], no copy."""
    first = latents[0]
    return torch.empty(0, dtype=first.dtype).set_(first.untyped_storage(), first.storage_offset(),
                               (sum(z.shape[0] for z in latents), *first.shape[1:]))


def unpacked(stream, workers: int, held: list | None = None):
    """What a DataLoader over :func:`packed` gives -> batches, as tensors, in the order it would give
    them one by one: a batch from each worker still running in turn, from worker 0 (a seeded
    run trains on the same sequence as before packs). 0 workers: the batches as they come.
    ``held``: the arena blocks this process still holds (kept by the caller across epochs); each is
    handed back to its worker once nothing here refers to it any more."""
    stream = iter(stream)
    held = [] if held is None else held
    queues: dict[int, collections.deque] = {w: collections.deque() for w in range(workers)}
    running = list(range(workers))
    while running:
        for w in list(running):
            while not queues[w] and w in running:
                item = next(stream, None)
                if item is None:  # the epoch is over: what the queues hold is all there is
                    running = [v for v in running if queues[v]]
                    break
                if not isinstance(item, Pack):  # 0 workers: plain batches
                    yield item
                    continue
                queues[item.worker].extend(_batches(item))
                if item.block >= 0 and item:
                    held.append((StorageWeakRef(data(item[0]).untyped_storage()), item.free, item.block))
                if item.last:
                    queues[item.worker].append(None)  # the worker's end, in its place
                item = None  # the pack's own reference: not kept while its batches wait
            if not queues[w]:
                continue
            batch = queues[w].popleft()
            if batch is None:
                running.remove(w)
            else:
                _let_go(held)
                yield batch
    yield from stream  # 0 workers


def _let_go(held: list) -> None:
    """Blocks whose every tensor this process has dropped -> flagged free for their worker."""
    kept = []
    for ref, free, block in held:
        if ref.expired():
            free[block] = 1
        else:
            kept.append((ref, free, block))
    held[:] = kept


def _batches(pack: Pack):
    for chunk in pack:
        lo, key = 0, _data_key(chunk)
        for n in chunk["sizes"]:
            yield {key: chunk[key][lo: lo + n], "key": chunk["key"][lo: lo + n],
                   "caption": chunk["caption"][lo: lo + n], "label": torch.from_numpy(chunk["label"][lo: lo + n]),
                   "time_ids": torch.from_numpy(chunk["time_ids"][lo: lo + n])}
            lo += n
