"""The autoencoder: a diffusers ``AutoencoderKL`` built from ``model.*`` params, and the
latent scale measured on data that makes it usable by a diffusion model."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from .config import ModelConfig

DOWNSAMPLING = 8  # 4 blocks, 3 stride-2 downsamplings: the SD "kl-f8" family


def build_vae(cfg: ModelConfig, sample_size: int) -> AutoencoderKL:
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.block_out_channels),
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        mid_block_add_attention=cfg.mid_block_attention,
        sample_size=sample_size,
        # Placeholders until export measures them on the training data.
        scaling_factor=1.0,
        shift_factor=0.0,
    )
    with torch.no_grad():
        # quant_conv maps the encoder output [B, 2C, h, w] to (mean, logvar) = channels [:C], [C:].
        vae.quant_conv.bias[cfg.latent_channels :].fill_(cfg.logvar_init)
    return vae


class LatentMoments:
    """Streaming exact moments of the posterior over a set of images.

    The variance of a posterior *sample* z = mean + std * eps over the data is
    E[std^2] + Var(mean); it is accumulated per channel in float64 so that merging many batches
    (or, later, ranks) loses nothing.
    """

    def __init__(self, channels: int):
        self.n = 0  # latent positions counted per channel (images * h * w)
        self.sum_mean = torch.zeros(channels, dtype=torch.float64)
        self.sum_mean_sq = torch.zeros(channels, dtype=torch.float64)
        self.sum_var = torch.zeros(channels, dtype=torch.float64)

    def update(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        # mean, std: [B, C, h, w]
        m = mean.double().transpose(0, 1).flatten(1)  # [C, B*h*w]
        s = std.double().transpose(0, 1).flatten(1)
        self.n += m.shape[1]
        self.sum_mean += m.sum(1)
        self.sum_mean_sq += (m * m).sum(1)
        self.sum_var += (s * s).sum(1)

    def state(self) -> dict:
        """JSON-safe sums (float64 round-trips exactly through JSON's repr)."""
        return {"n": self.n, "sum_mean": self.sum_mean.tolist(), "sum_mean_sq": self.sum_mean_sq.tolist(),
                "sum_var": self.sum_var.tolist()}

    @classmethod
    def from_state(cls, state: dict) -> "LatentMoments":
        m = cls(len(state["sum_mean"]))
        m.n = state["n"]
        for k in ("sum_mean", "sum_mean_sq", "sum_var"):
            setattr(m, k, torch.tensor(state[k], dtype=torch.float64))
        return m

    def merge(self, other: "LatentMoments") -> None:
        self.n += other.n
        self.sum_mean += other.sum_mean
        self.sum_mean_sq += other.sum_mean_sq
        self.sum_var += other.sum_var

    def summary(self) -> dict:
        """Per-channel and global mean/std of posterior samples, and the SD3-style factors."""
        if self.n == 0:
            raise ValueError("no latents were accumulated")
        mu = self.sum_mean / self.n  # [C]
        var = self.sum_var / self.n + (self.sum_mean_sq / self.n - mu * mu)  # [C]
        g_mu = mu.mean()
        # Global variance over all channels: within-channel variance plus spread of channel means.
        g_var = var.mean() + ((mu - g_mu) ** 2).mean()
        g_std = float(g_var.clamp_min(1e-12).sqrt())
        return {
            "channel_mean": [float(v) for v in mu],
            "channel_std": [float(v) for v in var.clamp_min(1e-12).sqrt()],
            "mean": float(g_mu),
            "std": g_std,
            "count": self.n,
            # z_model = (z - shift_factor) * scaling_factor has mean 0 and std 1 on this data.
            "shift_factor": float(g_mu),
            "scaling_factor": 1.0 / g_std,
        }
