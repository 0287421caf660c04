"""Encode stage: every prepared image -> posterior mean/std in latent webdataset shards.

One process per GPU (encode.num_processes: auto): with more than one, the command re-runs itself
under ``accelerate launch``, each rank on its own input shards. Several machines: ``engine.kind:
ray``, a Ray task per input shard (a GPU each where the cluster has GPUs) on a shared output
folder (docs/scale.md: A cluster); the driver checks coverage and writes stats.json. A killed run, run
again, keeps what it finished (see ldm_vae/encode/encoding.py).

    python stages/encode.py --vae data/vae --prepared data/prepared --out data/latents
"""

import argparse
import os
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

    from ldm_vae.encode.encoding import CoverageError, check_dtype, run_encode
    from ldm_vae.export import load_vae
    from ldm_vae.launch import launched, relaunch, resolve_processes
    from ldm_vae.runner import UnitFailed

    on_ray = params.engine.kind == "ray"
    try:  # before any process starts; on Ray each task checks the node it lands on
        if not on_ray:
            check_dtype(params.encode, "cuda" if _has_gpu() else "cpu")
    except ValueError as e:
        sys.exit(f"encode: {e}")
    processes = resolve_processes(params.encode.num_processes)
    if processes > 1 and not launched() and not on_ray:
        sys.exit(relaunch(processes, "no", sys.argv))

    # On Ray, the tasks load the VAE themselves; the driver's copy gives the fingerprint and stats.
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if _has_gpu() and not on_ray else "cpu"
    vae = load_vae(args.vae, device)
    try:
        stats = run_encode(vae, args.prepared, args.out, params.encode, params.engine, args.vae)
    except (CoverageError, ValueError, UnitFailed) as e:
        sys.exit(f"encode: {e}")
    if stats is None:
        return  # not rank 0: rank 0 checks and reports
    counts = ", ".join(f"{s} {v['count']}" for s, v in stats["splits"].items())
    shapes = stats["latent_shapes"]
    shape = f"of shape {shapes[0]['shape']}" if len(shapes) == 1 else f"in {len(shapes)} shapes (latent_shapes)"
    print(f"encode: {counts} latents {shape}; train latent mean {stats['mean']:.4f} std {stats['std']:.4f}")
    if stats["num_classes"]:
        seen = len(stats["splits"]["train"]["labels"])
        print(f"  labels: {stats['num_classes']} classes (classes.json), {seen} of them in train")
    if stats["regularizer"] == "vq":
        print(
            f"  tokens: {stats['codes_used']} of {stats['codebook_size']} codes used on train, perplexity "
            f"{stats['perplexity']:.1f}, {stats['entropy_bits_per_token']:.2f} of {stats['bits_per_token']:.0f} "
            "bits a token"
        )
    if stats["batch_fill"] is not None:
        print(f"  encode batches {100 * stats['batch_fill']:.0f}% full on average (each input shard ends in a "
              "partial one)")
    buckets = stats["splits"]["train"]["buckets"]
    if len(buckets) > 1:
        print(f"  train buckets (WxH: latents): {', '.join(f'{b}: {n}' for b, n in buckets.items())}")


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
