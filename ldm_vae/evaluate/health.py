"""Latent health: is every latent channel used, and how far is the posterior from the prior?

A KL autoencoder with a too-strong KL weight (or a bad init) lets channels collapse to the prior:
their posterior is N(0, 1) for every image, so they carry no information and only cost the
diffusion model capacity. The KL per channel shows it directly: a used channel costs nats, a
collapsed one about zero.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch

from ..viz import pyplot, save_figure

# A channel whose mean KL per latent element is below this (nats) carries essentially nothing:
# its posterior is within ~0.3 std of N(0, 1) on average. Used channels of a trained VAE cost
# several nats per element (the SD VAE: about 3 to 8).
COLLAPSE_KL_NATS = 0.05
# The rate as the ELBO counts it, per image pixel: a channel's KL per latent element times the
# latent elements per image pixel (1/64: 8x downsampling each way), in bits.
ELEMENTS_PER_PIXEL = 1 / 64


class ChannelStats:
    """Streaming per-channel sums over posterior (mean, std) batches [B, C, h, w]."""

    def __init__(self) -> None:
        self.n = 0
        self.sum = self.sum_sq = self.kl = None

    def update(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        m, s = mean.double(), std.double().clamp_min(1e-8)  # [B, C, h, w]
        kl = 0.5 * (m**2 + s**2 - 1.0 - 2.0 * s.log())  # [B, C, h, w] nats per element
        dims = (0, 2, 3)
        batch = (m.sum(dims), (m**2).sum(dims), kl.sum(dims))  # each [C]
        if self.sum is None:
            self.sum, self.sum_sq, self.kl = (t.clone() for t in batch)
        else:
            self.sum += batch[0]
            self.sum_sq += batch[1]
            self.kl += batch[2]
        self.n += m.shape[0] * m.shape[2] * m.shape[3]

    def result(self) -> list[dict]:
        """One row per channel: mean and std of the posterior mean, KL per element, collapsed."""
        mean = self.sum / self.n
        std = (self.sum_sq / self.n - mean**2).clamp_min(0).sqrt()
        kl = self.kl / self.n
        return [
            {"channel": c, "mean": float(mean[c]), "std": float(std[c]), "kl": float(kl[c]),
             "rate_bpp": float(kl[c]) * ELEMENTS_PER_PIXEL / math.log(2), "collapsed": bool(kl[c] < COLLAPSE_KL_NATS)}
            for c in range(len(kl))
        ]


def health_metrics(rows: list[dict]) -> dict:
    """Flat numbers for metrics.json: per-channel mean/std/KL/rate, the totals and the collapsed count."""
    out = {
        "latent_kl_per_element": float(np.mean([r["kl"] for r in rows])),
        "collapsed_channels": sum(r["collapsed"] for r in rows),
        "rate_bpp": sum(r["rate_bpp"] for r in rows),  # KL to N(0, I), bits per image pixel
    }
    for r in rows:
        c = f"c{r['channel']:02d}"
        out[f"latent_{c}_mean"] = r["mean"]
        out[f"latent_{c}_std"] = r["std"]
        out[f"latent_{c}_kl"] = r["kl"]
        out[f"latent_{c}_rate_bpp"] = r["rate_bpp"]
    return out


def write_health(rows: list[dict], out: Path) -> None:
    """latent_health.csv (a DVC plot) and latent_health.png (KL and mean/std per channel)."""
    with open(out / "latent_health.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    plt = pyplot()

    ch = [r["channel"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    colours = ["tab:red" if r["collapsed"] else "tab:blue" for r in rows]
    ax1.bar(ch, [max(r["kl"], 1e-4) for r in rows], color=colours)
    ax1.set_yscale("log")
    ax1.axhline(COLLAPSE_KL_NATS, color="tab:red", ls="--", lw=1, label=f"collapsed below {COLLAPSE_KL_NATS}")
    ax1.set(xlabel="latent channel", ylabel="KL to N(0, I), nats per element", title="information per channel")
    ax1.legend(fontsize=8)
    ax2.errorbar(ch, [r["mean"] for r in rows], yerr=[r["std"] for r in rows], fmt="o", capsize=3)
    ax2.axhline(0, color="grey", lw=0.5)
    ax2.set(xlabel="latent channel", ylabel="posterior mean (± std over images)", title="latent statistics")
    for ax in (ax1, ax2):
        ax.set_xticks(ch)
    fig.tight_layout()
    save_figure(fig, out / "latent_health.png")


# A codebook using fewer than this share of the codes the validation set could show (min(K, its
# token count)) has collapsed: most codes never win, and the tokens carry a fraction of log2 K bits.
# (Taming's VQGAN at 16,384 codes used about a tenth; codebooks kept used reach most of them.)
COLLAPSED_USAGE = 0.25


class CodebookStats:
    """The validation tokens' code histogram (VQ latents): use, perplexity, rate, collapse."""

    def __init__(self, k: int):
        self.k, self.counts, self.positions = k, torch.zeros(k, dtype=torch.float64), 0

    def update(self, tokens: torch.Tensor) -> None:
        # tokens: [B, h, w] long
        self.counts += torch.bincount(tokens.flatten(), minlength=self.k).double()
        self.positions = tokens.shape[1] * tokens.shape[2]

    def metrics(self, train_entropy_bits: float | None = None) -> dict:
        """codebook_usage (share of codes used), its share of what the set could show, perplexity,
        collapsed_codebook, and the rates per image pixel: log2 K fixed-length, and the train
        histogram's entropy (what an entropy coder spends)."""
        from ..vq import histogram_stats

        st = histogram_stats(self.counts, self.k)
        could = min(self.k, int(self.counts.sum()))
        out = {"codebook_size": self.k, "codes_used": st["codes_used"], "codebook_usage": st["usage"],
               "codebook_usage_possible": st["codes_used"] / max(could, 1), "codebook_perplexity": st["perplexity"],
               "rate_bpp": st["bits_per_token"] * ELEMENTS_PER_PIXEL,
               "rate_entropy_bpp": (train_entropy_bits if train_entropy_bits is not None
                                    else st["entropy_bits_per_token"]) * ELEMENTS_PER_PIXEL}
        out["collapsed_codebook"] = bool(out["codebook_usage_possible"] < COLLAPSED_USAGE)
        return out

    def write(self, out: Path) -> None:
        """latent_health.csv for tokens (a row per code: its validation count and share) and the plot."""
        with open(out / "latent_health.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["code", "count", "share"])
            total = max(float(self.counts.sum()), 1.0)
            w.writerows([k, int(c), round(float(c) / total, 6)] for k, c in enumerate(self.counts))
        self.save_plot(out / "latent_health.png")

    def save_plot(self, path: Path) -> None:
        """latent_health.png for tokens: each code's share of the validation tokens, most used first
        (a flat curve is a used codebook; a cliff after a few codes, a collapsed one)."""
        plt = pyplot()
        share = (self.counts / self.counts.sum().clamp_min(1)).sort(descending=True).values.numpy()
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(np.arange(1, self.k + 1), np.maximum(share, 1e-7), lw=1)
        ax.axhline(1 / self.k, color="grey", ls="--", lw=1, label="uniform use")
        ax.set(xscale="log", yscale="log", xlabel="code, by use", ylabel="share of validation tokens",
               title=f"codebook use: {int((self.counts > 0).sum())} of {self.k} codes")
        ax.legend(fontsize=8)
        fig.tight_layout()
        save_figure(fig, path)
