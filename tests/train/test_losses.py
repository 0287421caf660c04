import pytest
import torch

from ldm_vae.config import LossConfig
from ldm_vae.lpips import LPIPS
from ldm_vae.model import TrainedAutoencoder, build_vae
from ldm_vae.train.discriminator import PatchDiscriminator, discriminator_loss
from ldm_vae.train.losses import VAELoss, adaptive_weight, kl_to_prior

from helpers.common import make_params


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1).mean()
    assert torch.allclose(kl_to_prior(mean, logvar), expected, atol=1e-5)


def test_loss_is_ldm_loss_over_pixel_count():
    """LDM: sum over pixels of the reconstruction + kl_weight * KL summed over latents, per image.
    Here both divided by 3*H*W, so kl_weight keeps LDM's meaning."""
    x = torch.zeros(2, 3, 8, 8)
    rec = torch.full_like(x, 0.5)
    mean, logvar = torch.ones(2, 4, 1, 1), torch.zeros(2, 4, 1, 1)  # KL = 0.5 * 4 per image
    for kind, rec_value in (("l1", 0.5), ("l2", 0.25)):
        loss, logs = VAELoss(LossConfig(rec_loss=kind, kl_weight=0.1))(rec, x, mean, logvar)
        ldm_loss = rec_value * 3 * 8 * 8 + 0.1 * 2.0  # per image, as LDM's LPIPSWithDiscriminator
        assert torch.isclose(loss, torch.tensor(ldm_loss / (3 * 8 * 8)))
        assert torch.isclose(logs[f"train/rec_{kind}"], torch.tensor(rec_value))
        assert torch.isclose(logs["train/kl"], torch.tensor(2.0))


def test_kl_annealing_ramps_the_weight_from_zero():
    loss_fn = VAELoss(LossConfig(kl_weight=1e-3, kl_anneal_steps=100))
    assert loss_fn.kl_scale(0) == 0.0 and loss_fn.kl_scale(50) == pytest.approx(5e-4)
    assert loss_fn.kl_scale(100) == loss_fn.kl_scale(10_000) == pytest.approx(1e-3)
    x, mean, logvar = torch.zeros(1, 3, 8, 8), torch.ones(1, 4, 1, 1), torch.zeros(1, 4, 1, 1)
    assert loss_fn(x, x, mean, logvar, step=0)[0] == 0.0 and loss_fn(x, x, mean, logvar, step=100)[0] > 0


def test_learned_output_logvar_gets_a_gradient_and_lowers_the_loss_where_errors_are_large():
    model = TrainedAutoencoder(build_vae(make_params().model, 16), logvar_init=0.0, learn_logvar=True)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    rec, mean, logvar, _ = model(x)
    loss, logs = VAELoss(LossConfig(rec_loss="l1", learn_logvar=True))(rec, x, mean, logvar, model.output_logvar)
    loss.backward()
    # d/ds (r e^-s + s) = 1 - r at s = 0: with a reconstruction error r < 1 it pushes s down.
    r = float(logs["train/rec_l1"])
    assert model.output_logvar.grad == pytest.approx(1 - r, rel=1e-4)


def test_perceptual_term_passes_gradients_into_the_decoder():
    torch.manual_seed(0)
    vae = build_vae(make_params().model, 16)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    lpips = LPIPS()  # random VGG weights: the gradient path is what is tested, not the values
    for lin in lpips.lins:
        lin.weight.data.abs_()  # the published lin weights are non-negative: a distance
    grads = {}
    for weight in (0.0, 1.0):
        vae.zero_grad()
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        loss_fn = VAELoss(LossConfig(perceptual_weight=weight), lpips if weight else None)
        loss, logs = loss_fn(rec, x, torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 2))
        loss.backward()
        grads[weight] = vae.decoder.conv_out.weight.grad.clone()
    assert logs["train/lpips"] > 0
    assert not torch.allclose(grads[0.0], grads[1.0])  # LPIPS moved the decoder's gradient
    assert all(p.grad is None for p in lpips.parameters())  # and the perceptual net stays frozen


def test_adaptive_weight_matches_hand_computation():
    """On y = w * x with a fixed linear 'discriminator' a: both gradient norms by hand."""
    w = torch.tensor([0.7, -1.3], requires_grad=True)
    x, t, a = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5]), torch.tensor([0.3, -0.2])
    y = w * x
    nll = ((y - t) ** 2).mean()
    adv = -(a * y).mean()
    g_nll = 2 * (w.detach() * x - t) * x / 2  # d/dw mean((wx - t)^2)
    g_adv = -a * x / 2
    expected = g_nll.norm() / (g_adv.norm() + 1e-4)
    got = adaptive_weight(nll, adv, w)
    assert torch.isclose(got, expected) and not got.requires_grad
    # Clamped: a vanishing adversarial gradient does not blow the weight up past 1e4.
    assert adaptive_weight(nll, 0 * adv + 1e-12 * w.sum(), w) == 1e4


def test_generator_loss_adds_adaptively_weighted_adversarial_term_after_disc_start():
    torch.manual_seed(0)
    model = TrainedAutoencoder(build_vae(make_params().model, 16))
    disc = PatchDiscriminator(channels=8, layers=2)
    cfg = LossConfig(disc_weight=0.5, disc_start=10)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    rec, mean, logvar, _ = model(x)
    before, logs = VAELoss(cfg)(rec, x, mean, logvar, step=9, disc=disc, last_layer=model.last_layer)
    assert "train/g_adv" not in logs
    after, logs = VAELoss(cfg)(rec, x, mean, logvar, step=10, disc=disc, last_layer=model.last_layer)
    assert torch.isclose(after - before, logs["train/d_weight"] * logs["train/g_adv"], atol=1e-6)
    assert logs["train/d_weight"] > 0


def test_hinge_and_vanilla_discriminator_losses():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # hinge: relu(1 - real) = [0, 0.5], relu(1 + fake) = [0, 1]
    assert discriminator_loss("hinge", real, fake) == pytest.approx(0.5 * (0.25 + 0.5))
    sp = torch.nn.functional.softplus
    assert discriminator_loss("vanilla", real, fake) == pytest.approx(
        float(0.5 * (sp(-real).mean() + sp(fake).mean())))


def test_patch_discriminator_gives_a_logit_per_patch():
    d = PatchDiscriminator(channels=16, layers=3)
    assert d(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)  # pix2pix's 70x70 patches at 64 px


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


def test_free_bits_charge_each_channel_at_least_its_floor_and_free_those_below():
    from ldm_vae.train.losses import free_bits_kl

    mean = torch.zeros(2, 3, 4, 4, requires_grad=True)
    with torch.no_grad():
        mean[:, 0] = 2.0  # channel 0: 2 nats per element; channels 1, 2: at the prior (0)
    logvar = torch.zeros(2, 3, 4, 4)
    assert torch.isclose(free_bits_kl(mean, logvar, 0.0), kl_to_prior(mean, logvar))  # no floor: the plain KL
    charged = free_bits_kl(mean, logvar, 0.5)
    assert torch.isclose(charged, torch.tensor((2.0 + 0.5 + 0.5) * 16))  # per element x 16 elements
    charged.backward()
    assert mean.grad[:, 0].abs().sum() > 0 and mean.grad[:, 1:].abs().sum() == 0  # below the floor: free
    cfg = LossConfig(kl_weight=1.0, free_bits=0.5)
    x = torch.zeros(2, 3, 32, 32)
    loss, logs = VAELoss(cfg)(x, x, mean.detach(), logvar)
    assert torch.isclose(loss, charged.detach() / (3 * 32 * 32)) and torch.isclose(
        logs["train/kl"], kl_to_prior(mean, logvar)
    )


def test_scale_equivariance_matches_the_downsampled_decoding_to_the_downsampled_image():
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = TrainedAutoencoder(build_vae(make_params().model, 32))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    rec, mean, logvar, rec_down = model(x, down=True)
    assert rec_down.shape == (2, 3, 16, 16) and model(x)[3] is None
    cfg = LossConfig(rec_loss="l2", scale_equivariance=0.25)
    loss, logs = VAELoss(cfg)(rec, x, mean, logvar, rec_down=rec_down)
    se = (rec_down - F.avg_pool2d(x, 2)).pow(2).mean()
    assert torch.isclose(logs["train/scale_equivariance"], se)
    plain, _ = VAELoss(LossConfig(rec_loss="l2"))(rec, x, mean, logvar)
    assert torch.isclose(loss, plain + 0.25 * se)
    loss.backward()  # the term trains the encoder too: it decodes the encoder's own latent
    assert model.vae.encoder.conv_in.weight.grad.abs().sum() > 0
