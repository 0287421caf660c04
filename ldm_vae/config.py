"""Typed, validated params: the one place that knows what params.yaml may hold.

The dataclass defaults below (the data section's in config_data.py) are the one set of defaults,
and the shipped params.yaml writes exactly them out (a test holds the two equal): a key deleted
from params.yaml keeps its value.

Every stage calls :func:`load_params` first, before importing torch, so a wrong value fails in
about a second with the key, the value and what is allowed. The whole file is validated by every
stage (cheap), even though each stage only *uses* its own sections: a typo in ``model`` should not
wait for download and prepare to finish before it is reported.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config_data import DataConfig  # the data section lives in its own module (size); import it from here
from .param_checks import ParamError, check_at_least, check_choice, check_processes, check_range, coerce


@dataclass(frozen=True)
class ModelConfig:
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (16, 32, 64, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 1
    mid_block_attention: bool = True
    # Initial bias of the encoder's log-variance outputs. 0 (diffusers' default) starts every
    # posterior at std 1, which drowns a freshly initialised encoder's mean in noise; a negative
    # value starts with a usable signal and lets the KL term raise the variance where it can.
    logvar_init: float = -10.0
    # Start from an existing diffusers AutoencoderKL: a local folder (or its `vae` sub-folder) or,
    # online, a hub id, optionally with a sub-folder: "stabilityai/stable-diffusion-2-1/vae".
    # The architecture keys above must match its config (checked before any work).
    init_from: str = ""
    # With init_from and another latent_channels than the checkpoint's: re-initialise the layers
    # that touch the latent (encoder.conv_out, quant_conv, post_quant_conv, decoder.conv_in).
    reinit_latent_layers: bool = False
    # With init_from: export that VAE unchanged (no training): its own config, not the keys
    # above, is the architecture, and its weights and factors reach data/vae byte for byte.
    use_as_is: bool = False
    # The latent's regulariser: kl (a Gaussian posterior, AutoencoderKL) or vq (a codebook of
    # codebook_size vectors of code_dim each, diffusers' VQModel; tokens, docs/latent-space.md: VQ latents).
    regularizer: str = "kl"
    codebook_size: int = 1024
    code_dim: int = 0  # 0: latent_channels
    codebook_l2: bool = False  # l2-normalised codes and lookup by cosine similarity (ViT-VQGAN, LlamaGen)

    def check(self) -> None:
        check_choice("model.regularizer", self.regularizer, ("kl", "vq"))
        check_range("model.codebook_size", self.codebook_size, 2, 1 << 20)
        check_at_least("model.code_dim", self.code_dim, 0)
        if self.regularizer == "vq" and self.init_from:
            raise ParamError("model.init_from: a VQ autoencoder (model.regularizer: vq) starts from scratch; "
                             "init_from loads AutoencoderKL weights only")
        if self.use_as_is and not self.init_from:
            raise ParamError("model.use_as_is: true needs model.init_from (the VAE to use: a folder or a hub id)")
        check_at_least("model.latent_channels", self.latent_channels, 1)
        if len(self.block_out_channels) != 4:
            raise ParamError(
                f"model.block_out_channels: {list(self.block_out_channels)}: needs exactly 4 entries "
                "(4 blocks = 3 downsamplings = 8x, the SD kl-f8 layout)"
            )
        for c in self.block_out_channels:
            if c < 1 or c % self.norm_num_groups:
                raise ParamError(
                    f"model.block_out_channels: {list(self.block_out_channels)}: each entry must be a "
                    f"positive multiple of model.norm_num_groups ({self.norm_num_groups})"
                )
        check_at_least("model.layers_per_block", self.layers_per_block, 1)
        check_at_least("model.norm_num_groups", self.norm_num_groups, 1)
        check_range("model.logvar_init", self.logvar_init, -30.0, 20.0)


@dataclass(frozen=True)
class LossConfig:
    rec_loss: str = "l2"  # l1 | l2 | log_l2 (mean per-image log MSE: what mean PSNR measures)
    # Relative to the per-image SUM of the reconstruction loss, as in LDM's configs (SD: 1e-6);
    # see losses.py for how the two are scaled.
    kl_weight: float = 3e-3
    kl_anneal_steps: int = 0  # ramp the KL weight linearly from 0 over this many steps (0: off)
    # Free bits (Kingma et al. 2016): each channel's KL, in nats per latent element averaged over
    # the batch, is charged as max(free_bits, KL): below the floor a channel is free to carry
    # information, so no channel is pushed all the way to the prior (0: the plain KL).
    free_bits: float = 0.0
    # Scale equivariance (EQ-VAE; Skorokhodov et al. 2025): the decoder must turn the 2x
    # area-downsampled latent into the 2x area-downsampled image, with this weight on that
    # reconstruction loss; it removes high-frequency content the image does not have (0: off).
    scale_equivariance: float = 0.0
    perceptual_weight: float = 0.0  # LPIPS-VGG weight (LDM: 1.0); needs the LPIPS weights (lpips.py)
    learn_logvar: bool = False  # learn the output log-variance s of nll = rec / exp(s) + s
    logvar_init: float = 0.0
    # PatchGAN discriminator: its weight times the adaptive weight; 0 = no discriminator at all.
    disc_weight: float = 0.0
    disc_start: int = 50001  # optimizer step at which the discriminator starts (LDM's kl-f8 config)
    disc_loss: str = "hinge"  # hinge | vanilla
    disc_layers: int = 3
    disc_channels: int = 64
    disc_lr: float = 0.0  # 0: the same as train.lr
    # model.regularizer: vq. The commitment loss's weight beta (VQ-VAE: 0.25); the codebook follows
    # its vectors by exponential moving averages (ema, VQ-VAE-2) or by its own loss (loss).
    vq_beta: float = 0.25
    codebook_update: str = "ema"
    codebook_decay: float = 0.99  # ema: the averages' decay per step
    # A code whose moving-average use falls below this share of the uniform use (N / K of a step's
    # N vectors) is re-seeded from the step's encoder outputs (0: never): what keeps a codebook used.
    dead_code_threshold: float = 0.03

    def check(self) -> None:
        check_at_least("loss.vq_beta", self.vq_beta, 0.0)
        check_choice("loss.codebook_update", self.codebook_update, ("ema", "loss"))
        check_range("loss.codebook_decay", self.codebook_decay, 0.0, 1.0, open_hi=True)
        check_at_least("loss.dead_code_threshold", self.dead_code_threshold, 0.0)
        check_choice("loss.rec_loss", self.rec_loss, ("l1", "l2", "log_l2"))
        check_at_least("loss.kl_weight", self.kl_weight, 0.0)
        check_at_least("loss.kl_anneal_steps", self.kl_anneal_steps, 0)
        check_at_least("loss.free_bits", self.free_bits, 0.0)
        check_at_least("loss.scale_equivariance", self.scale_equivariance, 0.0)
        check_at_least("loss.perceptual_weight", self.perceptual_weight, 0.0)
        check_range("loss.logvar_init", self.logvar_init, -20.0, 20.0)
        check_at_least("loss.disc_weight", self.disc_weight, 0.0)
        check_at_least("loss.disc_start", self.disc_start, 0)
        check_choice("loss.disc_loss", self.disc_loss, ("hinge", "vanilla"))
        check_range("loss.disc_layers", self.disc_layers, 1, 6)
        check_at_least("loss.disc_channels", self.disc_channels, 1)
        check_range("loss.disc_lr", self.disc_lr, 0.0, 1.0)


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 7000
    batch_size: int = 16
    # Train on random crop_size x crop_size windows of the prepared images (0: whole images).
    # Cheaper steps, so more of them in a fixed budget; validation always uses whole images.
    crop_size: int = 32
    # Random RGB channel permutation of training images, meant to show a small collection colours
    # it lacks. Measured on the embedded demo it costs 1.5 dB of validation PSNR, so it is off.
    color_augment: bool = False
    # Probability of blending a training image towards a random solid colour (data.fade_to_colour):
    # teaches flat, low-contrast regions of any tint, which a per-image GroupNorm otherwise greys.
    # Measured on the embedded demo over the full 7,000 steps: 0.4 gives +1.2 to 1.45 dB (two runs; 0.2: +0.9 dB).
    fade_augment: float = 0.4
    lr: float = 2e-3
    lr_min_ratio: float = 0.05  # cosine decays to lr * this
    warmup_steps: int = 100
    weight_decay: float = 0.0
    adam_beta1: float = 0.9  # LDM's autoencoder and discriminator: (0.5, 0.9)
    adam_beta2: float = 0.99
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # 0 disables EMA
    checkpoint_every: int = 1000
    log_every: int = 25
    val_every: int = 500
    sample_every: int = 1000
    num_workers: int = 0
    cache_mb: int = 1024  # decoded training images kept in memory per data process (0: decode every time)
    # Processes (accelerate, one per GPU) the stage launches: auto = every visible GPU, or the CPU
    # when there is none; a number (on a CPU, >1 runs gloo DDP: for tests). batch_size is per process.
    num_processes: str = "auto"
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    max_bad_steps: int = 5  # non-finite steps in a row (each skipped) before training stops
    mixed_precision: str = "no"  # no | bf16 | fp16: autocast; the trained weights stay float32
    # TF32 for training's float32 matmuls and convolutions on Ampere+ GPUs (ldm_vae/precision.py):
    # off, float32 is float32; encode's and evaluate's fp32 never use it. CPUs ignore it.
    tf32: bool = False
    # Threads of a CPU run, shared among its processes (0: torch's choice, every core). The float
    # sums, and so the trained weights, depend on it: fixed, a run repeats on another machine of the
    # same CPU kind whatever its core count (docs/reproducibility.md: What reproduces). Ignored on GPUs.
    cpu_threads: int = 2
    scale_samples: int = 512  # train samples encoded to measure scaling/shift factors
    seed: int = 0

    def check(self) -> None:
        check_at_least("train.max_steps", self.max_steps, 1)
        check_at_least("train.batch_size", self.batch_size, 1)
        if self.crop_size < 0 or self.crop_size % 8:
            raise ParamError(f"train.crop_size: {self.crop_size}: must be 0 (whole images) or a positive multiple of 8")
        check_range("train.fade_augment", self.fade_augment, 0.0, 1.0)
        check_range("train.lr", self.lr, 0.0, 1.0, open_lo=True)
        check_range("train.lr_min_ratio", self.lr_min_ratio, 0.0, 1.0)
        check_at_least("train.warmup_steps", self.warmup_steps, 0)
        check_at_least("train.cpu_threads", self.cpu_threads, 0)
        check_at_least("train.weight_decay", self.weight_decay, 0.0)
        check_range("train.adam_beta1", self.adam_beta1, 0.0, 1.0, open_hi=True)
        check_range("train.adam_beta2", self.adam_beta2, 0.0, 1.0, open_hi=True)
        check_at_least("train.grad_clip", self.grad_clip, 0.0)
        check_range("train.ema_decay", self.ema_decay, 0.0, 1.0, open_hi=True)
        for key in ("checkpoint_every", "log_every", "val_every", "sample_every", "scale_samples"):
            check_at_least(f"train.{key}", getattr(self, key), 1)
        check_at_least("train.num_workers", self.num_workers, 0)
        check_at_least("train.cache_mb", self.cache_mb, 0)
        check_processes("train.num_processes", self.num_processes)
        check_at_least("train.grad_accum_steps", self.grad_accum_steps, 1)
        check_at_least("train.max_bad_steps", self.max_bad_steps, 1)
        check_choice("train.mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))


@dataclass(frozen=True)
class EncodeConfig:
    batch_size: int = 32
    samples_per_shard: int = 1000
    num_processes: str = "auto"  # auto (one per visible GPU, one on CPU) or a number
    flip: bool = False  # also store the horizontally flipped image's mean_flip.npy / std_flip.npy
    dtype: str = "fp32"  # compute dtype: fp32, bf16 or fp16 (GPUs); storage is always float16
    prequant: bool = False  # VQ: also store prequant.npy, the latent before the snap (LDM's VQ diffusion input)

    def check(self) -> None:
        check_at_least("encode.batch_size", self.batch_size, 1)
        check_at_least("encode.samples_per_shard", self.samples_per_shard, 1)
        check_processes("encode.num_processes", self.num_processes)
        check_choice("encode.dtype", self.dtype, ("fp32", "bf16", "fp16"))


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = 64
    grid_images: int = 8  # rows of recon_grid.png (the first images) and recon_worst.png (lowest PSNR)
    # Optional perceptual metrics (the `metrics` extra: pretrained VGG / Inception weights).
    lpips: bool = False
    rfid: bool = False
    # Published (or other) VAEs scored on the same validation images beside the trained one: local
    # folders or, online, hub ids[/subfolder], e.g. stabilityai/sd-vae-ft-ema.
    references: tuple[str, ...] = ()

    def check(self) -> None:
        check_at_least("evaluate.batch_size", self.batch_size, 1)
        check_at_least("evaluate.grid_images", self.grid_images, 1)
        names = [reference_name(r) for r in self.references]
        if len(set(names)) != len(names):
            raise ParamError(f"evaluate.references: {list(self.references)}: two share the name "
                             f"{[n for n in names if names.count(n) > 1][0]!r} (the last part of the path)")


@dataclass(frozen=True)
class ProbeConfig:
    """The denoising probe (ldm_vae/probe.py): one fixed small diffusion model and budget,
    so that runs compare; change them only for a whole comparison at once."""
    steps: int = 400
    batch_size: int = 64
    lr: float = 1.0e-3
    widths: tuple[int, ...] = (32, 64)  # UNet block widths: latent sides must divide by 2^(len - 1)
    log_snrs: tuple[float, ...] = (-6.0, -3.0, 0.0, 3.0, 6.0)  # the scored noise levels
    val_latents: int = 2048  # the first this many validation latents are scored
    val_draws: int = 4  # noise draws per latent and level
    num_workers: int = 0
    seed: int = 0

    def check(self) -> None:
        for key in ("steps", "batch_size", "val_latents", "val_draws"):
            check_at_least(f"probe.{key}", getattr(self, key), 1)
        check_at_least("probe.num_workers", self.num_workers, 0)
        check_range("probe.lr", self.lr, 0, 1, open_lo=True)
        if not self.widths or min(self.widths) < 1:
            raise ParamError(f"probe.widths: {list(self.widths)}: one or more positive block widths")
        for x in self.log_snrs:
            check_range("probe.log_snrs", x, -20, 20)


@dataclass(frozen=True)
class EngineConfig:
    """Where the units of download, prepare and encode run (ldm_vae/engine/). No stage lists this
    section in dvc.yaml: the outputs are the same bytes on either engine, so switching re-runs nothing."""
    kind: str = "local"  # local: this machine's processes | ray: a Ray cluster (docs/scale.md: A cluster)
    ray_address: str = ""  # "" = RAY_ADDRESS, else the cluster `ray start` began on this node; "local": a new one
    max_retries: int = 3  # Ray runs a unit again this often when its worker or node is lost (not on a bad input)

    def check(self) -> None:
        check_choice("engine.kind", self.kind, ("local", "ray"))
        check_at_least("engine.max_retries", self.max_retries, 0)
        if self.kind == "ray":
            import importlib.util

            if importlib.util.find_spec("ray") is None:
                raise ParamError("engine.kind: ray: the ray package is not installed here: "
                                 "pip install -e '.[cluster]' (docs/scale.md: A cluster)")


def reference_name(location: str) -> str:
    """A reference VAE's short name in metrics and columns: "stabilityai/sd-vae-ft-ema" ->
    "sd-vae-ft-ema", "black-forest-labs/FLUX.1-dev/vae" -> "FLUX_1-dev"."""
    parts = [p for p in location.partition("@")[0].strip("/").split("/") if p]
    if len(parts) > 1 and parts[-1] == "vae":
        parts = parts[:-1]
    return re.sub(r"[^A-Za-z0-9_-]", "_", parts[-1]) if parts else "reference"


@dataclass(frozen=True)
class Params:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read, type-check and validate the whole params file; raise ParamError on the first problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ParamError(f"{path}: cannot read params: {e}") from e
    return params_from_dict(raw)


def params_from_dict(raw: dict) -> Params:
    if not isinstance(raw, dict):
        raise ParamError(f"params: expected a mapping of sections, got {type(raw).__name__}")
    sections = {f.name: f.type for f in dataclasses.fields(Params)}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ParamError(f"{unknown[0]}: unknown params section{_did_you_mean(unknown[0], sections)}; "
                         f"allowed: {', '.join(sections)}")
    built = {}
    for f in dataclasses.fields(Params):
        cls = f.default_factory().__class__
        built[f.name] = _build_section(f.name, cls, raw.get(f.name) or {})
    params = Params(**built)
    _check_across(params)
    return params


def _check_across(p: Params) -> None:
    """Keys whose allowed values depend on another section's."""
    _check_probe_fits(p)
    if p.data.crop == "bucket":
        from .buckets import bucket_set, smallest_side

        smallest = min(min(b) for b in bucket_set(p.data))
        if not p.data.bucket_upscale:  # small images get buckets down to the minimum side
            smallest = min(smallest, smallest_side(p.data.bucket_step, p.data.bucket_min_side))
        if not 0 < p.train.crop_size <= smallest:
            raise ParamError(f"train.crop_size: {p.train.crop_size}: with data.crop: bucket the training images differ "
                             f"in shape: use windows of at most the smallest bucket side ({smallest})")


def _check_probe_fits(p: Params) -> None:
    """probe.widths against the latents prepare will make: the probe's UNet halves them
    len(widths) - 1 times, so every latent side (a bucket's side / 8) must divide by 2^(len - 1)."""
    step = 2 ** (len(p.probe.widths) - 1)
    sides = {p.data.resolution}
    if p.data.crop == "bucket":
        from .buckets import bucket_set

        sides = {s for b in bucket_set(p.data) for s in b}
        if not p.data.bucket_upscale and not p.data.buckets:  # smaller buckets: multiples of the step
            sides.add(p.data.bucket_step)
    bad = sorted(s for s in sides if (s // 8) % step)
    if bad:
        what = "data.bucket_step or data.buckets" if p.data.crop == "bucket" else "data.resolution"
        raise ParamError(
            f"probe.widths: {list(p.probe.widths)}: halves the latents {len(p.probe.widths) - 1} times, so "
            f"every latent side must be a multiple of {step}; a side of {bad[0]} px is {bad[0] // 8} "
            f"latents ({what}): use fewer widths or sides that are multiples of {8 * step} px"
        )


def stage_hash(*configs) -> str:
    """A short stable hash of config sections (used to tag checkpoints with what shaped them)."""
    return stage_hash_of([dataclasses.asdict(c) for c in configs])


def stage_hash_of(obj) -> str:
    blob = json.dumps(obj, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _build_section(name: str, cls, values):
    if not isinstance(values, dict):
        raise ParamError(f"{name}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ParamError(
                f"{name}.{key}: unknown key{_did_you_mean(key, allowed, name)}; allowed: {', '.join(allowed)}"
            )
        kwargs[key] = coerce(f"{name}.{key}", value, hints[key])
    obj = cls(**kwargs)
    obj.check()
    return obj


def _did_you_mean(key, allowed: list[str], section: str | None = None) -> str:
    """" (did you mean `crops_per_image`?)": the closest allowed names, or the section that has
    this key (``data.lr`` -> ``train.lr``)."""
    key = str(key)
    close = difflib.get_close_matches(key, allowed, n=2, cutoff=0.6)
    if section is not None:
        close += [f"{f.name}.{key}" for f in dataclasses.fields(Params) if f.name != section
                  and key in {g.name for g in dataclasses.fields(f.default_factory().__class__)}]
    return f" (did you mean {' or '.join(f'`{c}`' for c in close)}?)" if close else ""


def load_params_or_exit(path: str | Path = "params.yaml") -> Params:
    """For stage CLIs: the whole params file validated, or exit 2 with the one-line reason."""
    import sys

    try:
        return load_params(path)
    except ParamError as e:
        print(f"params.yaml error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
