"""The evaluate stage's work: decode the *stored* validation latents and score them.

What users get is the float16 latent shards, so those are decoded (posterior mean), not a fresh
fp32 encode. The reference is the prepared validation image with the same key; the baseline is
the same image area-downsampled 8x and bicubic-upsampled (:func:`metrics.resize_baseline`).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from tqdm import tqdm

from .config import EvaluateConfig
from .data import image_bytes
from .images import decode_uint8
from .latents import npy_load
from .metrics import psnr, resize_baseline, ssim
from .shards import iter_samples, shard_paths
from .viz import save_grid

ERROR_GAIN = 4  # |error| is shown 4x brighter in the grid so small errors are visible


@torch.inference_mode()
def run_evaluate(vae: AutoencoderKL, latents_val: Path, prepared_val: Path, out: Path, cfg: EvaluateConfig,
                 stats: dict) -> dict:
    device = next(vae.parameters()).device
    # Reference images by key (uint8). Validation splits are small; a very large one would want an
    # index of (shard, offset) instead.
    refs = {s["__key__"]: decode_uint8(image_bytes(s)) for s in iter_samples(shard_paths(prepared_val))}
    rows: list[dict] = []
    grid: list[tuple[torch.Tensor, torch.Tensor]] = []
    seen: set[str] = set()
    batch: list[dict] = []

    def flush():
        keys = [s["__key__"] for s in batch]
        z = torch.stack([torch.from_numpy(npy_load(s["mean.npy"]).astype(np.float32)) for s in batch])
        rec = vae.decode(z.to(device)).sample.float().clamp(-1, 1).cpu()  # [B, 3, H, W]
        rec = (rec + 1) / 2
        ref = torch.stack([torch.from_numpy(refs[k]).permute(2, 0, 1) for k in keys]).float() / 255
        base = resize_baseline(ref)
        for k, p, s_, pb, sb in zip(keys, psnr(rec, ref), ssim(rec, ref), psnr(base, ref), ssim(base, ref)):
            rows.append({"key": k, "psnr": float(p), "ssim": float(s_), "psnr_bicubic": float(pb),
                         "ssim_bicubic": float(sb)})
        if len(grid) < cfg.grid_images:
            grid.extend(zip(ref, rec))
        batch.clear()

    for sample in tqdm(iter_samples(shard_paths(latents_val)), total=len(refs), desc="evaluate",
                       unit="img", dynamic_ncols=True):
        key = sample["__key__"]
        if key in seen:
            raise RuntimeError(f"validation latent {key!r} appears twice in {latents_val}")
        if key not in refs:
            raise RuntimeError(f"validation latent {key!r} has no prepared image in {prepared_val}")
        seen.add(key)
        batch.append(sample)
        if len(batch) == cfg.batch_size:
            flush()
    if batch:
        flush()
    missing = sorted(set(refs) - seen)
    if missing:
        raise RuntimeError(f"{len(missing)} validation images have no latent, e.g. {missing[:3]}")

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "per_image.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    originals = torch.stack([g[0] for g in grid[: cfg.grid_images]])
    recs = torch.stack([g[1] for g in grid[: cfg.grid_images]])
    error = ((recs - originals).abs() * ERROR_GAIN).clamp(0, 1)
    save_grid([originals, recs, error], out / "recon_grid.png", unit=True)

    metrics = {name: float(np.mean([r[name] for r in rows]))
               for name in ("psnr", "ssim", "psnr_bicubic", "ssim_bicubic")}
    h, w = originals.shape[-2:]
    c = stats["channels"]
    metrics.update({
        "num_images": len(rows),
        "latent_channels": c,
        "compression_ratio": (3 * h * w) / (c * (h // 8) * (w // 8)),  # input numbers per latent number
        "latent_mean": stats["mean"],
        "latent_std": stats["std"],
        "scaling_factor": stats["scaling_factor"],
        "shift_factor": stats["shift_factor"],
    })
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
