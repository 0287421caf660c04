"""Evaluate stage: decode the stored validation latents and measure reconstruction fidelity.

    python stages/evaluate.py --vae data/vae --latents data/latents --prepared data/prepared \
        --out data/eval
"""

import argparse
import json
import sys
from pathlib import Path

from ldm_vae.config import load_params_or_exit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--vae", type=Path, required=True)
    ap.add_argument("--latents", type=Path, required=True)
    ap.add_argument("--prepared", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="metrics.json, per_image.csv, recon_grid.png")
    ap.add_argument("--inputs", type=Path, help="the inputs stage's folder: references at the commits it recorded")
    args = ap.parse_args()
    params = load_params_or_exit(args.params)
    from ldm_vae.evaluate.perceptual import MetricUnavailable, check_available

    try:
        check_available(params.evaluate)  # before any heavy work: asked-for metrics must exist
    except MetricUnavailable as e:
        sys.exit(f"evaluate: {e}")

    import torch

    from ldm_vae.evaluate.evaluation import load_references, run_evaluate
    from ldm_vae.export import load_vae
    from ldm_vae.inputs import pinned_references

    device = "cuda" if torch.cuda.is_available() else "cpu"
    vae = load_vae(args.vae, device)
    try:
        references = load_references(pinned_references(params.evaluate.references, args.inputs), device)
    except (OSError, ValueError) as e:
        sys.exit(f"evaluate: {e}")
    stats = json.loads((args.latents / "stats.json").read_text())
    m = run_evaluate(vae, args.latents / "val", args.prepared / "val", args.out, params.evaluate, stats, references)
    health = (f"{m['codes_used']} of {m['codebook_size']} codes used (perplexity {m['codebook_perplexity']:.1f}"
              f"{', COLLAPSED' if m['collapsed_codebook'] else ''}), {m['rate_bpp']:.4f} bits per pixel"
              if "codebook_size" in m else f"{m['collapsed_channels']} of {m['latent_channels']} channels collapsed")
    print(f"evaluate: {m['num_images']} images, PSNR {m['psnr']:.2f} dB (resize baseline {m['psnr_bicubic']:.2f}), "
          f"SSIM {m['ssim']:.4f} (baseline {m['ssim_bicubic']:.4f}); fp16 storage costs "
          f"{m['psnr_fp16_cost']:.3f} dB; {health}")
    for name in references:
        print(f"evaluate: reference {name} ({m[f'latent_channels_{name}']} channels, "
              f"{m[f'compression_ratio_{name}']:.0f}:1): PSNR {m[f'psnr_{name}']:.2f} dB, SSIM {m[f'ssim_{name}']:.4f}")


if __name__ == "__main__":
    main()
