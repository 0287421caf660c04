"""Encode stage: every prepared image -> posterior mean/std in latent webdataset shards.

One process per GPU (encode.num_processes: auto), each on its own input shards; a killed run,
run again, keeps what it finished (see ldm_vae/encoding.py).

    python stages/encode.py --vae data/vae --prepared data/prepared --out data/latents
"""

import argparse
import sys
from pathlib import Path

from ldm_vae.config import load_params_or_exit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--vae", type=Path, required=True)
    ap.add_argument("--prepared", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="latents folder (train/, val/, stats.json)")
    args = ap.parse_args()
    params = load_params_or_exit(args.params)

    import torch

    from ldm_vae.encoding import CoverageError, run_encode
    from ldm_vae.export import load_vae
    from ldm_vae.launch import resolve_processes

    vae = load_vae(args.vae, "cuda" if torch.cuda.is_available() else "cpu")
    try:
        stats = run_encode(vae, args.prepared, args.out, params.encode, vae_dir=args.vae,
                           num_processes=resolve_processes(params.encode.num_processes))
    except (CoverageError, ValueError) as e:
        sys.exit(f"encode: {e}")
    counts = ", ".join(f"{s} {v['count']}" for s, v in stats["splits"].items())
    print(f"encode: {counts} latents of shape {stats['latent_shape']}; "
          f"train latent mean {stats['mean']:.4f} std {stats['std']:.4f}")


if __name__ == "__main__":
    main()
