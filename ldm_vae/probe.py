"""The denoising probe: how hard a latent space is for diffusion, measured by diffusing it.

A small diffusers ``UNet2DModel``, the same for every run (only its first and last convolutions
follow the channel count), is trained with a fixed budget (``probe.steps`` x ``probe.batch_size``)
to predict the noise added to the train latents, then scored on the validation latents at fixed
noise levels. Everything is in the loader's per-channel normalisation (stats.json: each channel
mean 0, variance 1) and in the variance-preserving form

    z_t = alpha * z_0 + sigma * eps,   alpha^2 = sigmoid(lambda),  sigma^2 = sigmoid(-lambda)

with lambda the log signal-to-noise ratio, so a noise level means the same for 4, 8 or 16 channels
and the losses are per latent element.

The probe predicts v = alpha * eps - sigma * z_0 (v-prediction, as SD 2's models do). A denoiser
that knows nothing about images predicts v = 0 (for independent N(0, 1) elements that is the best
guess, eps ~ sigma * z_t), so each level's score is the probe's v-MSE over that no-structure
denoiser's on the same latents and noise draws: 1.0 where the probe found nothing to use, lower
the more structure a diffusion model can exploit. (v-MSE = eps-MSE / alpha^2 = x0-MSE / sigma^2
of the same prediction, so the ratio is the same in any of the three parameterisations.)
``denoise_loss`` is its mean over the levels, each weighted equally. Lower is easier to diffuse at
this budget: read it beside the rate and the PSNR (a latent space that carries nothing is
trivially easy).
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DModel
from tqdm import tqdm

from .config import ProbeConfig
from .epochs import expand_shards, shard_shapes
from .files import atomic_write
from .loader import latent_loader
from .viz import pyplot, save_figure

LOG_SNR_RANGE = (-10.0, 10.0)  # training draws lambda uniformly here: about a DDPM schedule's span
WARMUP = 50  # steps of linear learning-rate warmup, then a cosine to zero at the budget's end


def build_probe_unet(channels: int, widths: tuple[int, ...]) -> UNet2DModel:
    """The fixed probe: plain residual blocks, attention at the lowest resolution."""
    down = ["DownBlock2D"] * (len(widths) - 1) + ["AttnDownBlock2D"]
    up = ["AttnUpBlock2D"] + ["UpBlock2D"] * (len(widths) - 1)
    return UNet2DModel(in_channels=channels, out_channels=channels, block_out_channels=tuple(widths),
                       layers_per_block=1, down_block_types=down, up_block_types=up,
                       norm_num_groups=min(32, widths[0]))


def vp(log_snr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) of a log-SNR, any shape: alpha^2 + sigma^2 = 1."""
    return torch.sigmoid(log_snr).sqrt(), torch.sigmoid(-log_snr).sqrt()


def timestep(log_snr: torch.Tensor) -> torch.Tensor:
    """The UNet's timestep input: lambda 10 (clean) -> 0, lambda -10 (noise) -> 1000, linear."""
    lo, hi = LOG_SNR_RANGE
    return (hi - log_snr) / (hi - lo) * 1000


def check_shapes(shapes: list, widths: tuple[int, ...]) -> None:
    """The UNet halves the latents len(widths) - 1 times: every side must divide."""
    step = 2 ** (len(widths) - 1)
    bad = [s for s in shapes if s[-1] % step or s[-2] % step]
    if bad:
        h, w = bad[0][-2:]
        raise ValueError(f"probe.widths: {len(widths)} levels halve the latents {len(widths) - 1} times, so their "
                         f"sides must be multiples of {step}; these latents are {w}x{h}: use fewer widths")


def _loader(shards, stats: Path, cfg: ProbeConfig, shuffle: int, drop_last: bool):
    return latent_loader(shards, batch_size=cfg.batch_size, num_workers=cfg.num_workers, drop_last=drop_last,
                         stats=stats, normalize="channel", sample_posterior=True, flip=False, shuffle=shuffle,
                         seed=cfg.seed)


@dataclass
class ProbeRun:
    losses: list[float]  # the training loss of each step
    partial_batches: bool  # no full batch per bucket and loader worker: trained on partial ones


def train_probe(unet: UNet2DModel, shards: list[str], stats: Path, cfg: ProbeConfig, device) -> ProbeRun:
    """``cfg.steps`` AdamW steps of v-prediction at lambda ~ U(LOG_SNR_RANGE).

    Batches hold one latent shape (one bucket) and come per loader worker, full ones only. Where
    no bucket gives a worker a full batch (a small bucketed set), the probe trains on the partial
    ones instead of failing, and says so: the budget is still ``cfg.steps`` steps."""
    partial = False
    loader = _loader(shards, stats, cfg, shuffle=1000, drop_last=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / WARMUP) * 0.5 * (
        1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    losses, epoch = [], 0
    bar = tqdm(total=cfg.steps, desc="probe", unit="step", dynamic_ncols=True, mininterval=1.0)
    unet.train()
    while len(losses) < cfg.steps:
        loader.set_epoch(epoch)
        before = len(losses)
        for batch in loader:
            z0 = batch["latent"].to(device)  # [B, C, h, w], per channel ~ N(0, 1)
            lam = torch.empty(len(z0), device=device).uniform_(*LOG_SNR_RANGE)  # [B]
            alpha, sigma = (v[:, None, None, None] for v in vp(lam))
            eps = torch.randn_like(z0)
            pred = unet(alpha * z0 + sigma * eps, timestep(lam)).sample  # [B, C, h, w]
            loss = torch.nn.functional.mse_loss(pred, alpha * eps - sigma * z0)  # v-prediction
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}", refresh=False)
            if len(losses) == cfg.steps:
                break
        epoch += 1
        if len(losses) == before:
            if partial:
                raise ValueError("probe: the train latent shards hold no latents")
            partial = True
            loader = _loader(shards, stats, cfg, shuffle=1000, drop_last=False)
            tqdm.write(f"probe: no bucket gives a loader worker a full batch of probe.batch_size {cfg.batch_size}; "
                       "training on partial batches (one bucket each)")
    bar.close()
    return ProbeRun(losses, partial)


@torch.no_grad()
def score_probe(unet: UNet2DModel, shards: list[str], stats: Path, cfg: ProbeConfig, device) -> tuple[dict, int]:
    """{lambda: (v-MSE per element, the no-structure denoiser's)} over the first ``cfg.val_latents``
    validation latents, each
    with ``cfg.val_draws`` fixed noise draws per level; and how many latents were scored."""
    torch.manual_seed(cfg.seed + 1)  # the posterior samples: the same whatever training did
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 2)
    levels = [float(x) for x in cfg.log_snrs]
    sq, base, count, seen = {lam: 0.0 for lam in levels}, {lam: 0.0 for lam in levels}, {lam: 0 for lam in levels}, 0
    unet.eval()
    for batch in _loader(shards, stats, cfg, shuffle=0, drop_last=False):
        z0 = batch["latent"][: cfg.val_latents - seen].to(device)  # [B, C, h, w]
        seen += len(z0)
        for lam in levels:
            lam_b = torch.full((len(z0),), lam, device=device)
            alpha, sigma = vp(torch.tensor(lam))
            for _ in range(cfg.val_draws):
                eps = torch.randn(z0.shape, generator=gen).to(device)
                pred = unet(alpha * z0 + sigma * eps, timestep(lam_b)).sample  # [B, C, h, w]
                v = (alpha * eps - sigma * z0).double()
                sq[lam] += float((pred - v).square().sum())
                base[lam] += float(v.square().sum())  # the no-structure denoiser predicts v = 0
                count[lam] += eps.numel()
        if seen >= cfg.val_latents:
            break
    if not seen:
        raise ValueError("probe: the validation shards hold no latents")
    return {lam: (sq[lam] / count[lam], base[lam] / count[lam]) for lam in levels}, seen


def probe_metrics(v_mse: dict, losses: list[float], cfg: ProbeConfig, n_params: int, n_val: int) -> dict:
    """details.json: the summary, then each level's relative loss, v-MSE and no-structure v-MSE."""
    levels = {_level(lam): {"relative": mse / base, "v_mse": mse, "baseline_v_mse": base}
              for lam, (mse, base) in v_mse.items()}
    tail = losses[-max(1, len(losses) // 10):]
    return {
        "denoise_loss": sum(v["relative"] for v in levels.values()) / len(levels),
        "denoise_levels": levels,
        "probe_train_loss": sum(tail) / len(tail),  # the last tenth of the budget
        "probe_steps": cfg.steps,
        "probe_batch_size": cfg.batch_size,
        "probe_parameters": n_params,
        "probe_val_latents": n_val,
    }


def _level(lam: float) -> str:
    return f"lsnr{lam:+g}"


def run_probe(latents: Path, out: Path, cfg: ProbeConfig) -> dict:
    """Train the probe on ``latents``/train, score it on ``latents``/val; write metrics.json (the
    headline), details.json, denoise.csv and denoise.png under ``out``; return the details."""
    stats_path = latents / "stats.json"
    stats = json.loads(stats_path.read_text())
    if stats.get("regularizer") == "vq":
        return _not_for_tokens(out)
    train, val = expand_shards(str(latents / "train" / "*.tar")), expand_shards(str(latents / "val" / "*.tar"))
    if not train or not val:
        raise ValueError(f"{latents}: the probe needs train and val latent shards")
    check_shapes([s for s in shard_shapes(train + val, stats) if s is not None], cfg.widths)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(cfg.seed)
    unet = build_probe_unet(stats["channels"], cfg.widths).to(device)
    start = time.perf_counter()
    run = train_probe(unet, train, stats_path, cfg, device)
    v_mse, n_val = score_probe(unet, val, stats_path, cfg, device)
    m = probe_metrics(v_mse, run.losses, cfg, sum(p.numel() for p in unet.parameters()), n_val)
    m["probe_partial_batches"] = run.partial_batches
    out.mkdir(parents=True, exist_ok=True)
    write_levels(m, out / "denoise.csv")
    save_denoise_plot({"this run": m}, out / "denoise.png")
    atomic_write(out / "details.json", json.dumps(m, indent=2) + "\n")
    # What `dvc metrics show` prints beside evaluate's headline (evaluation.HEADLINE): one number.
    atomic_write(out / "metrics.json", json.dumps({"denoise": round(m["denoise_loss"], 4)}, indent=2) + "\n")
    m["seconds"] = time.perf_counter() - start  # printed, not stored: it differs run to run
    return m


NOT_FOR_TOKENS = ("not applicable: the latents are VQ tokens, and the probe denoises continuous latents (a token "
                  "model's loss on them is the measure: README, VQ latents)")


def _not_for_tokens(out: Path) -> dict:
    """The stage's outputs for token latents: what the probe is not, said in each (no number)."""
    out.mkdir(parents=True, exist_ok=True)
    m = {"denoise_loss": None, "denoise_probe": NOT_FOR_TOKENS, "denoise_levels": {}}
    with open(out / "denoise.csv", "w", newline="") as f:
        csv.writer(f).writerow(["log_snr", "relative", "v_mse", "baseline_v_mse"])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.4, 1.6))
    ax.axis("off")
    ax.text(0.5, 0.5, "denoising probe: " + NOT_FOR_TOKENS.replace(", and ", ",\nand "), ha="center", va="center",
            fontsize=9, wrap=True)
    save_figure(fig, out / "denoise.png")
    atomic_write(out / "details.json", json.dumps(m, indent=2) + "\n")
    atomic_write(out / "metrics.json", json.dumps({"denoise": None}, indent=2) + "\n")
    return m


def write_levels(m: dict, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["log_snr", "relative", "v_mse", "baseline_v_mse"])
        for key, v in sorted(m["denoise_levels"].items(), key=lambda kv: float(kv[0][len("lsnr"):])):
            w.writerow([float(key[len("lsnr"):]), *(round(v[k], 6) for k in ("relative", "v_mse", "baseline_v_mse"))])


def denoise_levels(m: dict) -> list[tuple[float, float]]:
    """(log-SNR, relative loss) per level of the probe's metrics, by log-SNR."""
    return sorted((float(k[len("lsnr"):]), v["relative"]) for k, v in m["denoise_levels"].items())


def save_denoise_plot(runs: dict[str, dict], path: Path) -> None:
    """The relative denoising loss against log-SNR, one line per run (the comparison report draws
    every run's on one chart)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.4, 3.8))
    for name, m in runs.items():
        lam, loss = zip(*denoise_levels(m))
        ax.plot(lam, loss, "o-", label=f"{name}: {m['denoise_loss']:.3f}")
    ax.axhline(1.0, color="grey", ls="--", lw=1, label="no structure found (independent N(0, 1))")
    ax.set(xlabel="log-SNR (left: noisier, right: cleaner)", ylabel="v-MSE / the no-structure denoiser's",
           title="denoising probe: lower is easier to diffuse")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))  # beside the curves, never on them
    fig.tight_layout()
    save_figure(fig, path)
