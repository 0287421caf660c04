"""Latent loader throughput: latents/s for 16x32x32 latents with 2 dataloader workers.

    python bench/loader.py [--samples 20000] [--workers 2] [--batch-size 256]

Writes synthetic float16 mean/std shards in the latent-shard format (the content does not
change the cost), then times full epochs of ``latent_loader`` with posterior sampling, random
flip choice and per-channel normalisation on, as a diffusion trainer would use it.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm_vae.samples import npy_bytes  # noqa: E402
from ldm_vae.loader import latent_loader  # noqa: E402
from ldm_vae.shards import ShardWriter  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    c, h = 16, 32
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with ShardWriter(tmp, "train-r000", 2500) as w:
            for i in range(args.samples):
                m = rng.standard_normal((c, h, h), dtype=np.float32).astype(np.float16)
                s = np.full((c, h, h), 0.1, dtype=np.float16)
                w.write({"__key__": f"k{i:07d}", "mean.npy": npy_bytes(m), "std.npy": npy_bytes(s),
                         "json": json.dumps({"key": f"k{i:07d}"}).encode(), "txt": b"a caption"})
        stats = {"channel_mean": [0.0] * c, "channel_std": [1.0] * c}
        loader = latent_loader(str(tmp / "*.tar"), batch_size=args.batch_size, num_workers=args.workers,
                               stats=stats, shuffle=1000)
        rates = []
        for epoch in range(args.epochs):
            t, n = time.perf_counter(), 0
            for batch in loader:
                n += batch["latent"].shape[0]
            rates.append(n / (time.perf_counter() - t))
            assert n == args.samples
            print(f"epoch {epoch}: {n} latents in {n / rates[-1]:.2f} s = {rates[-1]:.0f} latents/s", flush=True)
    print(f"best: {max(rates):.0f} latents/s ({c}x{h}x{h}, batch {args.batch_size}, {args.workers} workers)")


if __name__ == "__main__":
    main()
