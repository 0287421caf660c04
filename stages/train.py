"""Train stage: fit the autoencoder on the prepared train shards and export it for diffusers.

    python stages/train.py --prepared data/prepared --vae data/vae --logs data/train \
        --checkpoints data/checkpoints

With train.num_processes above 1 (``auto``: every visible GPU) the command re-runs itself under
``accelerate launch``, one DDP process each. Multi-node: start it on every node yourself, e.g.
``accelerate launch --num_machines 2 --machine_rank R --main_process_ip H --num_processes 16
stages/train.py ...``; under a launcher it trains as the rank it was given.
"""

import argparse
import sys
from pathlib import Path

from ldm_vae.config import ParamError, load_params_or_exit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--prepared", type=Path, required=True)
    ap.add_argument("--vae", type=Path, required=True, help="export folder (diffusers save_pretrained)")
    ap.add_argument("--logs", type=Path, required=True, help="curves, metrics and sample grids")
    ap.add_argument("--checkpoints", type=Path, required=True, help="resumable training state")
    ap.add_argument("--inputs", type=Path, help="the inputs stage's folder: model.init_from at the commit it recorded")
    args = ap.parse_args()
    params = load_params_or_exit(args.params)
    from ldm_vae.inputs import pinned_init_from

    params = pinned_init_from(params, args.inputs)

    from ldm_vae.launch import launched, relaunch, resolve_processes
    from ldm_vae.lpips import WeightsUnavailable, load_lpips, require_weights
    from ldm_vae.model import check_init_from
    from ldm_vae.shards import shard_paths

    train_shards, val_shards = shard_paths(args.prepared / "train"), shard_paths(args.prepared / "val")
    if not train_shards or not val_shards:
        sys.exit(f"train: {args.prepared} needs train/*.tar and val/*.tar; run the prepare stage first")
    # Everything that can be wrong with the set-up fails here, before any process or model starts.
    try:
        check_init_from(params.model)
        if params.loss.perceptual_weight > 0 and not params.model.use_as_is:
            require_weights("loss.perceptual_weight")  # downloads them when missing and online
    except (ParamError, WeightsUnavailable) as e:
        sys.exit(f"train: {e}")
    if params.model.use_as_is:
        from ldm_vae.train.as_is import export_as_is

        try:
            result = export_as_is(params, val_shards, args.vae, args.logs)
        except (FileNotFoundError, OSError) as e:
            sys.exit(f"train: {e}")
        print(f"train: {params.model.init_from} used as it is (no training): {result['latent_channels']} channels, "
              f"val PSNR {result['val_psnr']:.2f} dB, scaling_factor {result['vae_scaling_factor']}, "
              f"shift_factor {result['vae_shift_factor']}")
        return
    processes = resolve_processes(params.train.num_processes)
    if processes > 1 and not launched():
        sys.exit(relaunch(processes, params.train.mixed_precision, sys.argv, params.train.cpu_threads))

    from ldm_vae.train.training import TrainingDiverged, train

    perceptual = load_lpips("loss.perceptual_weight", download=False) if params.loss.perceptual_weight > 0 else None

    try:
        result = train(params, train_shards, val_shards, args.vae, args.logs, args.checkpoints, perceptual=perceptual)
    except TrainingDiverged as e:
        sys.exit(str(e))
    if result:
        print(f"train: {result['steps']} steps on {result['processes']} process(es) in {result['train_seconds']} s, "
              f"val PSNR {result['val_psnr']:.2f} dB, data/vae/config.json: scaling_factor "
              f"{result['vae_scaling_factor']:.4f}, shift_factor {result['vae_shift_factor']:.4f}")
        env = result["environment"]
        print(
            f"train: the weights depend on: {env['device']}, {env['cpu']} ({env['cpu_capability']} kernels"
            f"{''.join(f', {k}={v}' for k, v in env['kernel_variables'].items())}), "
            f"{env['threads']} threads, torch {env['torch']} (data/train/run_info.json)"
        )


if __name__ == "__main__":
    main()
