"""Channel comparison report over DVC experiments (not a pipeline stage: it reads the runs).

    for c in 4 8 16; do dvc exp run -S model.latent_channels=$c; done
    python stages/compare.py --out data/eval

Writes channels.csv (declared as a DVC plot), channels.md and channels.png: PSNR / SSIM (and
LPIPS / rFID when evaluated) of every run against its latent channel count and compression ratio;
rate_distortion.png: each run's rate (KL to the prior, bits per pixel) against its PSNR, coloured
by its denoising loss; and denoise.png: every probed run's denoising-probe curve.
"""

import argparse
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, default=Path("."), help="the DVC repository (default: here)")
    ap.add_argument("--commits", type=int, default=1,
                    help="also the experiments of this many commits back from HEAD (dvc exp show -n)")
    ap.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder for channels.csv, channels.md, channels.png, rate_distortion.png",
    )
    ap.add_argument("--with", dest="earlier", type=Path, action="append", default=[],
                    help="an earlier report's channels.csv: its rows beside these (a sweep whose experiments are gone)")
    args = ap.parse_args()

    from ldm_vae.compare import experiment_runs, rows_from_csv, write_report

    try:
        rows = experiment_runs(args.repo, args.commits)
        seen = {r["run"] for r in rows}
        rows += [r for path in args.earlier for r in rows_from_csv(path) if r["run"] not in seen]
        write_report(rows, args.out)
    except RuntimeError as e:
        sys.exit(f"compare: {e}")
    print((args.out / "channels.md").read_text(), end="")


if __name__ == "__main__":
    main()
