import torch

from conftest import make_params
from ldm_vae.model import LatentMoments, build_vae


def test_vae_downsamples_8x_with_configured_channels():
    for c in (4, 8, 16):
        vae = build_vae(make_params(model={"latent_channels": c}).model, sample_size=32)
        post = vae.encode(torch.rand(2, 3, 32, 48) * 2 - 1).latent_dist
        assert post.mean.shape == (2, c, 4, 6)
        assert vae.decode(post.mean).sample.shape == (2, 3, 32, 48)
        assert vae.config.latent_channels == c


def test_logvar_init_sets_initial_posterior_std():
    vae = build_vae(make_params(model={"logvar_init": -6.0}).model, sample_size=32)
    post = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist
    # conv_out adds a random-init term, but the bias dominates: std well below diffusers' 1.0.
    assert post.std.mean() < 0.2


def test_latent_moments_are_exact_and_mergeable():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(10, 3, 4, 4, generator=g) * torch.tensor([1.0, 2.0, 0.5])[:, None, None] + 0.3
    std = torch.rand(10, 3, 4, 4, generator=g)
    a, b = LatentMoments(3), LatentMoments(3)
    a.update(mean[:4], std[:4])
    b.update(mean[4:], std[4:])
    a.merge(b)
    s = a.summary()
    # Monte-Carlo check of "variance of a posterior sample = E[std^2] + Var(mean)".
    eps = torch.randn(4000, *mean.shape, generator=g)
    z = (mean + std * eps).double()  # [S, N, C, h, w]
    per_channel = z.transpose(0, 2).reshape(3, -1)
    assert torch.allclose(torch.tensor(s["channel_mean"], dtype=torch.float64), per_channel.mean(1), atol=5e-3)
    assert torch.allclose(torch.tensor(s["channel_std"], dtype=torch.float64), per_channel.std(1), rtol=5e-3)
    assert abs(s["std"] - z.std().item()) < 5e-3
    assert abs(s["scaling_factor"] - 1 / z.std().item()) < 1e-2
    assert s["shift_factor"] == s["mean"]
