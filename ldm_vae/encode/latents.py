"""The encode stage's work: prepared images -> latent shards (posterior mean/std) + stats.json.

Latent sample (docs/design.md, ldm_vae/samples.py): ``__key__`` as in the prepared shard; ``mean.npy`` and
``std.npy`` float16 [C, H/8, W/8], raw (unscaled); ``json`` metadata; ``txt`` / ``cls`` when the
source has them. Output shards are named ``<split>-r<rank>-s<input>-<n>.tar`` so that parallel
encoders (one per rank) never write the same file. Within a process, batches go through threads:
on a CPU each thread decodes and encodes whole batches on one core; on a GPU threads decode while
the device encodes.
"""

from __future__ import annotations

import collections
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from ..config import EncodeConfig
from ..data import to_tensor
from ..images import decode_uint8
from ..model import LatentMoments, is_vq
from ..precision import set_tf32
from ..runner import cpu_share
from ..samples import LATENT, PREPARED, batched, image_bytes
from ..shards import ShardWriter, iter_samples
from ..vq import token_dtype

SPLITS = ("train", "val")


def latent_sample(prepared: dict, stored: dict[str, dict[str, np.ndarray]], shape: list[int]) -> dict:
    """The latent sample of a prepared one: ``stored`` {"": {field: array}[, "_flip": ...]}, the
    fields of :data:`LATENT` (KL: mean and std, float16 [C, H/8, W/8]; VQ: tokens [H/8, W/8] and
    optionally prequant); the json, caption and label carried over."""
    meta = {**PREPARED.get(prepared, "meta"), "latent_shape": shape}
    arrays = {f"{name}{suffix}": a for suffix, fields in stored.items() for name, a in fields.items()}
    return LATENT.build(prepared["__key__"], meta=meta, caption=PREPARED.get(prepared, "caption"),
                        label=PREPARED.get(prepared, "label"), **arrays)


def _pixels(batch: list[dict], pin: bool = False) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] (channels_last in memory) of a batch of prepared samples;
    ``pin``: in page-locked memory, for an asynchronous copy to the GPU."""
    arrays = [decode_uint8(image_bytes(s)) for s in batch]  # [H, W, 3] uint8 each
    odd = next((i for i, a in enumerate(arrays) if a.shape != arrays[0].shape), None)
    if odd is not None:  # batches come from one shard, and prepare writes one shape (bucket) a shard
        raise ValueError(f"prepared samples {batch[0]['__key__']!r} and {batch[odd]['__key__']!r} of one shard differ "
                         f"in shape ({arrays[0].shape[1]}x{arrays[0].shape[0]}, {arrays[odd].shape[1]}x"
                         f"{arrays[odd].shape[0]}): a prepared shard must hold one image shape; re-run prepare")
    x = to_tensor(np.stack(arrays))
    return x.pin_memory() if pin else x


def ordered_map(fn, items, workers: int, depth: int = 0):
    """``fn`` over ``items`` in ``workers`` threads; results in input order, at most ``depth``
    (default 2 x workers) items in flight. An exception in ``fn`` is raised here, at its item;
    leaving early cancels what has not started. Decoding (PIL) and torch ops release the GIL, so
    threads run them in parallel."""
    depth = depth or 2 * workers
    pool = ThreadPoolExecutor(workers, thread_name_prefix="encode")
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def vae_fingerprint(vae: AutoencoderKL) -> str:
    """A hash of the VAE's config and weights: latents written by another VAE are never reused."""
    h = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, t in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(cfg: EncodeConfig, vae_config: dict) -> torch.dtype:
    """``encode.dtype``, except float32 for a VAE whose config says ``force_upcast`` (SDXL's
    overflows in float16: diffusers' own pipelines upcast it the same way)."""
    return torch.float32 if vae_config.get("force_upcast") else DTYPES[cfg.dtype]


def check_finite(batch: list[dict], stored: dict[str, dict[str, torch.Tensor]], dtype: str) -> None:
    """Every stored latent is finite: else ValueError naming the sample, the dtype and the fix."""
    for suffix, fields in stored.items():  # float16 [B, C, h, w] each, as stored (tokens: integers)
        floats = [t for t in fields.values() if t.is_floating_point()]
        if not floats:
            continue
        bad = ~torch.stack([torch.isfinite(t).flatten(1).all(1) for t in floats]).all(0)  # [B]
        if bad.any():
            i = int(bad.nonzero()[0])
            view = " (its flipped view)" if suffix else ""
            raise ValueError(
                f"sample {batch[i]['__key__']!r}{view}: the latent is not finite after encoding in {dtype} and "
                f"storing as float16 ({int(bad.sum())} of {len(batch)} in its batch). The VAE's activations "
                "overflow: use encode.dtype: fp32 (or bf16 on a GPU) and check the VAE's weights; a latent "
                "beyond float16's range (65504) cannot be stored")


def encode_shard(vae: AutoencoderKL, in_path: str, out_dir: Path, split: str, index: int, cfg: EncodeConfig,
                 rank: int, fingerprint: str, progress=None) -> dict:
    """Encode one prepared shard into ``<split>-r<rank>-s<index>-<n>.tar``; return its done-record
    (output shards, count, exact moments), which :mod:`ldm_vae.encode.encoding` writes once they are complete.
    """
    device = next(vae.parameters()).device
    set_tf32(False)  # encode.dtype: fp32 means float32, not TF32 (ldm_vae/precision.py)
    dtype = compute_dtype(cfg, dict(vae.config))
    vq = is_vq(vae)
    moments = LatentMoments(vae.config.vq_embed_dim if vq else vae.config.latent_channels)
    histogram = torch.zeros(vae.config.num_vq_embeddings if vq else 0, dtype=torch.float64)
    tokens_as = token_dtype(vae.config.num_vq_embeddings) if vq else None  # the stored integer type
    shape: list[int] = []
    n_batches = 0
    labels: collections.Counter = collections.Counter()  # samples per label (its per-class counts in stats.json)

    def encode(x: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """{"": {field: tensor}[, "_flip": ...]} on the CPU: KL {mean, std} float16 [B, C, H/8, W/8];
        VQ {tokens [B, H/8, W/8] long, prequant (encode.prequant), and the
        codes, float32 [B, D, H/8, W/8], for the statistics only}."""
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)  # [B, 3, H, W]
        views = {"": x, "_flip": x.flip(-1)} if cfg.flip else {"": x}
        stored = {}
        with torch.inference_mode():  # thread-local: entered in whichever thread runs this
            for suffix, v in views.items():
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    stored[suffix] = _vq_fields(vae, v, cfg.prequant and not suffix) if vq else _kl_fields(vae, v)
        return stored

    batches = batched(iter_samples([in_path]), cfg.batch_size)
    threads = torch.get_num_threads()
    # On a CPU, never more encoders than torch's thread budget (OMP_NUM_THREADS, a launcher's share).
    workers = cpu_share() if device.type == "cuda" else min(cpu_share(), threads)
    if device.type == "cuda":
        # Threads decode the next batches while the GPU encodes this one (decoding is what
        # starves a GPU: one core decodes far fewer 256 px JPEGs per second than it encodes).
        pipeline = ordered_map(lambda b: (b, _pixels(b, pin=True)), batches, workers)
        results = ((b, encode(x)) for b, x in pipeline)
    else:
        # A CPU: each thread decodes and encodes whole batches on one core. Small convolutions
        # scale poorly over intra-op threads (measured on 2 cores: 2 threads x 1 core 1.3x faster
        # than 1 thread x 2 cores).
        pipeline = results = ordered_map(lambda b: (b, encode(_pixels(b))), batches, workers)
        if workers > 1:
            torch.set_num_threads(1)
    try:
        with ShardWriter(out_dir, f"{split}-r{rank:03d}-s{index:05d}", cfg.samples_per_shard) as writer:
            for batch, stored in results:
                if vq:  # the codes' statistics (what a VQ diffusion model's input is), the train histogram
                    codes = stored[""].pop("codes")
                    for fields in stored.values():
                        fields.pop("codes", None)
                    moments.update(codes, torch.zeros_like(codes))
                    histogram += torch.bincount(stored[""]["tokens"].long().flatten(), minlength=len(histogram))
                    shape = list(codes.shape[1:])
                else:
                    mean16, std16 = stored[""]["mean"], stored[""]["std"]
                    # Statistics of what is stored (float16), i.e. of what a loader will read.
                    moments.update(mean16.float(), std16.float())
                    shape = list(mean16.shape[1:])
                check_finite(batch, stored, cfg.dtype if dtype != torch.float32 else "fp32")
                for i, s in enumerate(batch):
                    if "cls" in s:
                        labels[PREPARED.get(s, "label")] += 1
                    fields = {k: {n: t[i].numpy().astype(tokens_as) if n == "tokens" else t[i].numpy()
                                  for n, t in f.items()} for k, f in stored.items()}
                    writer.write(latent_sample(s, fields, shape))
                n_batches += 1
                if progress is not None:
                    progress(len(batch))
    finally:
        pipeline.close()  # its threads are done before the thread count is restored
        torch.set_num_threads(threads)
    return {"input": Path(in_path).name, "vae": fingerprint, "flip": cfg.flip, "outputs": writer.written,
            "count": writer.total, "shape": shape, "moments": moments.state(), "batches": n_batches,
            "batch_size": cfg.batch_size, "labels": [[k, n] for k, n in labels.items() if n],
            **({"histogram": [int(c) for c in histogram]} if vq else {})}


def _kl_fields(vae, x: torch.Tensor) -> dict[str, torch.Tensor]:
    post = vae.encode(x).latent_dist
    return {"mean": post.mean.to(torch.float16).cpu(), "std": post.std.to(torch.float16).cpu()}


def _vq_fields(vae, x: torch.Tensor, prequant: bool) -> dict[str, torch.Tensor]:
    """A VQModel's tokens (the nearest codes, as its own decode would choose them) and codes."""
    h = vae.encode(x).latents.float()  # [B, D, h, w], after quant_conv
    with torch.autocast(h.device.type, enabled=False):  # the lookup in float32, as training's (vq.py)
        codes, _, (_, _, idx) = vae.quantize(h)  # codes [B, D, h, w]; idx [B h w]
    b, _, hh, ww = h.shape
    fields = {"tokens": idx.view(b, hh, ww).cpu(), "codes": codes.float().cpu()}  # tokens: long until stored
    if prequant:
        fields["prequant"] = h.to(torch.float16).cpu()
    return fields
