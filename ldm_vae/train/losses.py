"""The LDM autoencoder objective. Following LDM, losses return ``(loss, logs)`` with ``train/...`` keys.

Generator (autoencoder) loss, per LDM's ``LPIPSWithDiscriminator``::

    nll  = (|x - x̂| or (x - x̂)² + perceptual_weight * LPIPS(x, x̂)) / exp(s) + s    per pixel
    loss = nll + kl_weight * w_kl(step) * KL(q(z|x) || N(0, I)) + d_weight * adv(step) * (-D(x̂))
           (a VQ autoencoder: the VQ loss of ldm_vae/vq.py instead of the KL term)
           [+ scale_equivariance * rec(decode(z ↓2), x ↓2)]      with free bits: KL = Σ_c max(λ, KL_c)

Scale: LDM sums the nll over the pixels of an image and the KL over its latent elements. Here the
nll is a per-pixel mean and the KL sum is divided by the same pixel count (3 H W), which is LDM's
loss divided by a constant: ``loss.kl_weight`` means exactly what it means in LDM's configs (SD:
1e-6) while the loss keeps a resolution-free size for gradient clipping and the learning rate.

- ``s`` is the learned output log-variance (``loss.learn_logvar``). LDM declares it but leaves it
  out of the optimizer, so it never moves; here it is a parameter of the trained module
  (model.TrainedAutoencoder), so it is in the autoencoder's optimizer, synced by DDP and checkpointed.
- ``d_weight`` is the adaptive weight: ||∇ nll|| / ||∇ adv|| at the decoder's last layer, clamped
  to [0, 1e4], detached, times ``loss.disc_weight``; ``adv(step)`` is 0 before ``loss.disc_start``.
- The perceptual net is frozen but not under ``no_grad``: its gradient reaches the decoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LossConfig
from ..model import VQTerms
from .discriminator import PatchDiscriminator, discriminator_loss, generator_adv_loss

# Floor of the per-image MSE in the log_l2 loss (in [-1, 1] units: 46 dB PSNR on [0, 1]), so a
# near-perfect image cannot take an unbounded share of the gradient.
LOG_L2_EPS = 1e-4
MAX_ADAPTIVE_WEIGHT = 1e4  # LDM's clamp: a vanishing adversarial gradient must not explode the weight


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


def free_bits_kl(mean: torch.Tensor, logvar: torch.Tensor, floor: float) -> torch.Tensor:
    """The free-bits KL: sum over channels of max(floor, KL_c) x the latent elements per image,
    where KL_c is channel c's KL in nats per element averaged over the batch. Equal to
    :func:`kl_to_prior` when every channel is above the floor; a channel below it gets no KL
    gradient."""
    # mean, logvar: [B, C, h, w]
    kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float())
    per_channel = kl.mean((0, 2, 3))  # [C] nats per element
    return per_channel.clamp_min(floor).sum() * mean.shape[2] * mean.shape[3]


def adaptive_weight(nll: torch.Tensor, adv: torch.Tensor, last_layer: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """||∇_w nll|| / (||∇_w adv|| + 1e-4) at the decoder's last weight ``w``, clamped and detached.

    Balances the adversarial term against the reconstruction at the one place both act on the
    image directly. ``retain_graph``: the graph is needed again for the real backward.

    ``scale``: the fp16 loss scale. Under fp16 autocast the backward runs in float16, where the
    gradients of the unscaled losses (a per-pixel mean: ~1e-7 an element) underflow to zero, so
    they are taken of the scaled losses and divided back in float32. Where the scaled ones
    overflow, they are taken unscaled: the weight is always finite, and an overflow of the step
    itself is the scaler's to skip.
    """
    def norms(s: float) -> tuple[torch.Tensor, torch.Tensor]:
        g_nll = torch.autograd.grad(nll * s, last_layer, retain_graph=True)[0]
        g_adv = torch.autograd.grad(adv * s, last_layer, retain_graph=True)[0]
        return g_nll.float().norm() / s, g_adv.float().norm() / s

    n_nll, n_adv = norms(scale)
    if scale != 1.0 and not bool(torch.isfinite(n_nll) & torch.isfinite(n_adv)):
        n_nll, n_adv = norms(1.0)
    return (n_nll / (n_adv + 1e-4)).clamp(0.0, MAX_ADAPTIVE_WEIGHT).detach()


class VAELoss(nn.Module):
    """The generator loss and the discriminator loss of one training step.

    Holds the frozen perceptual net (never trained, never checkpointed: it is published weights).
    """

    def __init__(self, cfg: LossConfig, perceptual: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        if cfg.perceptual_weight > 0 and perceptual is None:
            raise ValueError("loss.perceptual_weight > 0 needs the LPIPS net (ldm_vae.lpips.load_lpips)")
        self.perceptual = perceptual.requires_grad_(False).eval() if perceptual is not None else None

    def kl_scale(self, step: int) -> float:
        """kl_weight, ramped linearly from 0 over loss.kl_anneal_steps (KL annealing)."""
        ramp = min(1.0, step / self.cfg.kl_anneal_steps) if self.cfg.kl_anneal_steps else 1.0
        return self.cfg.kl_weight * ramp

    def adversarial_on(self, step: int) -> bool:
        return self.cfg.disc_weight > 0 and step >= self.cfg.disc_start

    def forward(self, rec, target, mean, logvar, output_logvar: torch.Tensor | None = None, step: int = 0,
                disc: nn.Module | None = None, last_layer: torch.Tensor | None = None,
                rec_down: torch.Tensor | None = None, grad_scale: float = 1.0) -> tuple[torch.Tensor, dict]:
        """Generator loss. ``output_logvar`` is s (a 0-d tensor; None: 0); ``disc`` the discriminator
        to fool (its parameters frozen by the caller for this pass); ``last_layer`` the decoder's
        last weight, for the adaptive weight; ``rec_down`` the decoding of the 2x-downsampled
        latent (``loss.scale_equivariance``); ``grad_scale`` the fp16 loss scale (:func:`adaptive_weight`)."""
        # rec, target: [B, 3, H, W] in [-1, 1]; mean, logvar: [B, C, h, w]
        s = output_logvar if output_logvar is not None else rec.new_zeros((), dtype=torch.float32)
        rec_loss = reconstruction_loss(self.cfg.rec_loss, rec, target)
        logs = {f"train/rec_{self.cfg.rec_loss}": rec_loss.detach()}
        if self.perceptual is not None:
            p_loss = self.perceptual(rec, target).mean()  # LPIPS per image [B] -> scalar
            rec_loss = rec_loss + self.cfg.perceptual_weight * p_loss
            logs["train/lpips"] = p_loss.detach()
        nll = rec_loss / s.exp() + s
        if isinstance(logvar, VQTerms):  # a VQ autoencoder: its VQ loss instead of the KL
            loss = nll + logvar.loss
            regulariser, tail = logvar.logs, {}
        else:
            kl = kl_to_prior(mean, logvar)
            # The charged KL: the plain sum, or with free bits each channel at least its floor.
            charged = free_bits_kl(mean, logvar, self.cfg.free_bits) if self.cfg.free_bits > 0 else kl
            pixels = target[0].numel()  # 3 H W: LDM's per-image sums, divided through (module docstring)
            loss = nll + self.kl_scale(step) * charged / pixels
            regulariser = {"train/kl": kl.detach()}
            tail = {"train/posterior_std": logvar.detach().float().mul(0.5).exp().mean()}
        if rec_down is not None:  # [B, 3, H/2, W/2] against the image area-downsampled 2x
            se = reconstruction_loss(self.cfg.rec_loss, rec_down, F.avg_pool2d(target.float(), 2))
            loss = loss + self.cfg.scale_equivariance * se
            logs["train/scale_equivariance"] = se.detach()
        if disc is not None and self.adversarial_on(step):
            adv = generator_adv_loss(disc(rec))
            d_weight = adaptive_weight(nll, adv, last_layer, grad_scale) * self.cfg.disc_weight
            loss = loss + d_weight * adv
            logs.update({"train/g_adv": adv.detach(), "train/d_weight": d_weight})
        # in the order data/train/metrics.json has always had
        logs.update({"train/loss": loss.detach(), "train/nll": nll.detach(), **regulariser,
                     "train/output_logvar": s.detach().float(), **tail})
        return loss, logs

    def discriminator_loss(self, disc: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The discriminator's loss on real images and DETACHED reconstructions."""
        # real, fake: [B, 3, H, W]. Two passes, as LDM and taming do: each BatchNorm batch is all
        # real or all fake (the usual GAN advice).
        logits_real = disc(real.detach()).float()  # [B, 1, h, w]
        logits_fake = disc(fake.detach()).float()
        d_loss = discriminator_loss(self.cfg.disc_loss, logits_real, logits_fake)
        return d_loss, {"train/d_loss": d_loss.detach(), "train/logits_real": logits_real.detach().mean(),
                        "train/logits_fake": logits_fake.detach().mean()}


def build_discriminator(cfg: LossConfig) -> PatchDiscriminator | None:
    """The PatchGAN when the adversarial term is on (loss.disc_weight > 0), else None."""
    if cfg.disc_weight <= 0:
        return None
    return PatchDiscriminator(channels=cfg.disc_channels, layers=cfg.disc_layers)
