"""Streaming latent shards into a diffusion trainer.

    from ldm_vae.loader import latent_loader
    loader = latent_loader("data/latents/train/*.tar", stats="data/latents/stats.json",
                           batch_size=64, num_workers=4)
    for batch in loader:
        z = batch["latent"]          # [B, C, h, w], normalised to ~N(0, 1)
        captions, labels = batch["caption"], batch["label"]

Shards are split across nodes (torch.distributed ranks, or the RANK / WORLD_SIZE environment)
and dataloader workers; a worker or node left without a shard simply yields nothing (no error),
so an epoch is every sample exactly once whatever the counts. ``resampled=True`` instead draws
shards at random forever (each rank and worker with its own seed): for step-based training. Each sample is
drawn from the stored posterior (mean + std * eps) or taken at its mean, and normalised with the
per-channel statistics of stats.json, the VAE config's scaling/shift factors, or not at all.
"""

from __future__ import annotations

import glob
import json
import random
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from .latents import npy_load
from .shards import tar_samples

NORMALIZE = ("channel", "vae", "none")


def _expand(shards) -> list[str]:
    if isinstance(shards, (str, Path)):
        shards = [shards]
    out: list[str] = []
    for s in map(str, shards):
        if "://" in s:
            out.append(s)  # a URL (webdataset streams http(s), s3 via pipe: etc.)
        else:
            out.extend(sorted(glob.glob(s)) if any(ch in s for ch in "*?[") else [s])
    if not out:
        raise FileNotFoundError(f"no latent shards match {shards}")
    return out


def _normalizer(normalize: str, stats, vae_config, inverse: bool = False):
    """z -> normalised z (or, with ``inverse``, back to the raw latent the VAE decodes)."""
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize={normalize!r}: allowed: {', '.join(NORMALIZE)}")
    if normalize == "none":
        return lambda z: z
    if normalize == "channel":
        if stats is None:
            raise ValueError("normalize='channel' needs stats= (stats.json path or dict)")
        st = json.loads(Path(stats).read_text()) if isinstance(stats, (str, Path)) else stats
        mean = torch.tensor(st["channel_mean"], dtype=torch.float32)[:, None, None]  # [C, 1, 1]
        std = torch.tensor(st["channel_std"], dtype=torch.float32)[:, None, None]
        if inverse:
            return lambda z: z * std.to(z.device) + mean.to(z.device)
        return lambda z: (z - mean) / std
    if vae_config is None:
        raise ValueError("normalize='vae' needs vae_config= (the VAE's config dict or folder)")
    cfg = vae_config
    if isinstance(cfg, (str, Path)):
        cfg = json.loads((Path(cfg) / "config.json").read_text())
    shift, scale = cfg.get("shift_factor") or 0.0, cfg["scaling_factor"]
    if inverse:
        return lambda z: z / scale + shift
    return lambda z: (z - shift) * scale


def latent_dataset(shards, *, sample_posterior: bool = True, flip: bool = True, normalize: str = "channel",
                   stats=None, vae_config=None, shuffle: int = 1000, resampled: bool = False,
                   seed: int = 0) -> wds.DataPipeline:
    """A webdataset pipeline of dicts {latent [C, h, w] float32, key, caption, label}."""
    urls = _expand(shards)
    norm = _normalizer(normalize, stats, vae_config)

    def to_item(sample: dict) -> dict:
        suffix = ""
        if flip and "mean_flip.npy" in sample and random.random() < 0.5:
            suffix = "_flip"
        mean = torch.from_numpy(npy_load(sample[f"mean{suffix}.npy"]).astype(np.float32))
        z = mean
        if sample_posterior:
            std = torch.from_numpy(npy_load(sample[f"std{suffix}.npy"]).astype(np.float32))
            z = torch.addcmul(mean, std, torch.randn_like(std))  # mean + std * eps, one pass
        return {
            "latent": norm(z),
            "key": sample["__key__"],
            "caption": sample["txt"].decode() if "txt" in sample else "",
            "label": int(sample["cls"]) if "cls" in sample else -1,
        }

    stages = [wds.ResampledShards(urls, seed=seed, deterministic=True)] if resampled else [
        wds.SimpleShardList(urls),
        wds.split_by_node,
        wds.split_by_worker,
    ]
    stages.append(tar_samples)
    if shuffle:
        stages.append(wds.shuffle(shuffle, seed=seed))
    stages.append(wds.map(to_item))
    return wds.DataPipeline(*stages)


def latent_loader(shards, batch_size: int, num_workers: int = 2, **kwargs) -> torch.utils.data.DataLoader:
    """A DataLoader over :func:`latent_dataset` (default collation: tensors stacked, strings listed)."""
    return torch.utils.data.DataLoader(
        latent_dataset(shards, **kwargs), batch_size=batch_size, num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


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
