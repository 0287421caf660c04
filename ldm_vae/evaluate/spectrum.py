"""How hard a latent space may be for diffusion, from its spectrum.

Recent work on the diffusability of autoencoders (EQ-VAE; "Improving the diffusability of
autoencoders", Skorokhodov et al. 2025) links a latent space with much energy at high spatial
frequencies to worse diffusion: the denoiser must generate detail that the image itself does not
carry at that scale. Measured here on the validation latents, normalised per channel as the
loader gives them to a diffusion model (stats.json), against the validation images at the same
scale (8x area-downsampled): the radially averaged power spectrum of each (2-D DCT, as that paper
does: no seam at the edges), and the share of energy at radii above half of Nyquist
(``*_hf_share``). Each image's and channel's own mean is removed first, so the share measures
structure, not brightness.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..viz import pyplot, save_figure

BINS = 8  # radial bins per Nyquist radius: 12 in all, to the corner at sqrt(2) x Nyquist
HIGH = 0.5  # "high frequency": a radius above this fraction of Nyquist


def _radius(h: int, w: int) -> torch.Tensor:
    """[h, w] radial frequency of each DCT coefficient, 1.0 = Nyquist (coefficient k of n is k / n)."""
    ky, kx = torch.arange(h, dtype=torch.float64)[:, None] / h, torch.arange(w, dtype=torch.float64)[None, :] / w
    return (ky**2 + kx**2).sqrt()


def _dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II [n, n]: the spectrum of a map without the seam that a periodic FFT
    sees between its opposite edges (that seam alone puts a smooth ramp's energy up high)."""
    i = torch.arange(n, dtype=torch.float64)
    d = torch.cos(math.pi * (i[None, :] + 0.5) * i[:, None] / n) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d


class RadialPower:
    """Streaming radial power sums of batches [B, C, h, w] (any h, w: buckets)."""

    def __init__(self) -> None:
        n = math.ceil(math.sqrt(2) * BINS) + 1
        self.power = torch.zeros(n, dtype=torch.float64)
        self.count = torch.zeros(n, dtype=torch.float64)
        self.high = self.total = 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x.double()
        x = x - x.mean((-2, -1), keepdim=True)  # [B, C, h, w] without each map's mean
        h, w = x.shape[-2:]
        coef = _dct_matrix(h) @ x @ _dct_matrix(w).T  # [B, C, h, w] 2-D DCT of each map
        p = coef.square().sum((0, 1))  # [h, w] power summed over images and channels
        r = _radius(h, w)
        bins = (r * BINS).long().clamp(max=len(self.power) - 1)
        self.power.index_add_(0, bins.flatten(), p.flatten())
        self.count.index_add_(0, bins.flatten(), torch.full((bins.numel(),), float(x.shape[0] * x.shape[1]),
                                                             dtype=torch.float64))
        self.high += float(p[r > HIGH].sum())
        self.total += float(p.sum())

    def hf_share(self) -> float:
        return self.high / self.total if self.total else float("nan")

    def curve(self) -> tuple[list[float], list[float]]:
        """(radius as a fraction of Nyquist, mean power per frequency normalised to sum 1) for the
        bins that hold frequencies, DC left out."""
        keep = (self.count > 0).nonzero().flatten().tolist()
        keep = [i for i in keep if i > 0]
        avg = self.power[keep] / self.count[keep]
        avg = avg / avg.sum() if float(avg.sum()) > 0 else avg
        return [(i + 0.5) / BINS for i in keep], avg.tolist()


class Spectra:
    """The normalised latents' and the images' (at the latent's scale) radial power."""

    def __init__(self, channel_mean: list[float], channel_std: list[float]):
        self.mean = torch.tensor(channel_mean, dtype=torch.float32)[:, None, None]  # [C, 1, 1]
        self.std = torch.tensor(channel_std, dtype=torch.float32)[:, None, None]
        self.latent, self.image = RadialPower(), RadialPower()

    def update(self, z: torch.Tensor, images: torch.Tensor) -> None:
        """z: raw latents [B, C, h, w]; images: [B, 3, 8h, 8w] in [0, 1]."""
        self.latent.update((z - self.mean) / self.std)
        self.image.update(F.avg_pool2d(images.float(), images.shape[-1] // z.shape[-1]))  # [B, 3, h, w]

    def metrics(self) -> dict:
        lat, img = self.latent.hf_share(), self.image.hf_share()
        return {"latent_hf_share": lat, "image_hf_share": img}

    def save_plot(self, path: Path) -> None:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name, rp in (("latents (normalised)", self.latent), ("images, 8x area-downsampled", self.image)):
            x, y = rp.curve()
            ax.plot(x, y, "o-", label=f"{name}: {100 * rp.hf_share():.0f}% above {HIGH:g} Nyquist")
        ax.axvline(HIGH, color="grey", ls="--", lw=1)
        ax.set_yscale("log")
        ax.set(xlabel="spatial frequency (fraction of Nyquist)", ylabel="share of power per frequency",
               title="radially averaged power spectrum")
        ax.legend(fontsize=7)
        fig.tight_layout()
        save_figure(fig, path)
