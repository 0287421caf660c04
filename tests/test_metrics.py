import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ldm_vae.metrics import psnr, resize_baseline, ssim

from helpers.common import photo


def pair(seed):
    a = torch.from_numpy(np.array(photo(64, 48, seed=seed))).permute(2, 0, 1).float() / 255
    noise = torch.from_numpy(np.random.default_rng(seed).normal(0, 0.05, a.shape)).float()
    return a, (a + noise).clamp(0, 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_psnr_and_ssim_match_scikit_image(seed):
    a, b = pair(seed)
    ours_p = psnr(a[None], b[None]).item()
    ours_s = ssim(a[None], b[None]).item()
    an, bn = a.permute(1, 2, 0).double().numpy(), b.permute(1, 2, 0).double().numpy()
    ref_p = peak_signal_noise_ratio(an, bn, data_range=1.0)
    ref_s = structural_similarity(an, bn, data_range=1.0, channel_axis=2, gaussian_weights=True,
                                  sigma=1.5, use_sample_covariance=False)
    assert abs(ours_p - ref_p) < 1e-3
    assert abs(ours_s - ref_s) < 1e-3


def test_metrics_are_per_image_and_perfect_on_identity():
    a, b = pair(0)
    batch_a, batch_b = torch.stack([a, a]), torch.stack([a, b])
    assert ssim(batch_a, batch_b).shape == (2,)
    assert ssim(batch_a, batch_b)[0].item() == pytest.approx(1.0, abs=1e-6)
    assert torch.isinf(psnr(batch_a, batch_b)[0])


def test_resize_baseline_keeps_smooth_images_and_blurs_detail():
    smooth = torch.linspace(0, 1, 64).repeat(3, 64, 1)[None]  # a horizontal ramp
    assert psnr(resize_baseline(smooth), smooth).item() > 35
    checker = ((torch.arange(64)[:, None] + torch.arange(64)[None]) % 2).float().repeat(3, 1, 1)[None]
    assert psnr(resize_baseline(checker), checker).item() < 8


def test_channel_stats_kl_and_collapse_math():
    import torch

    from ldm_vae.evaluate.health import ChannelStats, health_metrics

    g = torch.Generator().manual_seed(0)
    mean = torch.stack([torch.randn(50, 4, 4, generator=g) * 2 + 1, torch.zeros(50, 4, 4)], 1)  # [50, 2, 4, 4]
    std = torch.stack([torch.full((50, 4, 4), 0.1), torch.ones(50, 4, 4)], 1)
    stats = ChannelStats()
    stats.update(mean[:20], std[:20])
    stats.update(mean[20:], std[20:])  # streaming over batches == one pass
    rows = stats.result()
    m0 = mean[:, 0].double()
    kl0 = 0.5 * (m0**2 + 0.01 - 1 - 2 * torch.log(torch.tensor(0.1, dtype=torch.float64)))
    assert abs(rows[0]["kl"] - kl0.mean().item()) < 1e-6 and rows[1]["kl"] < 1e-9
    assert abs(rows[0]["mean"] - m0.mean().item()) < 1e-9 and abs(rows[0]["std"] - m0.std(unbiased=False).item()) < 1e-9
    assert [r["collapsed"] for r in rows] == [False, True]
    flat = health_metrics(rows)
    assert flat["collapsed_channels"] == 1 and flat["latent_c00_kl"] == rows[0]["kl"]
