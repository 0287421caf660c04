"""The encode stage's work: prepared images -> latent shards (posterior mean/std) + stats.json.

Latent sample (DESIGN.md contract): ``__key__`` as in the prepared shard; ``mean.npy`` and
``std.npy`` float16 [C, H/8, W/8], raw (unscaled); ``json`` metadata; ``txt`` / ``cls`` when the
source has them. Output shards are named ``<split>-r<rank>-<n>.tar`` so that parallel encoders
(one per rank) never write the same file.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from tqdm import tqdm

from .config import EncodeConfig
from .data import image_bytes, to_tensor
from .images import decode_uint8
from .model import LatentMoments
from .shards import ShardWriter, iter_samples, shard_paths

SPLITS = ("train", "val")


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _batches(samples, batch_size: int):
    batch = []
    for s in samples:
        batch.append(s)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.inference_mode()
def encode_split(vae: AutoencoderKL, in_paths: list[str], out_dir: Path, split: str, cfg: EncodeConfig,
                 rank: int = 0, total: int | None = None) -> tuple[list[str], LatentMoments, list[int], int]:
    """Encode every sample of ``in_paths`` once; return (shard names, moments, latent shape, count)."""
    device = next(vae.parameters()).device
    moments = LatentMoments(vae.config.latent_channels)
    shape: list[int] = []
    bar = tqdm(total=total, desc=f"encode {split}", unit="img", dynamic_ncols=True)
    with ShardWriter(out_dir, f"{split}-r{rank:03d}", cfg.samples_per_shard) as writer:
        for batch in _batches(iter_samples(in_paths), cfg.batch_size):
            x = torch.stack([to_tensor(decode_uint8(image_bytes(s))) for s in batch]).to(device)
            post = vae.encode(x).latent_dist  # mean, std: [B, C, H/8, W/8]
            mean16 = post.mean.to(torch.float16).cpu()
            std16 = post.std.to(torch.float16).cpu()
            # Statistics of what is stored (float16), i.e. of what a loader will read.
            moments.update(mean16.float(), std16.float())
            shape = list(mean16.shape[1:])
            for s, m, sd in zip(batch, mean16.numpy(), std16.numpy()):
                meta = json.loads(s["json"]) if "json" in s else {"key": s["__key__"]}
                meta["latent_shape"] = shape
                out = {"__key__": s["__key__"], "mean.npy": npy_bytes(m), "std.npy": npy_bytes(sd),
                       "json": json.dumps(meta, sort_keys=True).encode()}
                for ext in ("txt", "cls"):
                    if ext in s:
                        out[ext] = s[ext]
                writer.write(out)
            bar.update(len(batch))
    bar.close()
    return writer.written, moments, shape, writer.total


def run_encode(vae: AutoencoderKL, prepared: Path, out: Path, cfg: EncodeConfig) -> dict:
    counts = _prepared_counts(prepared)
    stats: dict = {"channels": vae.config.latent_channels, "splits": {}}
    for split in SPLITS:
        names, moments, shape, count = encode_split(vae, shard_paths(prepared / split), out / split, split, cfg,
                                             total=counts.get(split, {}).get("samples"))
        stats["latent_shape"] = shape or stats.get("latent_shape")
        stats["splits"][split] = {"count": count, "shards": [f"{split}/{n}" for n in names]}
        if split == "train":
            summary = moments.summary()
            stats.update({k: summary[k] for k in ("channel_mean", "channel_std", "mean", "std",
                                                   "shift_factor", "scaling_factor")})
    stats["vae_scaling_factor"] = vae.config.scaling_factor
    stats["vae_shift_factor"] = vae.config.shift_factor
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def _prepared_counts(prepared: Path) -> dict:
    path = prepared / "counts.json"
    return json.loads(path.read_text()) if path.exists() else {}
