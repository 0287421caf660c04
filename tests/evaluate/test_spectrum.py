"""The rate (KL to the prior in bits per image pixel) and the spectrum measures of diffusability,
on inputs whose answers are known by hand."""

import math

import numpy as np
import pytest
import torch

from ldm_vae.evaluate.health import ChannelStats, health_metrics
from ldm_vae.evaluate.spectrum import HIGH, RadialPower, Spectra, _radius


def test_the_rate_is_the_kl_in_bits_per_image_pixel():
    stats = ChannelStats()
    mean = torch.zeros(3, 2, 4, 4)
    mean[:, 0] = 2.0  # channel 0: KL = m² / 2 = 2 nats per element at std 1
    stats.update(mean, torch.ones(3, 2, 4, 4))  # channel 1: the prior itself, KL 0
    rows = stats.result()
    assert rows[0]["rate_bpp"] == pytest.approx(2.0 / 64 / math.log(2))  # 64 image pixels per element
    assert rows[1]["rate_bpp"] == pytest.approx(0.0) and rows[1]["collapsed"]
    m = health_metrics(rows)
    assert m["rate_bpp"] == pytest.approx(rows[0]["rate_bpp"]) and m["latent_c00_rate_bpp"] == rows[0]["rate_bpp"]


def test_high_frequency_share_of_known_signals():
    h = w = 16
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    smooth = torch.cos(math.pi * 2 * (xx + 0.5) / 16)[None, None].double()  # DCT coefficient 2 of 16: 0.125 Nyquist
    checker = ((-1.0) ** (xx + yy))[None, None].double()  # the corner: coefficient (15, 15)
    for x, share, tol in ((smooth, 0.0, 1e-9), (checker, 1.0, 0.01)):  # (-1)^i leaks a little into lower odd k
        rp = RadialPower()
        rp.update(x)
        assert rp.hf_share() == pytest.approx(share, abs=tol)
    noise = RadialPower()  # white noise: the share of frequency bins above half Nyquist, on average
    noise.update(torch.randn(64, 4, h, w, generator=torch.Generator().manual_seed(0)))
    expected = float((_radius(h, w) > HIGH).double().mean())
    assert noise.hf_share() == pytest.approx(expected, abs=0.02) and 0.7 < expected < 0.9
    x, y = noise.curve()
    assert x == sorted(x) and abs(sum(y) - 1) < 1e-9 and np.std(y) / np.mean(y) < 0.2  # flat


def test_spectra_compare_latents_with_images_at_the_same_scale_of_any_shape():
    g = torch.Generator().manual_seed(0)
    sp = Spectra([0.0, 0.0], [2.0, 2.0])
    for h, w in ((4, 6), (6, 4)):  # two buckets
        yy = torch.linspace(0, 1, 8 * h)[:, None].expand(8 * h, 8 * w)
        images = yy[None, None].expand(2, 3, 8 * h, 8 * w)  # a smooth ramp
        sp.update(torch.randn(2, 2, h, w, generator=g), images)
    m = sp.metrics()
    assert m["latent_hf_share"] > 0.5 > 0.2 > m["image_hf_share"]  # noise latents, a smooth image
