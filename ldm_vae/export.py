"""Export the trained autoencoder in diffusers format with its latent scale measured on data.

``AutoencoderKL.from_pretrained(vae_dir)`` loads the result with no project code. The config's
``scaling_factor`` and ``shift_factor`` follow SD3: ``z_model = (z - shift_factor) * scaling_factor``
has zero mean and unit variance over the training images (posterior samples, not means).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, VQModel

from .files import atomic_path
from .model import LatentMoments
from .vq import histogram_stats


@torch.inference_mode()
def measure_moments(vae: AutoencoderKL, images: torch.Tensor, batch_size: int) -> LatentMoments:
    """Posterior moments of ``vae`` over ``images`` ([N, 3, H, W] in [-1, 1])."""
    device = next(vae.parameters()).device
    vae.eval()
    moments = LatentMoments(vae.config.latent_channels)
    for i in range(0, len(images), batch_size):
        post = vae.encode(images[i : i + batch_size].to(device)).latent_dist
        moments.update(post.mean.float().cpu(), post.std.float().cpu())  # [B, C, h, w] each
    return moments


def export_vae(vae: AutoencoderKL, images: torch.Tensor, out: Path, batch_size: int = 64) -> dict:
    """Measure the latent scale on ``images``, store it in the config, save_pretrained to ``out``."""
    stats = measure_moments(vae, images, batch_size).summary()
    vae.register_to_config(scaling_factor=stats["scaling_factor"], shift_factor=stats["shift_factor"])
    with atomic_path(out) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
        (tmp / "latent_stats.json").write_text(json.dumps({**stats, "num_images": len(images)}, indent=2) + "\n")
    return {"scaling_factor": stats["scaling_factor"], "shift_factor": stats["shift_factor"]}


@torch.inference_mode()
def export_vq(vae: VQModel, images: torch.Tensor, out: Path, batch_size: int = 64) -> dict:
    """A VQModel: its quantised latents' spread on ``images`` as ``scaling_factor`` (1 / std: LDM's
    VQ diffusion scales the same way) and the images' code histogram, then save_pretrained."""
    device = next(vae.parameters()).device
    vae.eval()
    k = vae.config.num_vq_embeddings
    counts = torch.zeros(k, dtype=torch.float64)
    moments = LatentMoments(vae.config.vq_embed_dim)
    for i in range(0, len(images), batch_size):
        h = vae.encode(images[i : i + batch_size].to(device)).latents  # [B, D, h, w]
        z, _, (_, _, idx) = vae.quantize(h)  # z: [B, D, h, w]; idx: [B h w]
        counts += torch.bincount(idx.flatten().cpu(), minlength=k).double()
        moments.update(z.float().cpu(), torch.zeros_like(z, dtype=torch.float32).cpu())
    stats = moments.summary()
    vae.register_to_config(scaling_factor=stats["scaling_factor"])
    with atomic_path(out) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
        (tmp / "latent_stats.json").write_text(json.dumps({**stats, "num_images": len(images),
                                                           **histogram_stats(counts, k)}, indent=2) + "\n")
    return {"scaling_factor": stats["scaling_factor"], "shift_factor": 0.0}


def load_vae(vae_dir: Path, device: str | torch.device = "cpu") -> AutoencoderKL | VQModel:
    """The exported autoencoder: an AutoencoderKL, or a VQModel (model.regularizer: vq)."""
    cls = VQModel if AutoencoderKL.load_config(str(vae_dir)).get("_class_name") == "VQModel" else AutoencoderKL
    return cls.from_pretrained(str(vae_dir)).to(device).eval()
