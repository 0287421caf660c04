"""Training objective. Following LDM, losses return ``(loss, logs)`` with ``train/...`` keys.

This is the reconstruction + KL part of the LDM autoencoder loss. The perceptual and adversarial
terms are a separate piece (a later issue) so that this one stays usable without pretrained nets.
"""

from __future__ import annotations

import torch

from .config import LossConfig


# Floor of the per-image MSE in the log_l2 loss (in [-1, 1] units: 46 dB PSNR on [0, 1]), so a
# near-perfect image cannot take an unbounded share of the gradient.
LOG_L2_EPS = 1e-4


def reconstruction_loss(kind: str, rec: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """l1 / l2: a mean over every element, so the scale does not depend on resolution or batch.

    log_l2: the mean over images of ln(per-image MSE), i.e. minus the mean per-image PSNR up to a
    constant factor. Each image's gradient is scaled by 1 / its MSE, so smooth images, whose small
    errors cost the most PSNR, are not drowned out by textured ones.
    """
    # rec, target: [B, 3, H, W] in [-1, 1]
    diff = rec.float() - target.float()
    if kind == "l1":
        return diff.abs().mean()
    if kind == "log_l2":
        return diff.pow(2).flatten(1).mean(1).add(LOG_L2_EPS).log().mean()  # [B] -> scalar
    return diff.pow(2).mean()


def kl_to_prior(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over [C, h, w], averaged over the batch."""
    # mean, logvar: [B, C, h, w]
    kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float())
    return kl.flatten(1).sum(1).mean()


class VAELoss:
    """L1 or L2 reconstruction + kl_weight * KL, both as in the LDM config.

    The KL is summed over latent elements per image (as LDM does), the reconstruction is a
    per-pixel mean: with SD's kl_weight of 1e-6 this keeps the KL a gentle regulariser.
    """

    def __init__(self, cfg: LossConfig):
        self.cfg = cfg

    def __call__(self, rec, target, mean, logvar) -> tuple[torch.Tensor, dict[str, float]]:
        rec_loss = reconstruction_loss(self.cfg.rec_loss, rec, target)
        kl = kl_to_prior(mean, logvar)
        loss = rec_loss + self.cfg.kl_weight * kl
        logs = {
            "train/loss": loss.detach(),
            f"train/rec_{self.cfg.rec_loss}": rec_loss.detach(),
            "train/kl": kl.detach(),
            "train/posterior_std": logvar.detach().float().mul(0.5).exp().mean(),
        }
        return loss, logs
