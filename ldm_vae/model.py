"""The autoencoder: a diffusers ``AutoencoderKL`` built from ``model.*`` params, and the
latent scale measured on data that makes it usable by a diffusion model."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, VQModel
from torch import nn

from .config import ModelConfig, ParamError
from .inputs import loading_kwargs, pretrained_location

DOWNSAMPLING = 8  # 4 blocks, 3 stride-2 downsamplings: the SD "kl-f8" family
# The layers whose shape depends on latent_channels: what reinit_latent_layers starts afresh.
LATENT_LAYERS = ("encoder.conv_out.", "quant_conv.", "post_quant_conv.", "decoder.conv_in.")


def build_vae(cfg: ModelConfig, sample_size: int) -> AutoencoderKL | VQModel:
    """A fresh autoencoder from params or, with ``model.init_from``, one holding those weights;
    with ``model.regularizer: vq`` a fresh VQModel of the same encoder and decoder."""
    if cfg.regularizer == "vq":
        return _fresh_vq(cfg, sample_size)
    vae = _fresh_vae(cfg, sample_size)
    if cfg.init_from:
        where = pretrained_location(cfg.init_from)
        check_pretrained(cfg, AutoencoderKL.load_config(where.path, **loading_kwargs(where)))
        state = AutoencoderKL.from_pretrained(where.path, **loading_kwargs(where)).state_dict()
        if cfg.reinit_latent_layers:
            state = {k: v for k, v in state.items() if not k.startswith(LATENT_LAYERS)}
        missing, unexpected = vae.load_state_dict(state, strict=False)
        assert not unexpected and all(k.startswith(LATENT_LAYERS) for k in missing), (missing, unexpected)
    return vae


def check_pretrained(cfg: ModelConfig, config: dict) -> None:
    """ParamError naming every model.* key that disagrees with the checkpoint's architecture."""
    theirs = {
        "block_out_channels": list(config.get("block_out_channels", [])),
        "layers_per_block": config.get("layers_per_block"),
        "norm_num_groups": config.get("norm_num_groups"),
        "mid_block_attention": config.get("mid_block_add_attention", True),
    }
    ours = {"block_out_channels": list(cfg.block_out_channels), "layers_per_block": cfg.layers_per_block,
            "norm_num_groups": cfg.norm_num_groups, "mid_block_attention": cfg.mid_block_attention}
    bad = [f"model.{k}: {ours[k]!r} but the checkpoint has {theirs[k]!r}" for k in ours if ours[k] != theirs[k]]
    if bad:
        raise ParamError(f"model.init_from: {cfg.init_from!r}: architecture differs; set " + "; ".join(bad))
    if config.get("latent_channels") != cfg.latent_channels and not cfg.reinit_latent_layers:
        raise ParamError(
            f"model.latent_channels: {cfg.latent_channels} but model.init_from {cfg.init_from!r} has "
            f"{config.get('latent_channels')}; set model.reinit_latent_layers: true to start the layers "
            f"that touch the latent ({', '.join(n.rstrip('.') for n in LATENT_LAYERS)}) afresh")


def check_init_from(cfg: ModelConfig) -> None:
    """The stage's up-front check: the checkpoint exists and fits the params (config only, no weights)."""
    if cfg.init_from:
        where = pretrained_location(cfg.init_from)
        try:
            config = AutoencoderKL.load_config(where.path, **loading_kwargs(where))
        except (OSError, ValueError) as e:
            raise ParamError(f"model.init_from: {cfg.init_from!r}: cannot read its config "
                             f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
        if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ParamError(f"model.init_from: {cfg.init_from!r} is a {config['_class_name']}, not an AutoencoderKL")
        if not cfg.use_as_is:  # used as it is, its own config is the architecture
            check_pretrained(cfg, config)


def _architecture(cfg: ModelConfig, sample_size: int) -> dict:
    """The encoder and decoder of ``model.*``, as diffusers' AutoencoderKL and VQModel both take them."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.block_out_channels),
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        mid_block_add_attention=cfg.mid_block_attention,
        sample_size=sample_size,
    )


def _fresh_vae(cfg: ModelConfig, sample_size: int) -> AutoencoderKL:
    # The factors are placeholders until export measures them on the training data.
    vae = AutoencoderKL(**_architecture(cfg, sample_size), scaling_factor=1.0, shift_factor=0.0)
    with torch.no_grad():
        # quant_conv maps the encoder output [B, 2C, h, w] to (mean, logvar) = channels [:C], [C:].
        vae.quant_conv.bias[cfg.latent_channels :].fill_(cfg.logvar_init)
    return vae


def _fresh_vq(cfg: ModelConfig, sample_size: int) -> VQModel:
    vq = VQModel(**_architecture(cfg, sample_size), num_vq_embeddings=cfg.codebook_size,
                 vq_embed_dim=cfg.code_dim or cfg.latent_channels, scaling_factor=1.0)
    if cfg.codebook_l2:
        with torch.no_grad():
            vq.quantize.embedding.weight.copy_(F.normalize(vq.quantize.embedding.weight, dim=1))
    return vq


def is_vq(vae) -> bool:
    return isinstance(vae, VQModel)


class VQTerms(NamedTuple):
    """A VQ forward's regulariser: the VQ loss (commitment, and codebook with loss updates), its
    logs (codebook use) and the tokens [B, h, w]."""
    loss: torch.Tensor
    logs: dict
    tokens: torch.Tensor


class TrainedAutoencoder(nn.Module):
    """What the training loop hands to accelerate: the VAE and the loss's output log-variance.

    Every training forward is this module's ``forward``, so under DDP it runs through the
    wrapper's hooks (gradients all-reduced); ``vae.encode``/``vae.decode`` on the wrapped module
    would bypass them. The log-variance sits here (not in the loss) so that it is in the
    autoencoder's optimizer, synced across ranks and checkpointed with the weights.
    """

    def __init__(self, vae: AutoencoderKL | VQModel, logvar_init: float = 0.0, learn_logvar: bool = False,
                 quantizer: nn.Module | None = None):
        super().__init__()
        self.vae = vae
        self.output_logvar = nn.Parameter(torch.tensor(float(logvar_init)), requires_grad=learn_logvar)
        self.quantizer = quantizer  # a VQModel's (ldm_vae.vq.Quantizer): the lookup and the codebook's updates
        if quantizer is not None and quantizer.update == "ema":  # moved by averages, not by the optimizer
            vae.quantize.embedding.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True, down: bool = False):
        """x: [B, 3, H, W] in [-1, 1] -> (reconstruction [B, 3, H, W], the latent's parameters:
        the posterior mean and logvar [B, C, H/8, W/8], or for a VQModel the pre-quantisation latent
        [B, D, H/8, W/8] and its :class:`VQTerms`; and with ``down`` the decoding of the 2x
        area-downsampled latent [B, 3, H/2, W/2], else None: the scale-equivariance term's, in
        this forward for DDP)."""
        if self.quantizer is not None:
            h = self.vae.encode(x).latents  # [B, D, h, w], after quant_conv
            z, tokens, loss, logs = self.quantizer(h, self.vae.quantize.embedding.weight)
            rec_down = self.vae.decode(F.avg_pool2d(z, 2), force_not_quantize=True).sample if down else None
            return self.vae.decode(z, force_not_quantize=True).sample, h, VQTerms(loss, logs, tokens), rec_down
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample() if sample_posterior else posterior.mean
        rec_down = self.vae.decode(F.avg_pool2d(z, 2)).sample if down else None
        return self.vae.decode(z).sample, posterior.mean, posterior.logvar, rec_down

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight, where the adaptive GAN weight compares gradient norms."""
        return self.vae.decoder.conv_out.weight


def reconstruct(vae, x: torch.Tensor) -> torch.Tensor:
    """x [B, 3, H, W] in [-1, 1] -> the reconstruction: a KL VAE's from the posterior mean, a
    VQModel's from the nearest codes."""
    if is_vq(vae):
        return vae(x).sample
    return vae(x, sample_posterior=False).sample


class LatentMoments:
    """Streaming exact moments of the posterior over a set of images.

    The variance of a posterior *sample* z = mean + std * eps over the data is
    E[std^2] + Var(mean); it is accumulated per channel in float64 so that merging many batches
    (or, later, ranks) loses nothing.
    """

    def __init__(self, channels: int):
        self.n = 0  # latent positions counted per channel (images * h * w)
        self.sum_mean = torch.zeros(channels, dtype=torch.float64)
        self.sum_mean_sq = torch.zeros(channels, dtype=torch.float64)
        self.sum_var = torch.zeros(channels, dtype=torch.float64)

    def update(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        # mean, std: [B, C, h, w]
        m = mean.double().transpose(0, 1).flatten(1)  # [C, B*h*w]
        s = std.double().transpose(0, 1).flatten(1)
        self.n += m.shape[1]
        self.sum_mean += m.sum(1)
        self.sum_mean_sq += (m * m).sum(1)
        self.sum_var += (s * s).sum(1)

    def state(self) -> dict:
        """JSON-safe sums (float64 round-trips exactly through JSON's repr)."""
        return {"n": self.n, "sum_mean": self.sum_mean.tolist(), "sum_mean_sq": self.sum_mean_sq.tolist(),
                "sum_var": self.sum_var.tolist()}

    @classmethod
    def from_state(cls, state: dict) -> "LatentMoments":
        m = cls(len(state["sum_mean"]))
        m.n = state["n"]
        for k in ("sum_mean", "sum_mean_sq", "sum_var"):
            setattr(m, k, torch.tensor(state[k], dtype=torch.float64))
        return m

    def merge(self, other: "LatentMoments") -> None:
        self.n += other.n
        self.sum_mean += other.sum_mean
        self.sum_mean_sq += other.sum_mean_sq
        self.sum_var += other.sum_var

    def summary(self) -> dict:
        """Per-channel and global mean/std of posterior samples, and the SD3-style factors."""
        if self.n == 0:
            raise ValueError("no latents were accumulated")
        mu = self.sum_mean / self.n  # [C]
        var = self.sum_var / self.n + (self.sum_mean_sq / self.n - mu * mu)  # [C]
        g_mu = mu.mean()
        # Global variance over all channels: within-channel variance plus spread of channel means.
        g_var = var.mean() + ((mu - g_mu) ** 2).mean()
        g_std = float(g_var.clamp_min(1e-12).sqrt())
        return {
            "channel_mean": [float(v) for v in mu],
            "channel_std": [float(v) for v in var.clamp_min(1e-12).sqrt()],
            "mean": float(g_mu),
            "std": g_std,
            "count": self.n,
            # z_model = (z - shift_factor) * scaling_factor has mean 0 and std 1 on this data.
            "shift_factor": float(g_mu),
            "scaling_factor": 1.0 / g_std,
        }
