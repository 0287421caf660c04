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
most PACK_BYTES), the small fields as arrays inside the pickle; :func:`unpack`, in the trainer's
process, cuts a pack back into the same batches, in the same order (views of the one tensor).
"""

from __future__ import annotations

import collections
import random

import numpy as np
import torch

from .samples import LATENT

SIZE_FIELDS = ("original_size", "crop_top_left", "target_size")
PACK_BATCHES = 16
PACK_BYTES = 16 << 20  # latents per pack: 16 MiB; a batch larger than that travels alone


class ToRaw:
    """A stored sample -> {mean, std (None without posterior sampling): float16 [C, h, w], key,
    caption, label, time_ids: int64 [6]} (picklable: dataloader workers started by spawn)."""

    def __init__(self, sample_posterior: bool, flip: bool):
        self.sample_posterior, self.flip = sample_posterior, flip

    def __call__(self, sample: dict) -> dict:
        suffix = ""
        if self.flip and "mean_flip.npy" in sample and random.random() < 0.5:
            suffix = "_flip"
        mean = LATENT.get(sample, f"mean{suffix}")
        label = LATENT.get(sample, "label", -1)
        if not isinstance(label, int):
            raise ValueError(f"latent sample {sample['__key__']!r}: label {label!r} is text; the loader returns "
                             "class indices, so the source's label column must hold integers")
        return {"mean": mean, "std": LATENT.get(sample, f"std{suffix}") if self.sample_posterior else None,
                "key": sample["__key__"], "caption": LATENT.get(sample, "caption", ""), "label": label,
                "time_ids": size_ids(LATENT.get(sample, "meta") if "json" in sample else {}, mean.shape)}


def size_ids(meta: dict, latent_shape) -> np.ndarray:
    """SDXL's size conditioning, int64 [6] (see :func:`ldm_vae.loader.time_ids`)."""
    if all(f in meta for f in SIZE_FIELDS):
        return np.array(meta["original_size"] + meta["crop_top_left"] + meta["target_size"], np.int64)
    h, w = 8 * latent_shape[-2], 8 * latent_shape[-1]
    return np.array([h, w, 0, 0, h, w], np.int64)


class Collate:
    """Raw items of one latent shape -> a batch of arrays {latent float32 [B, C, h, w], key,
    caption, label int64 [B], time_ids int64 [B, 6]}. ``norm``: z -> normalised z, on tensors."""

    def __init__(self, sample_posterior: bool, norm):
        self.sample_posterior, self.norm = sample_posterior, norm
        self._scratch: dict[tuple, tuple[np.ndarray, torch.Tensor]] = {}  # shape -> (std, noise) buffers

    def __call__(self, raws: list[dict]) -> dict:
        # One new float32 array per batch, filled from the float16 items as it is converted; the
        # std and the noise go to buffers kept per shape. Fresh large arrays per batch (8 of them
        # at first) made two workers no faster than one on 16 MB batches: the kernel zeroing new
        # pages took this VM's memory bandwidth (bench/loader.py, BENCHMARKS.md).
        shape = (len(raws), *raws[0]["mean"].shape)  # [B, C, h, w]
        z = np.empty(shape, np.float32)
        for i, r in enumerate(raws):
            z[i] = r["mean"]
        zt = torch.from_numpy(z)
        if self.sample_posterior:
            std, eps = self._buffers(shape)
            for i, r in enumerate(raws):
                std[i] = r["std"]
            torch.randn(shape, out=eps)  # the numbers randn_like would draw
            zt.addcmul_(torch.from_numpy(std), eps)  # mean + std * eps, in place
        inplace = getattr(self.norm, "apply_", None)
        latent = inplace(zt) if inplace else self.norm(zt)
        return {"latent": latent.numpy(), "key": [r["key"] for r in raws],
                "caption": [r["caption"] for r in raws], "label": np.array([r["label"] for r in raws], np.int64),
                "time_ids": np.stack([r["time_ids"] for r in raws])}


    def _buffers(self, shape: tuple) -> tuple[np.ndarray, torch.Tensor]:
        if shape not in self._scratch:
            if len(self._scratch) >= 8:  # buckets: a few shapes; a last partial batch: one more
                self._scratch.clear()
            self._scratch[shape] = (np.empty(shape, np.float32), torch.empty(shape))
        return self._scratch[shape]

    def __getstate__(self):  # a spawned worker gets no buffers
        return {**self.__dict__, "_scratch": {}}


def tensors(batch: dict) -> dict:
    """A batch's arrays as tensors (sharing their memory)."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


class Pack(list):
    """Consecutive batches from one loader worker: a list of chunks, each a run of batches of one
    latent shape, concatenated, with ``sizes`` (the batch sizes, in order). ``last``: the worker's
    final pack of the epoch (possibly empty)."""

    def __init__(self, chunks, worker: int, last: bool):
        super().__init__(chunks)
        self.worker, self.last = worker, last


def packed(batches):
    """Batches (from :class:`Collate`) as the loader hands them on: tensors, one by one, in the
    trainer's own process (0 workers); in a loader worker, packs (see the module's docstring)."""
    info = torch.utils.data.get_worker_info()
    if info is None:
        yield from map(tensors, batches)
        return
    pack: list[dict] = []
    nbytes = 0
    for batch in batches:
        if pack and (nbytes + batch["latent"].nbytes > PACK_BYTES or len(pack) == PACK_BATCHES):
            yield _pack(pack, info.id, False)
            pack, nbytes = [], 0
        pack.append(batch)
        nbytes += batch["latent"].nbytes
    yield _pack(pack, info.id, True)


def _pack(batches: list[dict], worker: int, last: bool) -> Pack:
    runs: list[list[dict]] = []
    for b in batches:
        if runs and runs[-1][0]["latent"].shape[1:] == b["latent"].shape[1:]:
            runs[-1].append(b)
        else:
            runs.append([b])
    return Pack([{"latent": torch.from_numpy(run[0]["latent"] if len(run) == 1 else  # one shared-memory file
                                             np.concatenate([b["latent"] for b in run])),
                  "key": [k for b in run for k in b["key"]], "caption": [c for b in run for c in b["caption"]],
                  "label": np.concatenate([b["label"] for b in run]),
                  "time_ids": np.concatenate([b["time_ids"] for b in run]),
                  "sizes": [len(b["key"]) for b in run]} for run in runs], worker, last)


def unpacked(stream, workers: int):
    """What a DataLoader over :func:`packed` gives -> batches, as tensors, in the order it would give
    them one by one: a batch from each worker still running in turn, from worker 0 (a seeded
    run trains on the same sequence as before packs). 0 workers: the batches as they come."""
    stream = iter(stream)
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
                if item.last:
                    queues[item.worker].append(None)  # the worker's end, in its place
            if not queues[w]:
                continue
            batch = queues[w].popleft()
            if batch is None:
                running.remove(w)
            else:
                yield batch
    yield from stream  # 0 workers


def _batches(pack: Pack):
    for chunk in pack:
        lo = 0
        for n in chunk["sizes"]:
            yield {"latent": chunk["latent"][lo: lo + n], "key": chunk["key"][lo: lo + n],
                   "caption": chunk["caption"][lo: lo + n], "label": torch.from_numpy(chunk["label"][lo: lo + n]),
                   "time_ids": torch.from_numpy(chunk["time_ids"][lo: lo + n])}
            lo += n
