"""The train stage with ``model.use_as_is``: a published VAE (SD, SDXL, SD3, FLUX ...) exported
unchanged, no training.

Its ``config.json`` and ``diffusion_pytorch_model.safetensors`` are copied byte for byte into
``data/vae``: its own architecture, ``scaling_factor`` / ``shift_factor``, ``force_upcast``,
``latents_mean`` / ``latents_std`` and every other key survive, because the diffusion models
trained on it expect them. Weights only as safetensors: a ``.bin`` would need unpickling.
The log folder gets what a trained run leaves there (the validation PSNR at step 0, a
reconstruction grid, metrics.json), so the stage's outputs and ``dvc plots show`` keep working.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL

from ..config import Params
from ..data import load_images
from ..files import atomic_path
from ..inputs import pretrained_location
from .training import VAL_IMAGES, validate_vae
from .trainlog import TrainLog

FILES = ("config.json", "diffusion_pytorch_model.safetensors")


def export_as_is(params: Params, val_shards: list[str], vae_dir: Path, log_dir: Path) -> dict:
    """Copy ``model.init_from`` into ``vae_dir``; score it on the validation images; the summary."""
    source = _local_folder(params.model.init_from)
    with atomic_path(Path(vae_dir)) as tmp:
        tmp.mkdir(parents=True)
        for name in FILES:
            shutil.copyfile(source / name, tmp / name)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    # it loads: the copy is a usable VAE; scored on the GPU when there is one
    vae = AutoencoderKL.from_pretrained(str(vae_dir)).to(accelerator.device).eval()
    _, val_images = load_images(val_shards, limit=VAL_IMAGES)  # [N, 3, H, W] in [-1, 1]
    rec_val, val_psnr = validate_vae(accelerator, vae, None, val_images)
    log = TrainLog(log_dir, True, resume_step=None)
    log.log(0, {"val/psnr": val_psnr})
    n = min(8, len(val_images))
    log.grid(0, val_images[:n], rec_val[:n])
    cfg = dict(vae.config)
    result = {"steps": 0, "val_psnr": round(val_psnr, 3), "used_as_is": params.model.init_from,
              "latent_channels": cfg["latent_channels"],
              "vae_scaling_factor": cfg.get("scaling_factor"), "vae_shift_factor": cfg.get("shift_factor") or 0.0}
    log.finish(result)
    return result


def _local_folder(init_from: str) -> Path:
    """The folder that holds the VAE's two files: local, or downloaded from the hub (online)."""
    repo, sub, revision = pretrained_location(init_from)
    folder = Path(repo)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        prefix = f"{sub}/" if sub else ""
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=[prefix + n for n in FILES]))
    folder = folder / sub if sub else folder
    missing = [n for n in FILES if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"model.init_from: {init_from!r} has no {', '.join(missing)} in {folder} (model.use_as_is copies the "
            "safetensors weights unchanged; a .bin file would have to be unpickled: convert it with "
            "AutoencoderKL.from_pretrained(...).save_pretrained(..., safe_serialization=True))")
    return folder
