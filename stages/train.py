"""Train stage: fit the autoencoder on the prepared train shards and export it for diffusers.

    python stages/train.py --prepared data/prepared --vae data/vae --logs data/train \
        --checkpoints data/checkpoints
"""

import argparse
import sys
from pathlib import Path

from ldm_vae.config import load_params_or_exit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--prepared", type=Path, required=True)
    ap.add_argument("--vae", type=Path, required=True, help="export folder (diffusers save_pretrained)")
    ap.add_argument("--logs", type=Path, required=True, help="curves, metrics and sample grids")
    ap.add_argument("--checkpoints", type=Path, required=True, help="resumable training state")
    args = ap.parse_args()
    params = load_params_or_exit(args.params)

    from ldm_vae.shards import shard_paths
    from ldm_vae.training import train

    train_shards, val_shards = shard_paths(args.prepared / "train"), shard_paths(args.prepared / "val")
    if not train_shards or not val_shards:
        sys.exit(f"train: {args.prepared} needs train/*.tar and val/*.tar; run the prepare stage first")
    result = train(params, train_shards, val_shards, args.vae, args.logs, args.checkpoints)
    if result:
        print(f"train: {result['steps']} steps in {result['train_seconds']} s, val PSNR {result['val_psnr']:.2f} dB, "
              f"scaling_factor {result['scaling_factor']:.4f}, shift_factor {result['shift_factor']:.4f}")


if __name__ == "__main__":
    main()
