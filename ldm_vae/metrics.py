"""Reconstruction metrics on images in [0, 1], computed per image.

SSIM follows Wang et al. 2004 as scikit-image implements it with ``gaussian_weights=True``:
an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, population (not sample)
covariances, averaged over the window positions that fit inside the image and then over channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # scipy's gaussian_filter truncates at 3.5 sigma: int(3.5 * 1.5 + 0.5) = 5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model space -> [0, 1] image space, clamped as a saved image would be."""
    return (x.float().clamp(-1, 1) + 1) / 2


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of [N, C, H, W] images in [0, 1]; identical images give inf."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)  # [N]
    return (10 * torch.log10(1.0 / mse)).float()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM of [N, C, H, W] images in [0, 1] (needs H, W >= 11)."""
    if min(a.shape[-2:]) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"SSIM needs images of at least {2 * SSIM_RADIUS + 1} px, got {tuple(a.shape[-2:])}")
    a, b = a.double(), b.double()
    n, c = a.shape[:2]
    x = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64)
    g = torch.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(c, 1, -1, -1)  # [C, 1, 11, 11], depthwise

    def blur(t):  # 'valid' window positions only, as skimage crops its reflect-padded borders
        return F.conv2d(t, kernel, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = SSIM_K1**2, SSIM_K2**2  # data range 1
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.reshape(n, c, -1).mean(2).mean(1).float()


def resize_baseline(x: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """The no-learning reference: area downsampling by ``factor`` then bicubic upsampling.

    x: [N, C, H, W] in [0, 1] with H, W divisible by ``factor``; returns the same shape, clamped.
    At factor 8 an RGB image keeps 3 numbers per 8x8 block, close to a 4-channel latent's 4.
    """
    small = F.interpolate(x.float(), scale_factor=1 / factor, mode="area")
    up = F.interpolate(small, size=x.shape[-2:], mode="bicubic", align_corners=False)
    return up.clamp(0, 1)
