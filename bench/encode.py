"""Encode throughput: the encode stage against a naive loop, in one run, on the same images.

    python bench/encode.py [--vae data/vae] [--prepared data/prepared] [--images 1000] [--repeats 3]
                           [--batch-size 16 32 64] [--params params.yaml] [--dtype fp32|bf16]

On a GPU, the SD preset's figure (no trained VAE or prepared data needed: a VAE of the preset's
architecture with fresh weights, which cost the same, and 256 px crops of the builtin photos):

    python bench/encode.py --params presets/sd-kl-f8-256-c4.yaml --vae none --prepared none

Naive loop (what a first script does): decode one image with PIL, ``vae.encode`` it alone,
``np.save`` its mean and std to two .npy files. The stage: batched decode of the prepared
shards, one ``vae.encode`` per batch under ``torch.inference_mode()``, float16 tar shards, done
records and the coverage check. Both read the same prepared images and use the same threads.
"""

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm_vae.config import EncodeConfig  # noqa: E402
from ldm_vae.encode.encoding import run_encode  # noqa: E402
from ldm_vae.export import load_vae  # noqa: E402
from ldm_vae.samples import image_bytes  # noqa: E402
from ldm_vae.shards import ShardWriter, iter_samples, shard_paths  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", type=Path, default=ROOT / "data/vae")
    ap.add_argument("--prepared", type=Path, default=ROOT / "data/prepared")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, nargs="+", default=None,
                    help="stage batch size(s), each run in turn (default: encode.batch_size of params.yaml)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml",
                    help="encode.batch_size / encode.dtype defaults; model and data for --vae/--prepared none")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: encode.dtype of --params")
    args = ap.parse_args()
    from ldm_vae.config import load_params

    params = load_params(args.params)
    batches = args.batch_size or [params.encode.batch_size]
    dtype = args.dtype or params.encode.dtype
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vae_dir, prepared = args.vae, args.prepared
        if not (vae_dir / "config.json").is_file():
            vae_dir = _fresh_vae(params, tmp / "vae")
        if not shard_paths(prepared / "train"):
            prepared = _builtin_prepared(params, args.images, tmp)
        naive_vae = load_vae(vae_dir, device)  # as loaded: the stage's copy is switched to channels_last
        vae = load_vae(vae_dir, device)
        samples = [s for _, s in zip(range(args.images), iter_samples(shard_paths(prepared / "train")))]
        n = len(samples)
        # The same images as a one-split prepared folder for the stage, and as PNG files for the loop.
        with ShardWriter(tmp / "prepared" / "train", "train", 1000) as w:
            for s in samples:
                w.write(s)
        (tmp / "prepared" / "val").mkdir()
        (tmp / "files").mkdir()
        for s in samples:
            (tmp / "files" / f"{s['__key__']}.png").write_bytes(image_bytes(s))

        # Alternated, so that this machine's minute-to-minute drift hits both sides alike.
        times = {"naive": 0.0, **{b: 0.0 for b in batches}}
        pngs = sorted((tmp / "files").iterdir())
        for r in range(args.repeats):
            out = tmp / f"npy{r}"
            out.mkdir()
            t = time.perf_counter()
            with torch.inference_mode():
                for path in pngs:
                    x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1
                    post = naive_vae.encode(x[None].to(device)).latent_dist
                    np.save(out / f"{path.stem}.mean.npy", post.mean[0].cpu().numpy())
                    np.save(out / f"{path.stem}.std.npy", post.std[0].cpu().numpy())
            naive = n / (time.perf_counter() - t)
            times["naive"] += time.perf_counter() - t

            line = f"run {r}: naive {naive:.1f} images/s"
            for b in batches:
                t = time.perf_counter()
                stats = run_encode(
                    vae, tmp / "prepared", tmp / f"latents{r}-{b}", EncodeConfig(batch_size=b, dtype=dtype)
                )
                stage = n / (time.perf_counter() - t)
                times[b] += time.perf_counter() - t
                assert stats["splits"]["train"]["count"] == n
                line += f", stage batch {b} {stage:.1f} images/s ({stage / naive:.2f}x)"
            print(line, flush=True)
        naive = n * args.repeats / times["naive"]
    shape = "x".join(map(str, samples and np.array(Image.open(io.BytesIO(image_bytes(samples[0])))).shape[:2]))
    print(f"{n} images {shape} px, VAE {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M params, {device}, "
          f"{torch.get_num_threads()} threads, stage dtype {dtype}, {args.repeats} alternated runs")
    print(f"naive loop          : {naive:8.1f} images/s")
    for b in batches:
        stage = n * args.repeats / times[b]
        print(f"encode stage, batch {b:<3}: {stage:8.1f} images/s  ({stage / naive:.2f}x)")


def _fresh_vae(params, folder: Path) -> Path:
    """params.model's architecture with fresh weights, saved like an export (throughput does not
    depend on the weights)."""
    from ldm_vae.model import build_vae

    build_vae(params.model, params.data.resolution).save_pretrained(folder)
    print(f"VAE: fresh weights, model section of the params file ({folder})")
    return folder


def _builtin_prepared(params, images: int, tmp: Path) -> Path:
    """At least ``images`` prepared crops of the builtin photos at params.data.resolution."""
    from dataclasses import replace

    from ldm_vae.ingest.download import read_manifest, run_download
    from ldm_vae.ingest.prepare import run_prepare

    data = replace(params.data, source="builtin", max_images=0, val_fraction=0.15, crop="multiscale")
    run_download(data, tmp / "raw")
    photos = len(read_manifest(tmp / "raw"))
    data = replace(data, crops_per_image=max(1, -(-images // max(1, int(photos * 0.7)))))
    run_prepare(data, tmp / "raw", tmp / "prepared-builtin")
    return tmp / "prepared-builtin"


if __name__ == "__main__":
    main()
