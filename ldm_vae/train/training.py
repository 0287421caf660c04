"""The train stage's loop: the LDM objective under accelerate, on one process or many (DDP).

Per optimizer step, for each of ``train.grad_accum_steps`` micro-batches (gradients synced on the
last only): the autoencoder's loss (reconstruction, LPIPS, KL, adversarial with the adaptive
weight) through the prepared module, the discriminator frozen; then, once ``loss.disc_start`` is
reached, the discriminator's hinge loss on detached reconstructions. Then clipping, a NaN/inf
guard (a non-finite gradient skips the step; ``train.max_bad_steps`` in a row stop the run), both
optimizers, LR warm-up + cosine, EMA. Checkpoints every ``train.checkpoint_every`` steps.

Under ``train.mixed_precision: fp16`` one GradScaler serves both optimizers, as PyTorch's AMP
recipe for several optimizers has it: each optimizer's gradients are unscaled once, both are
clipped, then both step and the scale is updated once. A scaler overflow is skipped with the scale
lowered and counted apart from bad steps (ldm_vae/precision.py).

Outputs (paths come from the stage command):
  vae_dir/    diffusers save_pretrained of the (EMA) autoencoder, with measured latent scale
  log_dir/    dvclive curves, metrics.json, samples/step-*.png (trainlog.py)
  ckpt_dir/   accelerate save_state folders tagged with the hash of the training params
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from ..code_deps import imported_closure
from ..config import Params, stage_hash, stage_hash_of
from ..data import load_images, train_stream
from ..export import export_vae, export_vq
from ..inputs import fingerprint, pretrained_location
from ..launch import available_cores, cpu_threads_per_process, environment
from ..metrics import psnr, to_unit
from ..model import TrainedAutoencoder, build_vae, is_vq, reconstruct
from ..precision import is_overflow, set_tf32
from ..vq import build_quantizer
from .checkpoints import Progress, resume_latest, save_checkpoint
from .losses import VAELoss, build_discriminator, reconstruction_loss
from .trainlog import TrainLog

VAL_IMAGES = 128  # fixed validation images scored during training (the full set is evaluate's job)


class TrainingDiverged(RuntimeError):
    pass


def lr_lambda(cfg):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


# The train stage's own code: what its script runs (the loop, as_is, LPIPS) and every ldm_vae module
# those import (code_deps's walk: dvc.yaml's deps of train are the same set, a test checks). Editing
# anything else (the URL downloader, the evaluator, the Ray engine) keeps checkpoints.
TRAIN_ENTRIES = ("train/training", "train/as_is", "lpips")


def train_code() -> tuple[str, ...]:
    names = set().union(*(imported_closure(e) for e in TRAIN_ENTRIES))
    return tuple(sorted(n for n in names if n != "config" and not n.endswith("__init__")))


def run_hash(params: Params, train_shards: list[str]) -> str:
    """What shapes a run: its model/loss/train params, the exact training data (names, sizes), the
    train stage's code, and a local model.init_from's files (a hub id is pinned to its commit in the
    params already). With the code in it, a run re-done by ``dvc repro`` because the training code
    changed starts afresh instead of resuming (or re-exporting) what the old code trained; with the
    init_from files, so does a run whose starting weights were overwritten in place."""
    data_id = [(Path(p).name, Path(p).stat().st_size) for p in train_shards]
    here = Path(__file__).parents[1]  # ldm_vae/
    code = [(name, hashlib.sha256((here / f"{name}.py").read_bytes()).hexdigest()) for name in train_code()]
    init = params.model.init_from
    start = fingerprint(init, "model.init_from") if init and pretrained_location(init).local else {}
    return "-".join([stage_hash(params.model, params.loss, params.train), stage_hash_of(data_id),
                     stage_hash_of([code, start])])


def train(params: Params, train_shards: list[str], val_shards: list[str], vae_dir: Path, log_dir: Path,
          ckpt_dir: Path, perceptual: torch.nn.Module | None = None, on_step=None) -> dict:
    """Train, export the (EMA) VAE; the summary dict on the main process, {} on the others.

    ``perceptual``: the LPIPS net when loss.perceptual_weight > 0 (the stage loads it, see lpips.py).
    ``on_step(step, batch, accelerator, model)``: called after every optimizer step (tests, benches).
    """
    tcfg = params.train
    accelerator = make_accelerator(tcfg)
    if not torch.cuda.is_available():  # the weights depend on the thread count: fixed, a run repeats
        torch.set_num_threads(cpu_threads_per_process(tcfg.cpu_threads, accelerator.num_processes))
    elif tcfg.num_workers * accelerator.num_processes > available_cores():
        accelerator.print(f"train: {tcfg.num_workers} loader workers x {accelerator.num_processes} GPU processes on "
                          f"{available_cores()} cores: the workers share cores; train.num_workers of about "
                          f"{max(1, available_cores() // accelerator.num_processes - 1)} fits this node (docs/gpu.md)")
    # The order of what follows is the order of the random draws (weights, then the loader's
    # worker seeds after a resume restored the RNG): changing it changes every trained VAE.
    set_seed(tcfg.seed, device_specific=True)  # per-rank posterior noise; weights come from rank 0
    tag = run_hash(params, train_shards)
    _, val_images = load_images(val_shards, limit=VAL_IMAGES)  # [N, 3, H, W]
    run = _Trainer(params, accelerator, sample_size=val_images.shape[-1])
    resumed = resume_latest(accelerator, ckpt_dir, tag, run.progress, run.ema)
    loader = torch.utils.data.DataLoader(
        train_stream(train_shards, seed=tcfg.seed, crop=tcfg.crop_size, color_augment=tcfg.color_augment,
                     fade_augment=tcfg.fade_augment, cache_mb=tcfg.cache_mb),
        batch_size=tcfg.batch_size, num_workers=tcfg.num_workers, persistent_workers=tcfg.num_workers > 0,
        # page-locked batches: the copy to the GPU runs asynchronously (accumulate's non_blocking)
        pin_memory=accelerator.device.type == "cuda",
    )
    run.start(perceptual, TrainLog(log_dir, accelerator.is_main_process,
                                   resume_step=run.progress.step if resumed else None))
    batches = iter(loader)
    bar = tqdm(total=tcfg.max_steps, initial=run.progress.step, desc="train", unit="step",
               disable=not accelerator.is_main_process, dynamic_ncols=True)
    run.start_clock()
    while run.progress.step < tcfg.max_steps:
        step = run.progress.step + 1  # the optimizer step this iteration makes
        log_now = step % tcfg.log_every == 0 or step == tcfg.max_steps
        x, logs = run.accumulate(batches, log_now)
        if not run.optimizer_step(logs):
            continue  # a non-finite gradient: skipped, the same batch count is drawn again
        if on_step is not None:
            on_step(step, x, accelerator, run.model)
        if log_now:
            bar.set_postfix(loss=f"{run.log_train(step, logs):.4f}", val_psnr=f"{run.val_psnr:.2f}")
        if step % tcfg.val_every == 0 or step == tcfg.max_steps:
            run.validate(step, val_images, grid=step % tcfg.sample_every == 0 or step == tcfg.max_steps)
        if step % tcfg.checkpoint_every == 0 and step < tcfg.max_steps:
            run.checkpoint(ckpt_dir, tag)
        bar.update(1)
    bar.close()
    accelerator.wait_for_everyone()
    run.stop_clock()
    result = run.export(vae_dir, val_images, train_shards, resumed) if accelerator.is_main_process else {}
    run.save(ckpt_dir, tag)
    return result


def make_accelerator(tcfg) -> Accelerator:
    """The run's Accelerator: its mixed precision, the GPU when there is one, TF32 as
    ``train.tf32`` says (tests/gpu_imitation.py wraps this to imitate a GPU's fp16 on the CPU)."""
    set_tf32(tcfg.tf32)
    return Accelerator(
        mixed_precision=tcfg.mixed_precision, cpu=not torch.cuda.is_available(),
        # The schedule is written in optimizer steps; by default accelerate would step it once per
        # process per call, so 8 GPUs would run the warm-up and the cosine 8x too fast.
        step_scheduler_with_optimizer=False,
    )


class _Trainer:
    """One run's state and its steps: the prepared autoencoder and discriminator, their optimizers
    and schedules, the EMA, the step counter, the loss and the log. ``train`` drives it."""

    def __init__(self, params: Params, accelerator: Accelerator, sample_size: int):
        self.params, self.accelerator = params, accelerator
        self.tcfg, lcfg = params.train, params.loss
        vae = build_vae(params.model, sample_size=sample_size)
        quantizer = build_quantizer(params) if is_vq(vae) else None
        model = TrainedAutoencoder(vae, lcfg.logvar_init, lcfg.learn_logvar, quantizer)
        disc = build_discriminator(lcfg)
        opt_ae, opt_d = build_optimizers(model, disc, params)
        sched_ae = torch.optim.lr_scheduler.LambdaLR(opt_ae, lr_lambda(self.tcfg))
        sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lr_lambda(self.tcfg)) if disc is not None else None
        if disc is not None:
            model, disc, opt_ae, opt_d, sched_ae, sched_d = accelerator.prepare(
                model, disc, opt_ae, opt_d, sched_ae, sched_d
            )
        else:
            model, opt_ae, sched_ae = accelerator.prepare(model, opt_ae, sched_ae)
        self.model, self.disc, self.opt_ae, self.opt_d = model, disc, opt_ae, opt_d
        self.sched_ae, self.sched_d = sched_ae, sched_d
        self.inner = accelerator.unwrap_model(model)
        self.ae_params = [p for p in model.parameters() if p.requires_grad]
        self.ema = None
        if self.tcfg.ema_decay > 0:
            self.ema = EMAModel(self.inner.vae.parameters(), decay=self.tcfg.ema_decay)
            self.ema.to(accelerator.device)
        # Not registered with accelerate: it would pickle them (and unpickle on resume); they are
        # saved as safetensors and JSON beside its files instead.
        self.progress = Progress()
        self.val_psnr = float("nan")
        self.bad_in_row = 0
        self.loss_finite = torch.ones((), dtype=torch.bool)  # every micro-batch's loss this step, this rank
        self.codebook = None  # a VQ codebook's state before this step's forwards (restored on a skip)
        self.norms = (torch.zeros(()), torch.zeros(()))  # the last step's gradient norms (ae, disc)

    def start(self, perceptual: torch.nn.Module | None, log: TrainLog) -> None:
        self.loss_fn = VAELoss(
            self.params.loss, perceptual.to(self.accelerator.device) if perceptual is not None else None
        )
        self.log = log

    def start_clock(self) -> None:
        """Time spent before a resume is in ``progress.seconds`` already."""
        self.t_start = self.t_window = time.perf_counter()
        self.seconds_before = self.progress.seconds
        self.images_window = 0

    def stop_clock(self) -> None:
        self.progress.seconds = self.seconds_before + time.perf_counter() - self.t_start

    def accumulate(self, batches, log_now: bool) -> tuple[torch.Tensor, dict]:
        """Forward + backward over ``train.grad_accum_steps`` micro-batches (synced on the last).
        Returns the last batch and the logs: means over the micro-batches when ``log_now``, else
        the last micro-batch's generator logs (the guard's message uses its loss)."""
        accum, step = self.tcfg.grad_accum_steps, self.progress.step
        self.model.train()
        logs: dict = {}
        # The codebook moves in the forward (moving averages, restarts): kept, so that a skipped
        # step leaves it as it was.
        quantizer = self.inner.quantizer
        self.codebook = quantizer.snapshot(self.inner.vae.quantize.embedding.weight) if quantizer is not None else None
        scaler = self.accelerator.scaler
        # The adaptive GAN weight's gradients are taken at the loss scale: unscaled, they underflow in fp16.
        grad_scale = scaler.get_scale() if scaler is not None and self.loss_fn.adversarial_on(step) else 1.0
        finite = torch.ones((), dtype=torch.bool, device=self.accelerator.device)
        for micro in range(accum):
            x = next(batches).to(self.accelerator.device, non_blocking=True)  # [B, 3, H, W] in [-1, 1]
            with _no_sync(self.accelerator, [self.model, self.disc], micro < accum - 1):
                logs_g, rec = _generator_pass(self.accelerator, self.model, self.disc, self.loss_fn, x, step, accum,
                                              grad_scale)
                finite &= torch.isfinite(logs_g["train/loss"])  # read only when a step is not finite: no sync
                logs_d = {}
                if self.disc is not None and self.loss_fn.adversarial_on(step):
                    with self.accelerator.autocast():
                        d_loss, logs_d = self.loss_fn.discriminator_loss(self.disc, x, rec)
                    self.accelerator.backward(d_loss / accum)
            if log_now:  # means over the micro-batches of the logged step only (a few tensor ops each)
                for k, v in {**logs_g, **logs_d}.items():
                    logs[k] = logs.get(k, 0.0) + v.float() / accum
            self.images_window += x.shape[0] * self.accelerator.num_processes
        self.loss_finite = finite
        return x, (logs if log_now else logs_g)

    def optimizer_step(self, logs: dict) -> bool:
        """Unscale, clip, guard, step both optimizers and schedules, EMA. False: a non-finite
        gradient, the step skipped (``train.max_bad_steps`` bad steps in a row raise)."""
        step, grad_clip = self.progress.step, self.tcfg.grad_clip or float("inf")
        adversarial = self.disc is not None and self.loss_fn.adversarial_on(step)
        scaler = self.accelerator.scaler
        # accelerate's clip_grad_norm_ unscales every prepared optimizer's gradients, and a
        # GradScaler unscales an optimizer once per update: so it is called once, for the
        # autoencoder, and the discriminator's gradients (unscaled by that call) are clipped by torch.
        # Clipping returns the norm of the (already all-reduced) gradients: the same on every
        # rank, so every rank takes the same skip decision and DDP never falls out of step.
        grad_norm = self.accelerator.clip_grad_norm_(self.ae_params, grad_clip)
        d_norm = torch.zeros(())
        if adversarial:
            d_norm = torch.nn.utils.clip_grad_norm_(list(self.disc.parameters()), grad_clip)
        self.norms = (grad_norm, d_norm)
        if not (torch.isfinite(grad_norm) and torch.isfinite(d_norm)):
            self._skip(step, logs)
            return False
        self.bad_in_row = 0
        for opt, on in ((self.opt_ae, True), (self.opt_d, adversarial)):
            if opt is None or not on:
                continue
            if scaler is not None:
                scaler.step(opt.optimizer)  # the optimizer accelerate wraps: its step would update the scale too
            else:
                opt.step()
        if scaler is not None:
            scaler.update()  # once for both optimizers
        self.sched_ae.step()
        if adversarial:
            self.sched_d.step()  # the discriminator's warm-up + cosine counts from loss.disc_start
        _zero_grads(self.opt_ae, self.opt_d)
        if self.ema is not None:
            self.ema.step(self.inner.vae.parameters())
        self.progress.step += 1
        return True

    def _skip(self, step: int, logs: dict) -> None:
        """A non-finite step: no optimizer, schedule, EMA or codebook change. A GradScaler overflow
        lowers the scale; any other non-finite step counts toward ``train.max_bad_steps``."""
        scaler = self.accelerator.scaler
        _zero_grads(self.opt_ae, self.opt_d)
        if self.codebook is not None:
            self.inner.quantizer.restore(self.codebook, self.inner.vae.quantize.embedding.weight)
        self.progress.skipped += 1
        grad_norm, d_norm = self.norms
        what = f"autoencoder {float(grad_norm):.3g}, discriminator {float(d_norm):.3g}"
        if scaler is not None:
            # Every rank enters here together (the norms are the same), so this reduce is collective.
            bad_ranks = self.accelerator.reduce((~self.loss_finite).float().reshape(1), "sum")
            scale = scaler.get_scale()
            scaler.update()  # the overflow recorded by the unscale: the scale is lowered
            if is_overflow(scaler, bool(bad_ranks.item() == 0), scale):
                self.progress.overflows += 1
                self.accelerator.print(f"step {step + 1}: fp16 gradients overflow at loss scale {scale:g} ({what}); "
                                       f"step skipped, scale lowered to {scaler.get_scale():g}")
                return
        self.bad_in_row += 1
        self.accelerator.print(
            f"step {step + 1}: non-finite gradient ({what}); step skipped ({self.bad_in_row} in a row)"
        )
        if self.bad_in_row >= self.tcfg.max_bad_steps:
            raise TrainingDiverged(
                f"train: {self.bad_in_row} non-finite steps in a row at step {step + 1} (train.max_bad_steps: "
                f"{self.tcfg.max_bad_steps}); loss {float(logs['train/loss']):.4g}. Try a lower train.lr, "
                "train.mixed_precision: no, or a smaller loss.disc_weight; the last checkpoint is kept.")

    def log_train(self, step: int, logs: dict) -> float:
        """The step's means over every rank, the LR, gradient norms and speed; returns the loss."""
        values = {k: self.accelerator.reduce(v.to(self.accelerator.device), "mean").item() for k, v in logs.items()}
        now = time.perf_counter()
        grad_norm, d_norm = self.norms
        values.update({"train/lr": self.sched_ae.get_last_lr()[0], "train/grad_norm": float(grad_norm),
                       "train/images_per_s": self.images_window / max(now - self.t_window, 1e-9),
                       "train/skipped_steps": self.progress.skipped})
        if self.accelerator.scaler is not None:  # fp16: the loss scale and the overflows it skipped
            values.update({"train/loss_scale": self.accelerator.scaler.get_scale(),
                           "train/overflow_steps": self.progress.overflows})
        if self.opt_d is not None:
            values["train/d_grad_norm"] = float(d_norm)
        self.t_window, self.images_window = now, 0
        self.log.log(step, values)
        return values["train/loss"]

    def validate(self, step: int, val_images: torch.Tensor, grid: bool) -> None:
        """PSNR and reconstruction loss of the fixed validation images (EMA weights; main process)."""
        if not self.accelerator.is_main_process:
            return
        rec_val, self.val_psnr = validate_vae(self.accelerator, self.inner.vae, self.ema, val_images)
        rec_name = self.params.loss.rec_loss
        self.log.log(step, {"val/psnr": self.val_psnr,
                            f"val/rec_{rec_name}": float(reconstruction_loss(rec_name, rec_val, val_images))})
        if grid:
            n = min(8, len(val_images))
            self.log.grid(step, val_images[:n], rec_val[:n])

    def checkpoint(self, ckpt_dir: Path, tag: str) -> None:
        self.stop_clock()
        self.save(ckpt_dir, tag)

    def save(self, ckpt_dir: Path, tag: str) -> None:
        save_checkpoint(self.accelerator, ckpt_dir, tag, self.progress.step, self.progress, self.ema)

    def export(self, vae_dir: Path, val_images: torch.Tensor, train_shards: list[str], resumed: bool) -> dict:
        """The EMA weights to ``vae_dir`` with the measured latent scale; the run's summary."""
        if math.isnan(self.val_psnr):  # resumed from the final checkpoint: no step ran, the curves are complete
            _, self.val_psnr = validate_vae(self.accelerator, self.inner.vae, self.ema, val_images)
        vae = self.inner.vae
        set_tf32(False)  # the measured scale: float32 moments, whatever train.tf32 (ldm_vae/precision.py)
        with _ema_weights(vae, self.ema):  # the exported weights are the EMA weights
            _, scale_images = load_images(train_shards, limit=self.tcfg.scale_samples)
            factors = (export_vq if is_vq(vae) else export_vae)(vae, scale_images, vae_dir)
        result = {"steps": self.progress.step, "train_seconds": round(self.progress.seconds, 1),
                  "environment": environment(),
                  "val_psnr": round(self.val_psnr, 3), "resumed": resumed,
                  "processes": self.accelerator.num_processes, "skipped_steps": self.progress.skipped,
                  "overflow_steps": self.progress.overflows,
                  # The factors written into data/vae/config.json, estimated on train.scale_samples
                  # images; evaluate's exact_* are over every train latent (docs/trainer.md: Scaling factors).
                  "vae_scaling_factor": factors["scaling_factor"], "vae_shift_factor": factors["shift_factor"]}
        self.log.finish(result)
        return result


def build_optimizers(model: TrainedAutoencoder, disc, params: Params):
    """AdamW for the autoencoder (with the learned output log-variance when it is learned) and,
    with a discriminator, its own AdamW: every trainable parameter in exactly one optimizer."""
    tcfg = params.train

    def adamw(module, lr):
        trainable = [p for p in module.parameters() if p.requires_grad]
        return torch.optim.AdamW(
            trainable, lr=lr, betas=(tcfg.adam_beta1, tcfg.adam_beta2), weight_decay=tcfg.weight_decay
        )

    return adamw(model, tcfg.lr), (adamw(disc, params.loss.disc_lr or tcfg.lr) if disc is not None else None)


def _generator_pass(accelerator, model, disc, loss_fn, x, step: int, accum: int, grad_scale: float = 1.0):
    """The autoencoder's forward + backward; returns (logs, reconstruction for the discriminator).
    ``grad_scale``: the fp16 loss scale, for the adaptive weight's gradients."""
    inner = accelerator.unwrap_model(model)
    # The discriminator judges the reconstruction through its plain module with its weights frozen:
    # no gradient lands on it (its own step comes next), so nothing of it is touched by DDP here.
    judge = accelerator.unwrap_model(disc) if disc is not None else None
    if judge is not None:
        judge.requires_grad_(False)
    try:
        with accelerator.autocast():
            # through the prepared (DDP) module: gradients get synced
            rec, mean, logvar, rec_down = model(x, down=loss_fn.cfg.scale_equivariance > 0)
            loss, logs = loss_fn(rec, x, mean, logvar, inner.output_logvar, step=step, disc=judge,
                                 last_layer=inner.last_layer, rec_down=rec_down, grad_scale=grad_scale)
        accelerator.backward(loss / accum)
    finally:
        if judge is not None:
            judge.requires_grad_(True)
    return logs, rec.detach()


def _no_sync(accelerator, models, skip_sync: bool):
    """On all but the last micro-batch, accumulate gradients locally without the all-reduce."""
    stack = contextlib.ExitStack()
    if skip_sync:
        for m in models:
            if m is not None:
                stack.enter_context(accelerator.no_sync(m))
    return stack


def _zero_grads(*optimizers) -> None:
    for opt in optimizers:
        if opt is not None:
            opt.zero_grad(set_to_none=True)


@torch.inference_mode()
def _reconstruct(accelerator, vae, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    vae.eval()
    device = next(vae.parameters()).device  # where the VAE is, whichever device the accelerator names
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device)
        with accelerator.autocast():
            out.append(reconstruct(vae, x).float().clamp(-1, 1).cpu())
    return torch.cat(out)


def validate_vae(accelerator, vae, ema, val_images: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(reconstructions [N, 3, H, W], mean PSNR in dB) of the validation images, with the EMA weights."""
    with _ema_weights(vae, ema):
        rec_val = _reconstruct(accelerator, vae, val_images)
    return rec_val, float(psnr(to_unit(rec_val), to_unit(val_images)).mean())


class _ema_weights:
    """Swap the EMA weights in for validation, then put the training weights back."""

    def __init__(self, vae, ema):
        self.params = list(vae.parameters())
        self.ema = ema

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)

    def __exit__(self, *_):
        if self.ema is not None:
            self.ema.restore(self.params)
