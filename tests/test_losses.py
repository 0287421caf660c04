import torch

from ldm_vae.config import LossConfig
from ldm_vae.losses import VAELoss, kl_to_prior


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1).mean()
    assert torch.allclose(kl_to_prior(mean, logvar), expected, atol=1e-5)


def test_loss_combines_reconstruction_and_weighted_kl():
    x = torch.zeros(2, 3, 8, 8)
    rec = torch.full_like(x, 0.5)
    mean, logvar = torch.ones(2, 4, 1, 1), torch.zeros(2, 4, 1, 1)  # KL = 0.5 * 4 per image
    for kind, rec_value in (("l1", 0.5), ("l2", 0.25)):
        loss, logs = VAELoss(LossConfig(rec_loss=kind, kl_weight=0.1))(rec, x, mean, logvar)
        assert torch.isclose(loss, torch.tensor(rec_value + 0.1 * 2.0))
        assert torch.isclose(logs[f"train/rec_{kind}"], torch.tensor(rec_value))
        assert torch.isclose(logs["train/kl"], torch.tensor(2.0))


def test_loss_gradients_reach_both_reconstruction_and_posterior():
    rec = torch.zeros(1, 3, 8, 8, requires_grad=True)
    mean = torch.ones(1, 4, 1, 1, requires_grad=True)
    logvar = torch.zeros(1, 4, 1, 1, requires_grad=True)
    loss, _ = VAELoss(LossConfig(kl_weight=1e-2))(rec, torch.ones(1, 3, 8, 8), mean, logvar)
    loss.backward()
    assert rec.grad.abs().sum() > 0 and mean.grad.abs().sum() > 0


def test_log_l2_is_mean_log_mse_per_image_and_favours_smooth_images():
    x = torch.zeros(2, 3, 4, 4)
    rec = torch.zeros(2, 3, 4, 4, requires_grad=True)
    with torch.no_grad():
        rec[0] += 0.1  # MSE 0.01
        rec[1] += 0.5  # MSE 0.25
    loss, logs = VAELoss(LossConfig(rec_loss="log_l2", kl_weight=0.0))(rec, x, torch.zeros(2, 4, 1, 1),
                                                                      torch.zeros(2, 4, 1, 1))
    expected = (torch.log(torch.tensor(0.01 + 1e-4)) + torch.log(torch.tensor(0.25 + 1e-4))) / 2
    assert torch.isclose(loss, expected, atol=1e-5) and "train/rec_log_l2" in logs
    loss.backward()
    # Per pixel, the image with 25x less error gets a 5x larger gradient (L2 would give it 5x less).
    ratio = rec.grad[0].abs().mean() / rec.grad[1].abs().mean()
    assert 4.5 < ratio < 5.5
