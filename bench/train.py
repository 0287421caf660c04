"""Training-loop throughput: the real train() against the model's own forward/backward, one run.

    python bench/train.py [--steps 420] [--skip 20] [--segment 25] [--prepared data/prepared]

Both sides use the default params (params.yaml: model, loss, batch and crop size). The baseline
is the bare per-step compute on synthetic tensors already in memory: forward through the trained
module, the loss, backward, clipping, the AdamW step and the EMA step. The real side is
``ldm_vae.train.training.train`` on the prepared shards (decode, crop, flip and fade of every image,
batching, logging). Their ratio is the data pipeline's (and the loop's) overhead; the target is
under 5%. The two run interleaved in one process (a bare segment every ``--segment`` real steps),
because this machine's speed drifts by 15% between minutes. The first ``--skip`` steps are not
timed (allocator and thread warm-up).
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


class BareLoop:
    """Forward + loss + backward + clip + AdamW + EMA on one fixed synthetic batch, in segments."""

    def __init__(self, params, perceptual=None):
        from diffusers.training_utils import EMAModel

        from ldm_vae.model import TrainedAutoencoder, build_vae
        from ldm_vae.train.losses import VAELoss

        t = self.t = params.train
        size = t.crop_size or params.data.resolution
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.mixed_precision)
        self.autocast = torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)
        self.model = TrainedAutoencoder(build_vae(params.model, params.data.resolution), params.loss.logvar_init,
                                        params.loss.learn_logvar).to(self.device)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=t.lr,
                                     betas=(t.adam_beta1, t.adam_beta2))
        self.ema = EMAModel(self.model.vae.parameters(), decay=t.ema_decay)
        self.loss_fn = VAELoss(params.loss, perceptual)
        self.x = torch.rand(t.batch_size, 3, size, size, device=self.device) * 2 - 1  # [B, 3, crop, crop]
        self.step = 0

    def run(self, steps: int) -> float:
        """Seconds for ``steps`` steps."""
        t0 = time.perf_counter()
        for _ in range(steps):
            with self.autocast:
                rec, mean, logvar, rec_down = self.model(self.x, down=params_down(self.loss_fn))
                loss, _ = self.loss_fn(rec, self.x, mean, logvar, self.model.output_logvar, step=self.step,
                                       rec_down=rec_down)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.t.grad_clip)
            self.opt.step()
            self.ema.step(self.model.vae.parameters())
            self.step += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def params_down(loss_fn) -> bool:
    """Whether the forward decodes the 2x-downsampled latent too (loss.scale_equivariance), as train() does."""
    return loss_fn.cfg.scale_equivariance > 0


def interleaved(params, prepared: Path, steps: int, skip: int, segment: int, tmp: Path, perceptual=None) -> dict:
    """The real train() with a bare segment run inside its step callback every ``segment`` steps.

    Real steps are timed from one callback's return to the next callback, so the bare segments
    are not counted in them; both sides then see the same machine state, minute by minute.
    """
    from ldm_vae.train.training import train

    bare = BareLoop(params, perceptual)
    bare.run(skip)
    clock = {"real": 0.0, "bare": 0.0, "real_steps": 0, "bare_steps": 0, "last": None}

    def on_step(step, x, accelerator, model):
        if x.is_cuda:
            torch.cuda.synchronize()  # a step's time is its GPU work, not its launch
        now = time.perf_counter()
        if step > skip and clock["last"] is not None:
            clock["real"] += now - clock["last"]
            clock["real_steps"] += 1
        if step >= skip and step % segment == 0 and step < steps:
            clock["bare"] += bare.run(segment)
            clock["bare_steps"] += segment
        clock["last"] = time.perf_counter()

    train(params, shard_paths(prepared / "train"), shard_paths(prepared / "val"), tmp / "vae", tmp / "logs",
          tmp / "ck", perceptual=perceptual, on_step=on_step)
    b = params.train.batch_size
    bare_ips, real_ips = clock["bare_steps"] * b / clock["bare"], clock["real_steps"] * b / clock["real"]
    return {"bare_images_per_s": round(bare_ips, 1), "train_images_per_s": round(real_ips, 1),
            "overhead_pct": round(100 * (1 - real_ips / bare_ips), 1), "steps_each": clock["real_steps"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=420)
    ap.add_argument("--skip", type=int, default=20)
    ap.add_argument("--prepared", type=Path, default=ROOT / "data" / "prepared")
    ap.add_argument("--segment", type=int, default=25)
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--num-workers", type=int, default=None, help="override train.num_workers")
    ap.add_argument(
        "--cache-mb", type=int, default=None, help="override train.cache_mb (0: decode every image every time)"
    )
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    from dataclasses import replace

    params = load_params(args.params)
    # No validation, checkpoint or sample inside the timed window: they are not per-step costs.
    big = args.steps + 1
    workers = params.train.num_workers if args.num_workers is None else args.num_workers
    cache_mb = params.train.cache_mb if args.cache_mb is None else args.cache_mb
    params = replace(params, train=replace(params.train, max_steps=args.steps, val_every=big, sample_every=big,
                                           checkpoint_every=big, scale_samples=16, num_workers=workers,
                                           cache_mb=cache_mb))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepared = args.prepared
        if not shard_paths(prepared / "train"):
            from ldm_vae.ingest.download import run_download
            from ldm_vae.ingest.prepare import run_prepare

            run_download(params.data, tmp / "raw")
            run_prepare(params.data, tmp / "raw", tmp / "prepared")
            prepared = tmp / "prepared"
        perceptual = None
        if params.loss.perceptual_weight > 0:  # the SD presets: LPIPS on both sides
            from ldm_vae.lpips import load_lpips

            perceptual = load_lpips("loss.perceptual_weight")
        rows = []
        for r in range(args.repeats):
            rows.append(interleaved(params, prepared, args.steps, args.skip, args.segment, tmp / f"run{r}", perceptual))
            print(json.dumps(rows[-1]), flush=True)
    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                "threads": torch.get_num_threads(),
                "batch": params.train.batch_size,
                "num_workers": workers,
                "cache_mb": cache_mb,
                "crop": params.train.crop_size,
                "runs": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
