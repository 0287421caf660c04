"""The PatchGAN discriminator of pix2pix / taming-transformers / LDM, and its losses.

A stack of stride-2 4x4 convolutions that gives one real/fake logit per overlapping patch
(70x70 pixels with 3 layers), so the adversarial term judges local texture, which is what an L1
or L2 reconstruction blurs. The generator side of the loss lives in ``losses.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """``[B, 3, H, W] -> [B, 1, h, w]`` patch logits (no sigmoid: the losses take logits)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, layers + 1):
            c_next = channels * min(2 ** i, 8)
            stride = 2 if i < layers else 1  # the last block keeps the resolution, as in pix2pix
            # No bias before a norm (it would be cancelled). BatchNorm as in LDM; its running
            # statistics are buffers, broadcast from rank 0 by DDP like the weights.
            seq += [nn.Conv2d(c, c_next, 4, stride, 1, bias=False), nn.BatchNorm2d(c_next), nn.LeakyReLU(0.2)]
            c = c_next
        seq.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.main = nn.Sequential(*seq)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init_weights(m: nn.Module) -> None:
    # DCGAN initialisation, as taming-transformers does.
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def discriminator_loss(kind: str, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """hinge: mean(relu(1 - real)) + mean(relu(1 + fake)), halved; vanilla: the same with softplus."""
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_adv_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's side for both losses (as LDM): raise the discriminator's logits on fakes."""
    return -logits_fake.float().mean()
