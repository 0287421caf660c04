"""A small, complete latent diffusion trainer on this pipeline's latent shards.

It trains a diffusers ``UNet2DModel`` (class-conditional when the shards carry integer labels) to
predict the noise of DDPM on the stored latents, on one process or many (DDP through accelerate),
then samples a grid with the trained model and decodes it with the exported VAE.

    python examples/train_diffusion.py --steps 2000                         # one process
    accelerate launch --num_processes 8 examples/train_diffusion.py ...     # DDP, one process a GPU
    python examples/train_diffusion.py --size-cond ...                      # buckets + SDXL size conditioning

With ``--size-cond`` (latents prepared with ``data.crop: bucket``) the batches come in several
shapes, one each, and the UNet is conditioned the way SDXL is: the six numbers original_size,
crop_top_left and target_size, each a sinusoidal embedding, concatenated and projected, added to
the timestep embedding (SDXL's ``add_time_ids``; diffusers' UNet2DModel takes it as an identity
class embedding).

What it relies on from ldm_vae: ``latent_loader`` (every rank the same number of full batches per
epoch, ``drop_last``; ``set_epoch`` reshuffles) and ``decode_latents`` (undoes the loader's
normalisation, then the VAE decodes). Everything else is plain torch, diffusers and accelerate.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from PIL import Image

from ldm_vae import decode_latents, latent_loader


def build_unet(channels: int, size: int, widths: list[int], classes: int, embedding_in: bool = False) -> UNet2DModel:
    """A UNet over [C, h, w] latents (h, w multiples of 2^(len(widths) - 1)); attention at the lowest
    resolution. ``embedding_in``: it takes a ready embedding as class_labels (size conditioning)."""
    down = ["DownBlock2D"] * (len(widths) - 1) + ["AttnDownBlock2D"]
    up = ["AttnUpBlock2D"] + ["UpBlock2D"] * (len(widths) - 1)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=widths,
                       layers_per_block=2, down_block_types=down, up_block_types=up,
                       norm_num_groups=min(32, widths[0]), num_class_embeds=classes or None,
                       class_embed_type="identity" if embedding_in else None)


class SizeConditioned(torch.nn.Module):
    """A UNet2DModel with SDXL's micro-conditioning: time_ids [B, 6] (original_size, crop_top_left,
    target_size) -> a sinusoid of 256 channels each -> [B, 1536] -> the timestep embedding's width,
    added to it (and a class embedding, when ``classes``)."""

    def __init__(self, unet: UNet2DModel, classes: int):
        super().__init__()
        dim = unet.time_embedding.linear_2.out_features
        self.unet, self.proj = unet, Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.embed = TimestepEmbedding(6 * 256, dim)
        self.classes = torch.nn.Embedding(classes, dim) if classes else None

    def forward(self, z, t, time_ids, labels=None):
        emb = self.embed(self.proj(time_ids.flatten()).reshape(len(time_ids), -1).to(z.dtype))  # [B, dim]
        if self.classes is not None:
            emb = emb + self.classes(labels)
        return self.unet(z, t, class_labels=emb)


def denoise(model, z, t, labels, ids):
    """The noise prediction of either model: the plain UNet or the size-conditioned one."""
    if ids is not None:
        return model(z, t, ids, labels).sample
    return model(z, t, class_labels=labels).sample


@torch.no_grad()
def sample(unet, scheduler: DDPMScheduler, n: int, shape: list[int], labels, steps: int, seed: int,
           ids=None) -> torch.Tensor:
    """n latents [n, C, h, w] in the loader's normalisation, by ``steps`` DDPM steps."""
    g = torch.Generator().manual_seed(seed)
    device = next(unet.parameters()).device
    z = torch.randn((n, *shape), generator=g).to(device)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        eps = denoise(unet, z, t, labels, ids)
        z = scheduler.step(eps, t, z, generator=g).prev_sample
    return z


def save_image_grid(images: torch.Tensor, path: Path) -> None:
    """[N, 3, H, W] in [0, 1] -> one PNG, as square a grid as N allows."""
    n, _, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * h, cols * w, 3), 255, np.uint8)
    arr = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # [N, H, W, 3]
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = arr[i]
    Image.fromarray(grid).save(path)


def train_loop(accelerator, unet, opt, scheduler: DDPMScheduler, loader, steps: int, classes: int,
               size_cond: bool = False) -> list[float]:
    """``steps`` optimizer steps of epsilon prediction, epoch by epoch; the loss of each (mean over ranks)."""
    step, epoch, losses = 0, 0, []
    while step < steps:
        loader.set_epoch(epoch)  # a new order, the same on every rank
        before = step
        for batch in loader:
            z0 = batch["latent"].to(accelerator.device)  # [B, C, h, w], ~N(0, 1) per channel
            labels = batch["label"].to(accelerator.device) if classes else None
            noise = torch.randn_like(z0)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (z0.shape[0],), device=z0.device)
            ids = batch["time_ids"].float().to(z0.device) if size_cond else None  # [B, 6], SDXL's add_time_ids
            pred = denoise(unet, scheduler.add_noise(z0, noise, t), t, labels, ids)
            loss = torch.nn.functional.mse_loss(pred, noise)
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(accelerator.reduce(loss.detach(), "mean").item())
            step += 1
            if accelerator.is_main_process and (step % 50 == 0 or step == steps):
                print(f"step {step}: loss {np.mean(losses[-50:]):.4f}", flush=True)
            if step == steps:
                break
        epoch += 1
        if step == before:
            raise SystemExit("the loader gave no full batch: fewer latents per process and loader worker "
                             "than --batch-size; lower it or --num-workers")
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latents", type=Path, default=Path("data/latents"), help="the encode stage's output")
    ap.add_argument("--vae", type=Path, default=Path("data/vae"), help="the exported VAE (for the sample grid)")
    ap.add_argument("--out", type=Path, default=Path("diffusion-run"))
    ap.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=64, help="per process")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 128], help="UNet block widths")
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--classes", type=int, default=0,
                    help="class-conditional on the shards' integer labels 0..N-1 (0: unconditional)")
    ap.add_argument("--size-cond", action="store_true",
                    help="SDXL size conditioning (for bucketed latents: batches of several shapes)")
    args = ap.parse_args()

    accelerator = Accelerator()
    torch.manual_seed(args.seed)
    stats = json.loads((args.latents / "stats.json").read_text())
    channels, h, w = stats["latent_shape"]
    loader = latent_loader(str(args.latents / "train" / "*.tar"), stats=args.latents / "stats.json",
                           batch_size=args.batch_size, num_workers=args.num_workers, drop_last=True,
                           normalize="channel", sample_posterior=True, flip=True, seed=args.seed)
    classes = args.classes
    unet = build_unet(channels, h, args.widths, 0 if args.size_cond else classes, args.size_cond)
    if args.size_cond:
        unet = SizeConditioned(unet, classes)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    unet, opt = accelerator.prepare(unet, opt)  # DDP; the loader splits the data by rank itself
    scheduler = DDPMScheduler(num_train_timesteps=1000)

    losses = train_loop(accelerator, unet, opt, scheduler, loader, args.steps, classes, args.size_cond)
    if accelerator.is_main_process:
        args.out.mkdir(parents=True, exist_ok=True)
        net = accelerator.unwrap_model(unet).eval()
        labels = torch.arange(args.samples, device=accelerator.device) % classes if classes else None
        # The most common shape; with size conditioning, SDXL's neutral ids: uncropped, at that size.
        ids = torch.tensor([[8 * h, 8 * w, 0, 0, 8 * h, 8 * w]] * args.samples, dtype=torch.float) \
            if args.size_cond else None
        z = sample(net, scheduler, args.samples, [channels, h, w], labels, args.sample_steps, args.seed,
                   None if ids is None else ids.to(accelerator.device))
        vae = AutoencoderKL.from_pretrained(args.vae)
        images = decode_latents(vae, z.cpu(), "channel", args.latents / "stats.json")  # [N, 3, H, W] in [0, 1]
        save_image_grid(images, args.out / "samples.png")
        (net.unet if args.size_cond else net).save_pretrained(args.out / "unet")
        if args.size_cond:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in net.state_dict().items() if not k.startswith("unet.")},
                      args.out / "size_embedding.safetensors")
        (args.out / "loss.json").write_text(json.dumps({"step": list(range(1, len(losses) + 1)), "loss": losses}))
        print(f"wrote {args.out}/samples.png and {args.out}/unet", flush=True)


if __name__ == "__main__":
    main()
