"""The train stage's loop: accelerate, EMA, warm-up + cosine LR, clipping, checkpoints, logs.

Outputs (paths come from the stage command):
  vae_dir/          diffusers save_pretrained of the (EMA) autoencoder, with measured latent scale
  log_dir/          loss.csv and val.csv (dvc plots), metrics.json, samples/step-*.png
  ckpt_dir/         accelerate save_state folders tagged with the hash of the training params
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from .config import Params, stage_hash, stage_hash_of
from .data import load_images, train_stream
from .export import export_vae
from .losses import VAELoss
from .metrics import psnr, to_unit
from .model import build_vae
from .viz import save_grid

VAL_IMAGES = 128  # fixed validation images scored during training (the full set is evaluate's job)
KEEP_CHECKPOINTS = 2


class _Progress:
    """The step counter, checkpointed with the models so a resumed run knows where it is."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = int(state["step"])


def lr_lambda(cfg):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def train(params: Params, train_shards: list[str], val_shards: list[str], vae_dir: Path, log_dir: Path,
          ckpt_dir: Path) -> dict:
    tcfg = params.train
    accelerator = Accelerator(
        mixed_precision=tcfg.mixed_precision, cpu=not torch.cuda.is_available()
    )
    set_seed(tcfg.seed, device_specific=True)
    # What shapes the run: its params and the exact training data (shard names and sizes).
    data_id = [(Path(p).name, Path(p).stat().st_size) for p in train_shards]
    run_hash = stage_hash(params.model, params.loss, tcfg) + "-" + stage_hash_of(data_id)
    _, val_images = load_images(val_shards, limit=VAL_IMAGES)  # [N, 3, H, W]

    vae = build_vae(params.model, sample_size=val_images.shape[-1])
    optimizer = torch.optim.AdamW(
        vae.parameters(), lr=tcfg.lr, betas=(0.9, tcfg.adam_beta2), weight_decay=tcfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg))
    vae, optimizer, scheduler = accelerator.prepare(vae, optimizer, scheduler)
    ema = None
    if tcfg.ema_decay > 0:
        ema = EMAModel(accelerator.unwrap_model(vae).parameters(), decay=tcfg.ema_decay)
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    progress = _Progress()
    accelerator.register_for_checkpointing(progress)
    resumed = _resume(accelerator, ckpt_dir, run_hash)

    loader = torch.utils.data.DataLoader(
        train_stream(train_shards, seed=tcfg.seed, crop=tcfg.crop_size, color_augment=tcfg.color_augment,
                     fade_augment=tcfg.fade_augment),
        batch_size=tcfg.batch_size,
        num_workers=tcfg.num_workers,
        persistent_workers=tcfg.num_workers > 0,
    )
    loss_fn = VAELoss(params.loss)
    logger = _CsvLogs(log_dir, accelerator.is_main_process, append=resumed)

    batches = iter(loader)
    bar = tqdm(total=tcfg.max_steps, initial=progress.step, desc="train", unit="step",
               disable=not accelerator.is_main_process, dynamic_ncols=True)
    t_start = time.perf_counter()
    t_window, images_window = time.perf_counter(), 0
    val_psnr = float("nan")
    while progress.step < tcfg.max_steps:
        x = next(batches).to(accelerator.device)  # [B, 3, H, W] in [-1, 1]
        vae.train()
        with accelerator.autocast():
            posterior = vae.encode(x).latent_dist  # through the prepared module: DDP hooks run
            rec = vae.decode(posterior.sample()).sample
            loss, logs = loss_fn(rec, x, posterior.mean, posterior.logvar)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(vae.parameters(), tcfg.grad_clip or float("inf"))
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.step(accelerator.unwrap_model(vae).parameters())
        progress.step += 1
        images_window += x.shape[0] * accelerator.num_processes
        step = progress.step

        if step % tcfg.log_every == 0 or step == tcfg.max_steps:
            logs = {k: accelerator.reduce(v, "mean").item() for k, v in logs.items()}
            now = time.perf_counter()
            logs.update({"train/lr": scheduler.get_last_lr()[0], "train/grad_norm": float(grad_norm),
                         "train/images_per_s": images_window / max(now - t_window, 1e-9)})
            t_window, images_window = now, 0
            logger.train(step, logs)
            bar.set_postfix(loss=f"{logs['train/loss']:.4f}", val_psnr=f"{val_psnr:.2f}")
        if step % tcfg.val_every == 0 or step == tcfg.max_steps:
            with _ema_weights(accelerator, vae, ema):
                rec_val = _reconstruct(accelerator, vae, val_images)
            val_psnr = float(psnr(to_unit(rec_val), to_unit(val_images)).mean())
            logger.val(step, {"val/psnr": val_psnr})
            if step % tcfg.sample_every == 0 or step == tcfg.max_steps:
                n = min(8, len(val_images))
                logger.grid(step, val_images[:n], rec_val[:n])
        if step % tcfg.checkpoint_every == 0 and step < tcfg.max_steps:
            _checkpoint(accelerator, ckpt_dir, run_hash, step)
        bar.update(1)
    bar.close()

    accelerator.wait_for_everyone()
    train_seconds = time.perf_counter() - t_start
    result = {}
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(vae)
        if ema is not None:
            ema.copy_to(model.parameters())  # the exported weights are the EMA weights
        _, scale_images = load_images(train_shards, limit=tcfg.scale_samples)
        factors = export_vae(model, scale_images, vae_dir)
        result = {"steps": progress.step, "train_seconds": round(train_seconds, 1),
                  "val_psnr": round(val_psnr, 3), "resumed": resumed, **factors}
        (log_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        _checkpoint(accelerator, ckpt_dir, run_hash, progress.step)
    accelerator.wait_for_everyone()
    return result


@torch.inference_mode()
def _reconstruct(accelerator, vae, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    model = accelerator.unwrap_model(vae)
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(accelerator.device)
        with accelerator.autocast():
            out.append(model(x, sample_posterior=False).sample.float().clamp(-1, 1).cpu())
    return torch.cat(out)


class _ema_weights:
    """Swap the EMA weights in for validation, then put the training weights back."""

    def __init__(self, accelerator, vae, ema):
        self.params = list(accelerator.unwrap_model(vae).parameters())
        self.ema = ema

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)

    def __exit__(self, *_):
        if self.ema is not None:
            self.ema.restore(self.params)


def _checkpoint(accelerator, ckpt_dir: Path, run_hash: str, step: int) -> None:
    target = ckpt_dir / f"step-{step:08d}"
    accelerator.save_state(str(target))
    if accelerator.is_main_process:
        # The tag is written last: a folder without it is an interrupted save and is never resumed.
        (target / "run.json").write_text(json.dumps({"params_hash": run_hash, "step": step}))
        for old in sorted(ckpt_dir.glob("step-*"))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _resume(accelerator, ckpt_dir: Path, run_hash: str) -> bool:
    """Load the newest complete checkpoint written under the same params; True if one was."""
    for folder in sorted(ckpt_dir.glob("step-*"), reverse=True):
        tag = folder / "run.json"
        if tag.exists() and json.loads(tag.read_text()).get("params_hash") == run_hash:
            accelerator.load_state(str(folder))
            accelerator.print(f"resumed from {folder}")
            return True
    if accelerator.is_main_process and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)  # written under other params: never resumed, so not kept
    accelerator.wait_for_everyone()
    return False


class _CsvLogs:
    """loss.csv / val.csv for `dvc plots`, plus sample grids; only the main process writes."""

    def __init__(self, log_dir: Path, enabled: bool, append: bool):
        self.dir = Path(log_dir)
        self.enabled = enabled
        if enabled:
            if not append:
                shutil.rmtree(self.dir, ignore_errors=True)
            (self.dir / "samples").mkdir(parents=True, exist_ok=True)

    def _row(self, name: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        path = self.dir / name
        row = {"step": step, **{k.split("/", 1)[-1]: round(float(v), 6) for k, v in values.items()}}
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def train(self, step, values):
        self._row("loss.csv", step, values)

    def val(self, step, values):
        self._row("val.csv", step, values)

    def grid(self, step, originals, recs):
        if self.enabled:
            save_grid([originals, recs], self.dir / "samples" / f"step-{step:08d}.png")
