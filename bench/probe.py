"""The denoising probe's cost: seconds per training step of its UNet, at the demo's size and at a
preset's, on this machine's device (the probe stage's budget is steps x this).

    python bench/probe.py [--params params.yaml presets/sd-kl-f8-256-c4.yaml] [--steps 5]

Each params file gives the probe (``probe.widths``, ``probe.batch_size``, ``probe.steps``) and the
latent size (``data.resolution`` / 8, ``model.latent_channels``); the UNet gets fresh weights,
which cost the same as trained ones. One warm-up step, then the mean of ``--steps``.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm_vae.config import load_params  # noqa: E402
from ldm_vae.probe import LOG_SNR_RANGE, build_probe_unet, timestep, vp  # noqa: E402


def step_seconds(params_file: Path, steps: int, device: str) -> tuple[float, int]:
    """Mean seconds of one probe training step (forward, backward, AdamW), and the UNet's size."""
    p = load_params(params_file)
    side, c = p.data.resolution // 8, p.model.latent_channels
    unet = build_probe_unet(c, p.probe.widths).to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=p.probe.lr)
    z0 = torch.randn(p.probe.batch_size, c, side, side, device=device)  # [B, C, h, w]
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        lam = torch.empty(len(z0), device=device).uniform_(*LOG_SNR_RANGE)
        alpha, sigma = (v[:, None, None, None] for v in vp(lam))
        eps = torch.randn_like(z0)
        loss = torch.nn.functional.mse_loss(unet(alpha * z0 + sigma * eps, timestep(lam)).sample,
                                            alpha * eps - sigma * z0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step warms up
            times.append(time.perf_counter() - start)
    return sum(times) / len(times), sum(t.numel() for t in unet.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, nargs="+",
                    default=[ROOT / "params.yaml", ROOT / "presets" / "sd-kl-f8-256-c4.yaml"])
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {device}, {torch.get_num_threads()} threads")
    for path in args.params:
        p = load_params(path)
        sec, n = step_seconds(path, args.steps, device)
        side = p.data.resolution // 8
        print(f"{path.name}: {p.model.latent_channels}x{side}x{side} latents, batch {p.probe.batch_size}, widths "
              f"{list(p.probe.widths)} ({n / 1e6:.2f} M parameters): {sec * 1000:.0f} ms a step, "
              f"{p.probe.steps} steps = {sec * p.probe.steps / 60:.1f} min")


if __name__ == "__main__":
    main()
