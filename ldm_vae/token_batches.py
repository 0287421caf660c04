"""VQ token shards for a token-model trainer (MaskGIT, LlamaGen, VAR): :func:`token_loader`.

The same loader as :func:`ldm_vae.loader.latent_loader` (its epochs, DDP and worker guarantees,
buckets, resampling, workers' packs), with token items: per sample the ``tokens.npy`` member (or,
with ``flip``, ``tokens_flip.npy`` half the time), per batch ``tokens`` long [B, h, w] and the
key, caption, label and size conditioning. A trainer without this package reads the same shards
with any tar reader: ``tokens.npy`` is a plain .npy of unsigned integers (docs/design.md).
"""

from __future__ import annotations

import random

import numpy as np
import torch

from .epochs import expand_shards, shard_shapes
from .latent_batches import ARENA, conditioning, small_fields
from .loader import LatentLoader, LoaderOptions, batch_loader
from .samples import npy_load


class ToTokens:
    """A stored sample -> {tokens: unsigned ints [h, w], key, caption, label, time_ids}."""

    def __init__(self, flip: bool):
        self.flip = flip

    def __call__(self, sample: dict) -> dict:
        suffix = "_flip" if self.flip and "tokens_flip.npy" in sample and random.random() < 0.5 else ""
        try:
            tokens = npy_load(sample[f"tokens{suffix}.npy"])
        except KeyError:
            what = (
                "it holds KL latents (mean.npy): read them with latent_loader"
                if "mean.npy" in sample
                else "a VQ latent shard holds tokens.npy (encode's output with model.regularizer: vq)"
            )
            raise KeyError(
                f"latent sample {sample.get('__key__')!r} has no member 'tokens{suffix}.npy': {what}"
            ) from None
        return {"tokens": tokens, **conditioning(sample, tokens.shape)}


class CollateTokens:
    """Token items of one shape -> {tokens: long [B, h, w], key, caption, label, time_ids}; in a
    loader worker written straight into its shared-memory arena (ldm_vae.latent_batches)."""

    field = "tokens"

    def __call__(self, raws: list[dict]) -> dict:
        shape = (len(raws), *raws[0]["tokens"].shape)  # [B, h, w]
        worker = torch.utils.data.get_worker_info() is not None
        out = ARENA.alloc(shape, torch.int64) if worker else torch.empty(shape, dtype=torch.int64)
        out.copy_(torch.from_numpy(np.stack([r["tokens"] for r in raws]).astype(np.int64)))
        return {"tokens": out, **small_fields(raws)}


def token_loader(shards, batch_size: int, num_workers: int = 2, drop_last: bool = False, *, flip: bool = True,
                 shuffle: int = 1000, resampled: bool = False, seed: int = 0, stats=None,
                 counts: dict[str, int] | None = None, bucket_batch: str = "samples") -> LatentLoader:
    """A DataLoader of token batches over VQ latent shards; the arguments mean what they mean for
    :func:`ldm_vae.loader.latent_loader` (:class:`~ldm_vae.loader.LoaderOptions`; ``stats``: the
    encode stage's stats.json, for the per-shard counts that keep DDP ranks equal, and for
    buckets the shapes)."""
    opts = LoaderOptions(flip=flip, normalize="none", stats=stats, shuffle=shuffle, resampled=resampled, seed=seed,
                         counts=counts)
    urls = expand_shards(shards)
    return batch_loader(urls, shard_shapes(urls, stats), (ToTokens(flip), CollateTokens()), batch_size, num_workers,
                        drop_last, bucket_batch, opts)


@torch.no_grad()
def decode_tokens(vq, tokens: torch.Tensor) -> torch.Tensor:
    """Tokens [B, h, w] (long) -> images [B, 3, 8h, 8w] in [0, 1], through the exported VQModel."""
    from .vq import token_codes

    param = next(vq.parameters())
    codes = token_codes(vq, tokens.to(param.device))  # [B, D, h, w]
    images = vq.decode(codes.to(param.dtype), force_not_quantize=True).sample
    return ((images.float().clamp(-1, 1) + 1) / 2).cpu()
