"""Vector quantisation: the VQ autoencoder's bottleneck (``model.regularizer: vq``).

Each latent vector snaps to the nearest of K codes (VQ-VAE, van den Oord et al. 2017); the
decoder sees the code, the encoder gets the decoder's gradient through the snap unchanged (the
straight-through estimator), and the commitment loss beta * ||h - sg(e)||^2 keeps the encoder near
its codes. The codebook follows its vectors either by exponential moving averages of the vectors
assigned to each code (VQ-VAE-2, and most tokenizers since) or by the codebook loss
||sg(h) - e||^2 in the optimizer. A code whose moving-average use falls below
``loss.dead_code_threshold`` times its uniform share (N / K of a step's N vectors) is re-seeded
from the step's encoder outputs: without it, most codes of a fresh codebook are never the nearest
to anything and stay unused (codebook collapse). With ``model.codebook_l2`` vectors and codes are
l2-normalised and matched by cosine
similarity (ViT-VQGAN, LlamaGen).

The codebook is diffusers' ``VQModel.quantize.embedding.weight`` [K, D] itself, so the export is a
plain ``VQModel``: with l2 codes the stored codes are unit vectors, for which diffusers' nearest-
by-distance lookup picks the code of highest cosine, the one chosen here. The moving averages and
the use counts are buffers of :class:`Quantizer` (checkpointed with the model, never exported).
Under DDP the counts and sums are all-reduced and re-seeded codes come from rank 0, so every
rank's codebook stays identical.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

EPS = 1e-5  # Laplace smoothing of the moving-average counts (VQ-VAE-2)


class Quantizer(nn.Module):
    """The lookup, the straight-through estimator, the losses and the codebook's updates."""

    def __init__(self, codebook: int, dim: int, beta: float, update: str = "ema", decay: float = 0.99,
                 dead_threshold: float = 1.0, l2: bool = False):
        super().__init__()
        self.k, self.dim, self.beta, self.update, self.decay = codebook, dim, beta, update, decay
        self.dead_threshold, self.l2 = dead_threshold, l2
        # ema: N_k (vectors per step) and m_k (their sum); N starts at 1 and m at the codes, so an
        # unused code stays where it is (m / N) while both decay. use: every mode's restart signal.
        self.register_buffer("ema_count", torch.ones(codebook))
        self.register_buffer("ema_sum", torch.zeros(codebook, dim))
        self.register_buffer("use", torch.zeros(codebook))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))  # ema_sum holds the codes
        self.register_buffer("started_use", torch.zeros((), dtype=torch.bool))  # use holds a first histogram

    def forward(self, h: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """h: [B, D, h, w] (the encoder after quant_conv); weight: the codebook [K, D].
        Returns (the quantised latent for the decoder [B, D, h, w], straight-through; the tokens
        [B, h, w] long; the VQ loss, a scalar; logs).

        In float32 under any autocast: a bf16 distance matmul picks another code than the fp32 one
        for a sixth to a third of the vectors (measured), and encode stores the fp32 choice."""
        with torch.autocast(h.device.type, enabled=False):
            return self._forward(h, weight)

    def _forward(self, h: torch.Tensor, weight: torch.Tensor):
        b, d, hh, ww = h.shape
        flat = h.permute(0, 2, 3, 1).reshape(-1, d).float()  # [N, D], N = B h w
        if self.l2:
            flat = F.normalize(flat, dim=1)
        codes = self.codes(weight)
        idx = nearest(flat, codes)  # [N]
        counts = torch.bincount(idx, minlength=self.k).float()  # [K], this rank (the logs)
        if self.training:
            everyone = counts.clone()  # [K], every rank's: the averages and the restarts use these
            _all_reduce(everyone)
            if self.update == "ema":
                with torch.no_grad():
                    self._ema_update(flat, idx, everyone, weight)
                codes = self.codes(weight)
        q = codes[idx]  # [N, D]; with update == "loss" the codebook loss's gradient reaches weight here
        loss = self.beta * F.mse_loss(flat, q.detach())  # commitment: the encoder moves to its codes
        if self.update == "loss":
            loss = loss + F.mse_loss(q, flat.detach())  # codebook: the codes move to their vectors
        if self.training:
            with torch.no_grad():
                self._restart(flat, everyone, weight)
        q_st = flat + (q - flat).detach()  # straight-through: forward q, backward identity to h
        z_q = q_st.view(b, hh, ww, d).permute(0, 3, 1, 2).contiguous()  # [B, D, h, w]
        return z_q, idx.view(b, hh, ww), loss, {"train/vq_loss": loss.detach(), **usage_logs(counts)}

    def snapshot(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """The codebook ``weight`` [K, D] and the running state, copied: what a step's forwards change."""
        return {"weight": weight.detach().clone(), **{k: v.clone() for k, v in self.state_dict().items()}}

    def restore(self, snapshot: dict[str, torch.Tensor], weight: torch.Tensor) -> None:
        """Undo a skipped step's moving averages and restarts (a non-finite batch would leave NaN
        codes behind, in every rank's codebook, for good)."""
        with torch.no_grad():
            weight.copy_(snapshot["weight"])
            self.load_state_dict({k: v for k, v in snapshot.items() if k != "weight"})

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        return F.normalize(weight.float(), dim=1) if self.l2 else weight.float()

    def _ema_update(self, flat: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor, weight: torch.Tensor) -> None:
        """N_k <- g N_k + (1 - g) n_k, m_k <- g m_k + (1 - g) sum of vectors on k, e_k = m_k / N_k
        (N_k Laplace-smoothed), from every rank's vectors."""
        if not bool(self.started):  # m_k = the codes at first (N_k = 1): unused codes stay put
            self.ema_sum.copy_(weight.detach().float())
            self.started.fill_(True)
        sums = torch.zeros(self.k, self.dim, device=flat.device).index_add_(0, idx, flat)  # [K, D]
        _all_reduce(sums)  # (counts: every rank's already)
        g = self.decay
        self.ema_count.mul_(g).add_(counts, alpha=1 - g)
        self.ema_sum.mul_(g).add_(sums, alpha=1 - g)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + EPS) / (total + self.k * EPS) * total  # [K]
        new = self.ema_sum / smoothed[:, None]
        weight.data.copy_(F.normalize(new, dim=1) if self.l2 else new)

    def _restart(self, flat: torch.Tensor, counts: torch.Tensor, weight: torch.Tensor) -> None:
        """Codes whose moving-average use is under ``dead_threshold`` x the uniform share (N / K
        vectors a step) -> random vectors of this step (rank 0's, broadcast). The first step
        re-seeds every code no vector chose: the codebook starts from the encoder's outputs.
        ``counts``: [K], every rank's."""
        share = float(counts.sum()) / self.k  # vectors a code gets a step under uniform use
        if bool(self.started_use):
            self.use.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        else:
            self.use.copy_(counts)
            self.started_use.fill_(True)
        if self.dead_threshold <= 0:
            return
        dead = torch.nonzero(self.use < self.dead_threshold * share).flatten()  # [n_dead]
        if len(dead) == 0:
            return
        pick = torch.randint(len(flat), (len(dead),), device=flat.device)
        fresh = flat[pick].detach().clone()  # [n_dead, D]
        # several codes re-seeded from one vector: a little noise sets them apart
        fresh = fresh + 1e-3 * fresh.std().clamp_min(1e-6) * torch.randn_like(fresh)
        _broadcast(fresh)
        fresh = F.normalize(fresh, dim=1) if self.l2 else fresh
        weight.data[dead] = fresh.to(weight.dtype)
        # counted as used at the uniform share: a grace of log(threshold) / log(decay) steps
        self.ema_sum[dead] = fresh * share
        self.ema_count[dead] = share
        self.use[dead] = share


def build_quantizer(params) -> Quantizer:
    """The quantizer of ``model.*`` / ``loss.*`` (ldm_vae.config.Params)."""
    m, loss = params.model, params.loss
    return Quantizer(m.codebook_size, m.code_dim or m.latent_channels, loss.vq_beta, loss.codebook_update,
                     loss.codebook_decay, loss.dead_code_threshold, m.codebook_l2)


@torch.no_grad()
def nearest(flat: torch.Tensor, codes: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """argmin_k ||x - e_k||^2 per row of ``flat`` [N, D] over ``codes`` [K, D] -> [N] long, in
    chunks of rows (N x K distances at once would be gigabytes for a big codebook)."""
    sq = codes.pow(2).sum(1)  # [K]
    out = []
    for part in flat.split(chunk):
        out.append((sq[None, :] - 2 * part @ codes.t()).argmin(1))  # ||x||^2 is the same for every k
    return torch.cat(out) if out else flat.new_zeros(0, dtype=torch.long)


def token_codes(vq, tokens: torch.Tensor) -> torch.Tensor:
    """A VQModel's codes of ``tokens`` [B, h, w] (long): [B, D, h, w], what its decoder takes with
    ``decode(codes, force_not_quantize=True)``."""
    b, h, w = tokens.shape
    return vq.quantize.embedding.weight[tokens.flatten()].view(b, h, w, -1).permute(0, 3, 1, 2).contiguous()


def usage_logs(counts: torch.Tensor) -> dict:
    """Codebook use of a histogram [K]: the share of codes used and the perplexity exp(H)."""
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"train/codebook_used": (counts > 0).float().mean(), "train/codebook_perplexity": entropy.exp()}


def histogram_stats(counts, k: int) -> dict:
    """What evaluate and latent health report of a code histogram (a list or tensor of K counts):
    the share used, the perplexity, and the rates in bits per latent position: log2 K (fixed-length
    codes) and the histogram's entropy (what an entropy coder would spend)."""
    c = torch.as_tensor(counts, dtype=torch.float64)
    p = c / c.sum().clamp_min(1)
    nz = p[p > 0]
    entropy_bits = float(-(nz * nz.log2()).sum())
    return {
        "codebook_size": k,
        "codes_used": int((c > 0).sum()),
        "usage": float((c > 0).double().mean()),
        "perplexity": float(2**entropy_bits),
        "bits_per_token": math.log2(k),
        "entropy_bits_per_token": entropy_bits,
    }


def token_dtype(k: int):
    """The smallest unsigned integer numpy type that holds codes 0 .. k - 1."""
    import numpy as np

    for dtype in (np.uint8, np.uint16, np.uint32):
        if k - 1 <= np.iinfo(dtype).max:
            return dtype
    raise ValueError(f"a codebook of {k} codes needs more than 32 bits a token")


def _all_reduce(*tensors: torch.Tensor) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t)


def _broadcast(t: torch.Tensor) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(t, 0)
