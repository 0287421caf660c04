import torch

from ldm_vae.model import LatentMoments, build_vae

from helpers.common import make_params


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


def _saved_vae(tmp_path, channels=4, sub=""):
    vae = build_vae(make_params(model={"latent_channels": channels}).model, sample_size=32)
    target = tmp_path / "pretrained"
    vae.save_pretrained(target / sub if sub else target)
    return vae, target


def test_init_from_starts_from_the_checkpoint_weights(tmp_path):
    torch.manual_seed(1)
    src, folder = _saved_vae(tmp_path, sub="vae")  # an SD-style repo folder: the VAE under vae/
    torch.manual_seed(2)
    vae = build_vae(make_params(model={"init_from": str(folder)}).model, sample_size=32)
    for (name, a), b in zip(src.state_dict().items(), vae.state_dict().values()):
        assert torch.equal(a, b), name


def test_init_from_with_other_channels_fails_unless_latent_layers_are_reinitialised(tmp_path):
    import pytest

    from ldm_vae.config import ParamError
    from ldm_vae.model import LATENT_LAYERS, check_init_from

    src, folder = _saved_vae(tmp_path)
    cfg = make_params(model={"init_from": str(folder), "latent_channels": 8}).model
    with pytest.raises(ParamError, match=r"model.latent_channels: 8 but model.init_from .* has 4; set "
                                         r"model.reinit_latent_layers: true"):
        check_init_from(cfg)
    cfg = make_params(model={"init_from": str(folder), "latent_channels": 8, "reinit_latent_layers": True}).model
    check_init_from(cfg)
    vae = build_vae(cfg, sample_size=32)
    assert vae.config.latent_channels == 8 and vae.quant_conv.weight.shape[0] == 16
    theirs = src.state_dict()
    for name, value in vae.state_dict().items():
        if not name.startswith(LATENT_LAYERS):
            assert torch.equal(value, theirs[name]), name  # everything else is the checkpoint's


def test_init_from_names_architecture_mismatches_and_missing_folders(tmp_path):
    import pytest

    from ldm_vae.config import ParamError
    from ldm_vae.model import check_init_from

    _, folder = _saved_vae(tmp_path)
    cfg = make_params(model={"init_from": str(folder), "block_out_channels": [8, 16, 16, 16]}).model
    with pytest.raises(
        ParamError, match=r"model.block_out_channels: \[8, 16, 16, 16\] but the checkpoint has \[8, 8, 16, 16\]"
    ):
        check_init_from(cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ParamError, match="without config.json"):
        check_init_from(make_params(model={"init_from": str(tmp_path / "empty")}).model)
    with pytest.raises(ParamError, match="no such folder, and not a hub id"):
        check_init_from(make_params(model={"init_from": "missing"}).model)
