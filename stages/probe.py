"""Probe stage: how hard the latents are for diffusion. A small fixed UNet is trained on the train
latents for a fixed budget (params.yaml `probe`) and scored on the validation latents at fixed noise
levels (ldm_vae/probe.py).

    python stages/probe.py --latents data/latents --out data/probe
"""

import argparse
import sys
from pathlib import Path

from ldm_vae.config import load_params_or_exit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--latents", type=Path, required=True, help="the encode stage's output")
    ap.add_argument("--out", type=Path, required=True, help="metrics.json, denoise.csv, denoise.png")
    args = ap.parse_args()
    params = load_params_or_exit(args.params)

    from ldm_vae.probe import denoise_levels, run_probe

    try:
        m = run_probe(args.latents, args.out, params.probe)
    except (OSError, ValueError) as e:
        sys.exit(f"probe: {e}")
    if m["denoise_loss"] is None:
        print(f"probe: {m['denoise_probe']}")
        return
    per_level = ", ".join(f"{lam:+g}: {loss:.3f}" for lam, loss in denoise_levels(m))
    print(
        f"probe: denoising loss {m['denoise_loss']:.4f} (1.0: no structure found; per log-SNR {per_level}); "
        f"{m['probe_steps']} steps x {m['probe_batch_size']}"
        f"{' (partial batches)' if m['probe_partial_batches'] else ''}, "
        f"{m['probe_parameters'] / 1e6:.2f}M parameters, "
        f"{m['probe_val_latents']} validation latents, {m['seconds']:.0f} s"
    )


if __name__ == "__main__":
    main()
