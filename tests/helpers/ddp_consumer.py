"""Two gloo processes read latent shards with latent_loader and all-reduce once per batch, as a
DDP trainer's backward does: ``python tests/helpers/ddp_consumer.py SHARD_DIR``. Each rank writes
{"rank", "batches", "seen"} to SHARD_DIR/../rank<r>.json. With unequal batch counts the all-reduce
of the longer rank would
wait for ever (the timeout below turns that into a failure)."""

import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: ldm_vae


def run(rank: int, shards: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    from ldm_vae.loader import latent_loader

    loader = latent_loader(f"{shards}/*.tar", batch_size=3, num_workers=2, normalize="none", shuffle=10)
    batches = seen = 0
    for epoch in range(2):
        loader.set_epoch(epoch)
        for batch in loader:
            dist.all_reduce(torch.ones(1))  # every rank must reach every step
            batches += 1
            seen += len(batch["key"]) if epoch == 0 else 0
    dist.barrier()
    report = {"rank": rank, "batches": batches, "seen": seen}
    (Path(shards).parent / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run, args=(sys.argv[1], port), nprocs=2)
