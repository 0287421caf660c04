"""Inputs stage: what the VAEs named in params are, so that DVC re-runs train or evaluate when one
changes (ldm_vae/inputs.py). Always run by dvc repro; no torch, well under a second.

    python stages/inputs.py --out data/inputs
"""

import argparse
import sys
from pathlib import Path

from ldm_vae.config import ParamError, load_params_or_exit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", type=Path, required=True, help="init_from.json, references.json")
    args = ap.parse_args()
    params = load_params_or_exit(args.params)

    from ldm_vae.inputs import write_inputs

    try:
        contents = write_inputs(params, args.out)
    except (ParamError, OSError) as e:
        sys.exit(f"inputs: {e}")
    for record in filter(None, [contents["init_from.json"]["init_from"], *contents["references.json"].values()]):
        what = (
            f"{len(record['files'])} files"
            if "files" in record
            else f"commit {record['revision'] or 'unknown (offline, not cached)'}"
        )
        print(f"inputs: {record['location']}: {what}")


if __name__ == "__main__":
    main()
