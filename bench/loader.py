"""Latent loader throughput: latents/s for 16x32x32 latents with 2 dataloader workers.

    python bench/loader.py [--samples 20000] [--workers 2] [--batch-size 256] [--buckets]

Writes synthetic float16 mean/std shards in the latent-shard format (the content does not
change the cost), then times full epochs of ``latent_loader`` with posterior sampling, random
flip choice and per-channel normalisation on, as a diffusion trainer would use it.

``--buckets`` also writes the same number of latents in three aspect-ratio buckets (16x32x32,
16x24x40, 16x40x24: about the same pixels each, one shape a shard, as encode writes them) and
alternates epochs of the two sets in one run, so the ratio is not the VM's drift.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm_vae.loader import latent_loader  # noqa: E402
from ldm_vae.samples import npy_bytes  # noqa: E402
from ldm_vae.shards import ShardWriter  # noqa: E402

C = 16
SQUARE = [(C, 32, 32)]
BUCKETS = [(C, 32, 32), (C, 24, 40), (C, 40, 24)]


def write_set(folder: Path, shapes: list[tuple], samples: int, rng) -> None:
    """``samples`` latents split evenly over ``shapes``, 2,500 a shard, one shape a shard."""
    for b, shape in enumerate(shapes):
        n = samples // len(shapes) + (b < samples % len(shapes))
        with ShardWriter(folder, f"train-b{b}", 2500) as w:
            for i in range(n):
                m = rng.standard_normal(shape, dtype=np.float32).astype(np.float16)
                s = np.full(shape, 0.1, dtype=np.float16)
                _, h, wd = shape
                meta = {"key": f"b{b}-{i:07d}", "original_size": [8 * h, 8 * wd], "crop_top_left": [0, 0],
                        "target_size": [8 * h, 8 * wd]}
                w.write({"__key__": f"b{b}-{i:07d}", "mean.npy": npy_bytes(m), "std.npy": npy_bytes(s),
                         "json": json.dumps(meta).encode(), "txt": b"a caption"})


def epoch_rate(loader, expected: int) -> float:
    t, n = time.perf_counter(), 0
    for batch in loader:
        n += batch["latent"].shape[0]
    assert n == expected, (n, expected)
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--buckets", action="store_true", help="also the bucketed set, epochs alternated")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    sides = {"square": SQUARE, **({"buckets": BUCKETS} if args.buckets else {})}
    with tempfile.TemporaryDirectory() as tmp:
        loaders = {}
        for name, shapes in sides.items():
            write_set(Path(tmp) / name, shapes, args.samples, rng)
            stats = {"channel_mean": [0.0] * C, "channel_std": [1.0] * C}
            loaders[name] = latent_loader(str(Path(tmp) / name / "*.tar"), batch_size=args.batch_size,
                                          num_workers=args.workers, stats=stats, shuffle=1000)
        rates: dict[str, list[float]] = {name: [] for name in sides}
        for epoch in range(args.epochs):
            for name, loader in loaders.items():  # the two sides alternate, epoch by epoch
                loader.set_epoch(epoch)
                rates[name].append(epoch_rate(loader, args.samples))
                print(f"epoch {epoch} {name}: {rates[name][-1]:.0f} latents/s", flush=True)
    for name, r in rates.items():
        print(f"{name}: best {max(r):.0f}, median {statistics.median(r):.0f} latents/s "
              f"({len(sides[name])} shapes, batch {args.batch_size}, {args.workers} workers)")
    if args.buckets:
        pairs = [b / s for b, s in zip(rates["buckets"], rates["square"])]
        print(
            f"buckets / square: median {statistics.median(pairs):.3f} (epochs: {', '.join(f'{p:.3f}' for p in pairs)})"
        )


if __name__ == "__main__":
    main()
