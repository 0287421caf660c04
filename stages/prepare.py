"""Prepare stage: raw images -> square (or aspect-ratio bucket) RGB crops in train/val webdataset shards.

Every core (``data.num_workers``); several machines as for download (one launcher per machine,
shared folders): rank r takes raw shards r, r+N, ..., rank 0 writes counts.json.

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
        counts = run_prepare(params.data, args.raw, args.out)
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # UnitFailed names the raw shard
        sys.exit(f"prepare: {e}")
    if counts is None:
        return  # not rank 0
    for split, c in counts.items():
        print(f"prepare {split}: {c['samples']} samples from {c['images']} images in {c['shards']} shards")
        if "buckets" in c:
            print(f"  buckets (WxH: samples): {', '.join(f'{b}: {n}' for b, n in c['buckets'].items())}")


if __name__ == "__main__":
    main()
