"""The latent shards feed a real diffusion model: a tiny UNet learns to denoise them."""

import itertools

import torch
from diffusers import DDPMScheduler, UNet2DModel

from conftest import make_params
from ldm_vae.encode.encoding import run_encode
from ldm_vae.export import load_vae
from ldm_vae.loader import latent_loader


def test_tiny_unet_denoising_loss_drops_on_the_latent_shards(pipeline_dir, tmp_path):
    stats = run_encode(load_vae(pipeline_dir / "vae"), pipeline_dir / "prepared", tmp_path, make_params().encode)
    c, h, _ = stats["latent_shape"]
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=h, in_channels=c, out_channels=c, block_out_channels=(32, 64), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    sched = DDPMScheduler(num_train_timesteps=1000)
    loader = latent_loader(str(tmp_path / "train" / "*.tar"), batch_size=16, num_workers=2,
                           stats=tmp_path / "stats.json", resampled=True, shuffle=100)
    batches = iter(loader)

    # A fixed held-out batch with fixed noise and timesteps: the loss before and after training.
    g = torch.Generator().manual_seed(1)
    z_eval = torch.cat([next(batches)["latent"] for _ in range(2)])  # [32, C, h, w]
    noise_eval = torch.randn(z_eval.shape, generator=g)
    t_eval = torch.randint(0, 1000, (z_eval.shape[0],), generator=g)

    def eval_loss():
        with torch.no_grad():
            pred = unet(sched.add_noise(z_eval, noise_eval, t_eval), t_eval).sample
        return torch.nn.functional.mse_loss(pred, noise_eval).item()

    before = eval_loss()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    for batch in itertools.islice(batches, 60):
        z0 = batch["latent"]  # [B, C, h, w], normalised per channel
        noise = torch.randn_like(z0)
        t = torch.randint(0, 1000, (z0.shape[0],))
        loss = torch.nn.functional.mse_loss(unet(sched.add_noise(z0, noise, t), t).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.8 * before, (before, after)
