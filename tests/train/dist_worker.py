"""A 2-process gloo training run for test_distributed.py: ``python tests/train/dist_worker.py OUT PREPARED [vq]``.

Started plainly, it re-launches itself under accelerate through the train stage's own launcher
(ldm_vae.launch.relaunch). Each rank trains with its own output folders under OUT/rank<r>/ (so
anything a rank writes can be attributed to it) and records, after every optimizer step, a hash of
its batch and of its weights, and how many forwards ran through the DDP wrapper.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the helpers package


def main() -> None:
    out, prepared = Path(sys.argv[1]), Path(sys.argv[2])
    from ldm_vae.launch import launched, relaunch

    if not launched():
        sys.exit(relaunch(2, "no", [__file__, *sys.argv[1:]]))

    import torch

    from ldm_vae.shards import shard_paths
    from ldm_vae.train.training import train

    from helpers.common import make_params

    rank = int(os.environ["RANK"])
    record = {"batch": [], "weights": [], "wrapper": None, "ddp_forwards": 0}

    def on_step(step, x, accelerator, model):
        record["batch"].append(hashlib.sha256(x.cpu().numpy().tobytes()).hexdigest())
        h = hashlib.sha256()
        for m in (model, on_step.disc):
            for p in accelerator.unwrap_model(m).parameters():
                h.update(p.detach().cpu().numpy().tobytes())
        quantizer = accelerator.unwrap_model(model).quantizer
        if quantizer is not None:  # VQ: the codebook's averages and use counts must agree too
            for b in quantizer.buffers():
                h.update(b.detach().cpu().numpy().tobytes())
        record["weights"].append(h.hexdigest())
        if step == 1:
            record["wrapper"] = type(model).__name__

            def count(*_):
                record["ddp_forwards"] += 1

            model.register_forward_pre_hook(count)

    # The discriminator is built inside train(); catch it as accelerate prepares it.
    from accelerate import Accelerator

    prepare = Accelerator.prepare

    def spy(self, *objs, **kw):
        result = prepare(self, *objs, **kw)
        on_step.disc = result[1]
        return result

    Accelerator.prepare = spy
    vq = sys.argv[3:] == ["vq"]  # a VQ autoencoder: codebook averages all-reduced, restarts from rank 0
    params = make_params(model={"regularizer": "vq", "codebook_size": 16} if vq else {},
                         loss={"disc_weight": 0.5, "disc_start": 1, "disc_channels": 8, "disc_layers": 2,
                               "learn_logvar": True},
                         train={"max_steps": 4, "batch_size": 2, "grad_accum_steps": 2, "log_every": 1,
                                "val_every": 2, "sample_every": 2, "checkpoint_every": 2, "warmup_steps": 2})
    mine = out / f"rank{rank}"
    train(params, shard_paths(prepared / "train"), shard_paths(prepared / "val"), mine / "vae", mine / "logs",
          mine / "ckpt", on_step=on_step)
    record["world_size"] = int(os.environ["WORLD_SIZE"])
    record["threads"] = torch.get_num_threads()
    (out / f"record{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
