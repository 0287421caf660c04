"""Prepare stage: raw images -> square (or aspect-ratio bucket) RGB crops in train/val webdataset shards.

Every core (``data.num_workers``); several machines as for download (``engine.kind: ray``, shared
folders): one unit per raw shard, whichever node is free takes the next.

    python stages/prepare.py --raw data/raw --out data/prepared
"""

import argparse
import sys
from pathlib import Path

from ldm_vae.config import load_params_or_exit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--raw", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="prepared folder (train/*.tar, val/*.tar)")
    args = ap.parse_args()
    params = load_params_or_exit(args.params)

    from ldm_vae.ingest.prepare import run_prepare

    try:
        counts = run_prepare(params.data, args.raw, args.out, params.engine)
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # UnitFailed names the raw shard
        sys.exit(f"prepare: {e}")
    for split, c in counts.items():
        print(f"prepare {split}: {c['samples']} samples from {c['images']} images in {c['shards']} shards")
        if "buckets" in c:
            print(f"  buckets (WxH: samples): {', '.join(f'{b}: {n}' for b, n in c['buckets'].items())}")


if __name__ == "__main__":
    main()
