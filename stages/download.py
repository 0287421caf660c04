"""Download stage: find every image of ``data.source``, keep the good ones, record the rest.

Every core (``data.num_workers``); several machines: ``engine.kind: ray`` runs the units as tasks on
a Ray cluster, with the output folder on a filesystem every node mounts (docs/scale.md: A cluster).

    python stages/download.py --out data/raw
"""

import argparse
import json
import sys
from pathlib import Path

from ldm_vae.config import load_params_or_exit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", type=Path, required=True, help="raw folder (shards/, manifest.jsonl, rejected.jsonl)")
    args = ap.parse_args()
    params = load_params_or_exit(args.params)

    from ldm_vae.ingest.download import run_download
    from ldm_vae.runner import UnitFailed

    try:
        summary = run_download(params.data, args.out, params.engine)
    except (FileNotFoundError, ValueError, UnitFailed) as e:  # a missing list/folder, an unknown column
        sys.exit(f"download: {e}")
    print(f"download: kept {summary['kept']}, rejected {summary['rejected']} {json.dumps(summary['reasons'])}")
    if summary["kept"] == 0:
        sys.exit(f"download: no usable image in {params.data.source!r}; see {args.out}/rejected.jsonl")


if __name__ == "__main__":
    main()
