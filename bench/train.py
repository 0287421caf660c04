"""Training-loop throughput: the real train() against the model's own forward/backward, one run.

    python bench/train.py [--steps 120] [--skip 20] [--prepared data/prepared]

Both sides use the default params (params.yaml: model, loss, batch and crop size). The baseline
is the bare per-step compute on synthetic tensors already in memory: forward through the trained
module, the loss, backward, clipping, the AdamW step and the EMA step. The real side is
``ldm_vae.training.train`` on the prepared shards (decode, crop, flip and fade of every image,
batching, logging). Their ratio is the data pipeline's (and the loop's) overhead; the target is
under 5%. The first ``--skip`` steps of each side are not timed (allocator and thread warm-up).
Without data/prepared, the download and prepare stages are run on the builtin source first.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm_vae.config import load_params  # noqa: E402
from ldm_vae.shards import shard_paths  # noqa: E402


def bare_loop(params, steps: int, skip: int) -> float:
    """images/s of forward + loss + backward + clip + AdamW + EMA on one fixed synthetic batch."""
    from diffusers.training_utils import EMAModel

    from ldm_vae.losses import VAELoss
    from ldm_vae.model import TrainedAutoencoder, build_vae

    t = params.train
    size = t.crop_size or params.data.resolution
    model = TrainedAutoencoder(build_vae(params.model, params.data.resolution), params.loss.logvar_init,
                               params.loss.learn_logvar)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr,
                            betas=(t.adam_beta1, t.adam_beta2))
    ema = EMAModel(model.vae.parameters(), decay=t.ema_decay)
    loss_fn = VAELoss(params.loss)
    x = torch.rand(t.batch_size, 3, size, size) * 2 - 1  # [B, 3, crop, crop]
    for i in range(steps):
        if i == skip:
            t0 = time.perf_counter()
        rec, mean, logvar = model(x)
        loss, _ = loss_fn(rec, x, mean, logvar, model.output_logvar, step=i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        ema.step(model.vae.parameters())
    return (steps - skip) * t.batch_size / (time.perf_counter() - t0)


def real_loop(params, prepared: Path, steps: int, skip: int, tmp: Path) -> float:
    from ldm_vae.training import train

    stamps = {}

    def on_step(step, x, accelerator, model):
        if step in (skip, steps):
            stamps[step] = time.perf_counter()

    train(params, shard_paths(prepared / "train"), shard_paths(prepared / "val"), tmp / "vae", tmp / "logs",
          tmp / "ck", on_step=on_step)
    return (steps - skip) * params.train.batch_size / (stamps[steps] - stamps[skip])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--skip", type=int, default=20)
    ap.add_argument("--prepared", type=Path, default=ROOT / "data" / "prepared")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    from dataclasses import replace

    params = load_params(ROOT / "params.yaml")
    # No validation, checkpoint or sample inside the timed window: they are not per-step costs.
    big = args.steps + 1
    params = replace(params, train=replace(params.train, max_steps=args.steps, val_every=big, sample_every=big,
                                           checkpoint_every=big, scale_samples=16))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepared = args.prepared
        if not shard_paths(prepared / "train"):
            from ldm_vae.download import run_download
            from ldm_vae.prepare import run_prepare

            run_download(params.data, tmp / "raw")
            run_prepare(params.data, tmp / "raw", tmp / "prepared")
            prepared = tmp / "prepared"
        rows = []
        for r in range(args.repeats):  # alternate the two sides so drift hits both alike
            bare = bare_loop(params, args.steps, args.skip)
            real = real_loop(params, prepared, args.steps, args.skip, tmp / f"run{r}")
            rows.append({"bare_images_per_s": round(bare, 1), "train_images_per_s": round(real, 1),
                         "overhead_pct": round(100 * (1 - real / bare), 1)})
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"threads": torch.get_num_threads(), "batch": params.train.batch_size,
                      "crop": params.train.crop_size, "steps_timed": args.steps - args.skip, "runs": rows}))


if __name__ == "__main__":
    main()
