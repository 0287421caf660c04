"""The evaluate stage's work: decode the *stored* validation latents and score them.

What users get is the float16 latent shards, so those are decoded (posterior mean), not a fresh
fp32 encode (that one is scored too, to show what float16 storage costs). The reference is the
prepared validation image with the same key; the baseline is
the same image area-downsampled 8x and bicubic-upsampled (:func:`metrics.resize_baseline`).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from diffusers import AutoencoderKL
from tqdm import tqdm

from ..config import EvaluateConfig, reference_name
from ..files import atomic_write
from ..images import decode_uint8
from ..inputs import loading_kwargs, pretrained_location
from ..metrics import psnr, resize_baseline, ssim, to_unit
from ..model import is_vq
from ..precision import set_tf32
from ..samples import LATENT, batched, image_bytes
from ..shards import iter_samples, shard_paths
from ..viz import save_grid, save_scatter
from ..vq import token_codes
from .health import ChannelStats, CodebookStats, health_metrics, write_health
from .perceptual import Lpips, RFid
from .spectrum import Spectra

ERROR_GAIN = 4  # |error| is shown 4x brighter in the grid so small errors are visible


@torch.inference_mode()
def run_evaluate(vae: AutoencoderKL, latents_val: Path, prepared_val: Path, out: Path, cfg: EvaluateConfig,
                 stats: dict, references: dict[str, AutoencoderKL] | None = None) -> dict:
    """Score every validation latent; write metrics.json, per_image.csv, grids and latent health.
    ``references``: name -> another VAE, scored on the same images (columns ``psnr_<name>`` ...)."""
    set_tf32(False)  # psnr_fp32 and the references: float32, not TF32 (ldm_vae/precision.py)
    # Reference images by key (uint8). Validation splits are small; a very large one would want an
    # index of (shard, offset) instead.
    refs = {s["__key__"]: decode_uint8(image_bytes(s)) for s in iter_samples(shard_paths(prepared_val))}
    scorer = _Scorer(vae, cfg, stats, references)
    kept = _Kept(cfg.grid_images)
    for batch in _batches(latents_val, prepared_val, refs, cfg.batch_size):
        keys = [s["__key__"] for s in batch]
        ref = torch.stack([torch.from_numpy(refs[k]).permute(2, 0, 1) for k in keys]).float() / 255  # [B, 3, H, W]
        rec, scores = scorer(batch, ref)
        kept.add(keys, [LATENT.get(s, "meta").get("raw_key", k) for s, k in zip(batch, keys)], ref, rec, scores,
                 scorer.last_references)
    return _write(out, kept, scorer, stats)


def _batches(latents_val: Path, prepared_val: Path, refs: dict, batch_size: int) -> Iterator[list[dict]]:
    """The validation latent samples in batches of one image shape; each key exactly once, each
    with its image."""
    return batched(_checked(latents_val, prepared_val, refs), batch_size, key=lambda s: refs[s["__key__"]].shape)


def _checked(latents_val: Path, prepared_val: Path, refs: dict) -> Iterator[dict]:
    """The validation latent samples, each key once and with a prepared image, then none missing."""
    seen: set[str] = set()
    for sample in tqdm(iter_samples(shard_paths(latents_val)), total=len(refs), desc="evaluate",
                       unit="img", dynamic_ncols=True):
        key = sample["__key__"]
        if key in seen:
            raise RuntimeError(f"validation latent {key!r} appears twice in {latents_val}")
        if key not in refs:
            raise RuntimeError(f"validation latent {key!r} has no prepared image in {prepared_val}")
        seen.add(key)
        yield sample
    missing = sorted(set(refs) - seen)
    if missing:
        raise RuntimeError(f"{len(missing)} validation images have no latent, e.g. {missing[:3]}")


class _Scorer:
    """One batch's reconstruction from its stored latents and its per-image scores; accumulates
    the latent health and the rFID statistics over batches."""

    def __init__(self, vae: AutoencoderKL, cfg: EvaluateConfig, stats: dict,
                 references: dict[str, AutoencoderKL] | None = None):
        self.vae, self.device = vae, next(vae.parameters()).device
        self.lpips = Lpips(self.device) if cfg.lpips else None
        self.rfid = RFid() if cfg.rfid else None
        self.vq = is_vq(vae)
        self.health = CodebookStats(vae.config.num_vq_embeddings) if self.vq else ChannelStats()
        self.spectra = Spectra(stats["channel_mean"], stats["channel_std"])
        self.references = references or {}  # name -> another VAE, scored on the same images
        self.rfid_references = {name: RFid() for name in self.references} if cfg.rfid else {}

    def __call__(self, batch: list[dict], ref: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(reconstructions [B, 3, H, W] in [0, 1], name -> per-image scores [B]); the reference
        VAEs' reconstructions are left in ``self.last_references``."""
        if self.vq:  # the stored tokens -> their codes [B, D, h, w] -> the decoder
            tokens = torch.stack(
                [torch.from_numpy(LATENT.get(s, "tokens").astype(np.int64)) for s in batch]
            )  # [B, h, w]
            self.health.update(tokens)
            z = token_codes(self.vae, tokens.to(self.device))
            rec = to_unit(self.vae.decode(z, force_not_quantize=True).sample).cpu()  # [B, 3, H, W] in [0, 1]
            rec32 = to_unit(self.vae((ref * 2 - 1).to(self.device)).sample).cpu()  # a fresh encode: the same codes
            z = z.cpu()
        else:
            z = torch.stack([torch.from_numpy(LATENT.get(s, "mean").astype(np.float32)) for s in batch])  # [B, C, h, w]
            std = torch.stack([torch.from_numpy(LATENT.get(s, "std").astype(np.float32)) for s in batch])
            self.health.update(z, std)
            rec = to_unit(self.vae.decode(z.to(self.device)).sample).cpu()  # [B, 3, H, W] in [0, 1]
            # What float16 storage costs: the same images through a fresh fp32 encode -> decode.
            z32 = self.vae.encode((ref * 2 - 1).to(self.device)).latent_dist.mean
            rec32 = to_unit(self.vae.decode(z32).sample).cpu()
        self.spectra.update(z, ref)
        base = resize_baseline(ref)
        scores = {"psnr": psnr(rec, ref), "ssim": ssim(rec, ref), "mse": (rec - ref).square().mean((1, 2, 3)),
                  "psnr_fp32": psnr(rec32, ref),
                  "ssim_fp32": ssim(rec32, ref), "psnr_bicubic": psnr(base, ref), "ssim_bicubic": ssim(base, ref)}
        if self.lpips is not None:
            scores["lpips"] = self.lpips(rec, ref)
        if self.rfid is not None:
            self.rfid.add(ref, rec)
        self.last_references = {}
        for name, other in self.references.items():  # a fresh fp32 encode -> decode, like psnr_fp32
            rec_o = to_unit(other.decode(other.encode((ref * 2 - 1).to(self.device)).latent_dist.mean).sample).cpu()
            scores[f"psnr_{name}"], scores[f"ssim_{name}"] = psnr(rec_o, ref), ssim(rec_o, ref)
            if self.lpips is not None:
                scores[f"lpips_{name}"] = self.lpips(rec_o, ref)
            if name in self.rfid_references:
                self.rfid_references[name].add(ref, rec_o)
            self.last_references[name] = rec_o
        return rec, scores


class _Kept:
    """What the outputs need of every batch: a row per image, the first images for the grid, and
    the worst crop of each of the ``n`` photographs whose worst crop is lowest in PSNR (only those
    are held: photographs that drop out of the n can come back only with a worse crop)."""

    def __init__(self, n: int):
        self.n = n
        self.rows: list[dict] = []
        self.first: list[_Tile] = []
        self.worst: dict[str, _Tile] = {}  # raw key -> its worst crop so far

    def add(self, keys: list[str], raw_keys: list[str], ref: torch.Tensor, rec: torch.Tensor,
            scores: dict[str, torch.Tensor], others: dict[str, torch.Tensor] | None = None) -> None:
        bucket = f"{ref.shape[-1]}x{ref.shape[-2]}"  # the batch's image shape, W x H
        for i, (k, raw) in enumerate(zip(keys, raw_keys)):
            self.rows.append({"key": k, "bucket": bucket, **{name: float(v[i]) for name, v in scores.items()}})
            tile = _Tile(k, float(scores["psnr"][i]), ref[i], rec[i],
                         {n: (o[i], float(scores[f"psnr_{n}"][i])) for n, o in (others or {}).items()})
            if len(self.first) < self.n:
                self.first.append(tile)
            if raw not in self.worst or tile.psnr < self.worst[raw].psnr:
                self.worst[raw] = tile
        if len(self.worst) > self.n:
            keep = sorted(self.worst.items(), key=lambda kv: (kv[1].psnr, kv[0]))[: self.n]
            self.worst = dict(keep)

    def worst_tiles(self) -> list["_Tile"]:
        return sorted(self.worst.values(), key=lambda t: (t.psnr, t.key))


@dataclass
class _Tile:
    key: str
    psnr: float
    ref: torch.Tensor  # [3, H, W] in [0, 1]
    rec: torch.Tensor
    others: dict = field(default_factory=dict)  # reference name -> (its reconstruction, its PSNR)


def _write(out: Path, kept: _Kept, scorer: _Scorer, stats: dict) -> dict:
    """per_image.csv, the grids, latent health, details.json and metrics.json; returns the details."""
    buckets = sorted({r["bucket"] for r in kept.rows})
    # The bucket column only where there are several (data.crop: bucket).
    rows = kept.rows if len(buckets) > 1 else [{k: v for k, v in r.items() if k != "bucket"} for r in kept.rows]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "per_image.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    save_scatter([r["psnr_bicubic"] for r in rows], [r["psnr"] for r in rows], out / "per_image_psnr.png",
                 xlabel="8x bicubic resize baseline PSNR (dB)", ylabel="autoencoder PSNR (dB)",
                 title=f"{len(rows)} validation images")
    save_recon_grid(kept.first, out / "recon_grid.png")
    save_recon_grid(kept.worst_tiles(), out / "recon_worst.png")
    if scorer.vq:
        scorer.health.write(out)
    else:
        channel_rows = scorer.health.result()
        write_health(channel_rows, out)

    metrics = {name: float(np.mean([r[name] for r in rows])) for name in rows[0] if name not in ("key", "bucket")}
    metrics["psnr_fp16_cost"] = metrics["psnr_fp32"] - metrics["psnr"]
    if scorer.rfid is not None:
        metrics["rfid"] = scorer.rfid.compute()
    for name, rfid in scorer.rfid_references.items():
        metrics[f"rfid_{name}"] = rfid.compute()
    h, w = kept.first[0].ref.shape[-2:]
    c = stats["channels"]
    metrics.update({
        "num_images": len(rows),
        "latent_channels": c,
        # input numbers per latent number (VQ: per token)
        "compression_ratio": (3 * h * w) / ((1 if scorer.vq else c) * (h // 8) * (w // 8)),
        "latent_mean": stats["mean"],
        "latent_std": stats["std"],
        # Exact over every train latent (stats.json); the VAE config's are estimated at train time.
        "exact_scaling_factor": stats["scaling_factor"],
        "exact_shift_factor": stats["shift_factor"],
    })
    for name, other in scorer.references.items():  # a reference of another channel count: its own ratio
        c_o = other.config.latent_channels
        metrics[f"latent_channels_{name}"] = c_o
        metrics[f"compression_ratio_{name}"] = (3 * h * w) / (c_o * (h // 8) * (w // 8))
    if len(buckets) > 1:  # each bucket's own scores: a shape the autoencoder handles worse shows here
        metrics["buckets"] = {
            b: {"count": len(mine), **{m: float(np.mean([r[m] for r in mine])) for m in ("psnr", "ssim")}}
            for b in buckets
            for mine in [[r for r in kept.rows if r["bucket"] == b]]
        }
    if scorer.vq:
        metrics.update(scorer.health.metrics(stats.get("entropy_bits_per_token")))
        metrics["denoise_probe"] = "not applicable to tokens (the probe denoises continuous latents)"
    else:
        metrics.update(health_metrics(channel_rows))
    metrics.update(scorer.spectra.metrics())
    scorer.spectra.save_plot(out / "spectrum.png")
    atomic_write(out / "details.json", json.dumps(metrics, indent=2) + "\n")
    atomic_write(out / "metrics.json", json.dumps(headline(metrics), indent=2) + "\n")
    return metrics


# metrics.json, what `dvc metrics show` prints: the headline under short names, rounded to what can
# be told apart, so that it and the probe's fit one 120-column line (docs/reproducibility.md: What a healthy demo
# prints). details.json holds every number unrounded under its full name (per channel, per bucket,
# the references, the latent statistics); it is no DVC metric. short name -> (full name, decimals)
HEADLINE = {"psnr": ("psnr", 3), "ssim": ("ssim", 4), "psnr_bicubic": ("psnr_bicubic", 3),
            "fp16_db": ("psnr_fp16_cost", 4), "rate_bpp": ("rate_bpp", 4), "hf_share": ("latent_hf_share", 3),
            "collapsed": ("collapsed_channels", None), "usage": ("codebook_usage", 3),
            "perplexity": ("codebook_perplexity", 1), "lpips": ("lpips", 4), "rfid": ("rfid", 2)}


def headline(metrics: dict) -> dict:
    return {short: metrics[full] if places is None else round(metrics[full], places)
            for short, (full, places) in HEADLINE.items() if full in metrics}


def save_recon_grid(tiles: list[_Tile], path: Path) -> None:
    """original (with its key) | reconstruction (with its PSNR) | error, amplified ERROR_GAIN times."""
    originals = [t.ref for t in tiles]  # [3, H, W] each; buckets: of several shapes, each shown whole
    recs = [t.rec for t in tiles]
    error = [((r - o).abs() * ERROR_GAIN).clamp(0, 1) for r, o in zip(recs, originals)]
    names = list(tiles[0].others)  # a column per reference VAE, with its PSNR
    save_grid([originals, recs, error, *[[t.others[n][0] for t in tiles] for n in names]], path,
              unit=True, titles=["original", "reconstruction", f"|error| x{ERROR_GAIN}", *names],
              captions=[[t.key for t in tiles], [f"{t.psnr:.2f} dB" for t in tiles], [],
                        *[[f"{t.others[n][1]:.2f} dB" for t in tiles] for n in names]])


def load_references(locations: tuple[str, ...], device) -> dict[str, AutoencoderKL]:
    """name -> VAE for ``evaluate.references`` (folders, or hub ids[/subfolder] when online)."""
    refs = {}
    for location in locations:
        where = pretrained_location(location, "evaluate.references")
        refs[reference_name(location)] = AutoencoderKL.from_pretrained(
            where.path, **loading_kwargs(where)).to(device).eval()
    return refs
