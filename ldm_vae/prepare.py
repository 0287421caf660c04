"""The prepare stage's work: raw images -> square RGB crops in train/val webdataset shards.

The split is decided per *source image* by a hash of its key, so every crop of a photograph lands
in the same split (validation never sees a training photograph), and adding images to a
collection never moves an existing image from one split to the other.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from tqdm import tqdm

from .config import DataConfig
from .download import read_manifest
from .images import crop_resize, encode_image, load_rgb, square_crops
from .shards import ShardWriter

SHUFFLE_BUFFER = 4096  # samples held before writing, so crops of one photograph spread over shards


def key_fraction(key: str, seed: int) -> float:
    """A stable number in [0, 1) for a key: the split lottery, the same on every machine."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_keys(keys: list[str], val_fraction: float, seed: int) -> dict[str, str]:
    """key -> 'train' | 'val'. With two or more keys, each split gets at least one."""
    frac = {k: key_fraction(k, seed) for k in keys}
    split = {k: ("val" if f < val_fraction else "train") for k, f in frac.items()}
    if len(keys) >= 2:
        # A tiny collection may draw no validation (or no training) image: move the key closest
        # to the threshold, which is still a deterministic function of the keys.
        if "val" not in split.values():
            split[min(keys, key=frac.get)] = "val"
        if "train" not in split.values():
            split[max(keys, key=frac.get)] = "train"
    return split


def run_prepare(cfg: DataConfig, raw: Path, out: Path) -> dict:
    rows = read_manifest(raw)
    if not rows:
        raise RuntimeError(f"{raw}/manifest.jsonl lists no images: nothing to prepare")
    split = split_keys([r["key"] for r in rows], cfg.val_fraction, cfg.seed)
    order = random.Random(cfg.seed).sample(rows, len(rows))
    counts = {}
    for name in ("train", "val"):
        per_image = cfg.crops_per_image if name == "train" else cfg.val_crops_per_image
        chosen = [r for r in order if split[r["key"]] == name]
        rng = random.Random(f"{cfg.seed}:{name}:shuffle")
        buffer: list[dict] = []
        with ShardWriter(out / name, name, cfg.samples_per_shard) as writer:
            for row in tqdm(chosen, desc=f"prepare {name}", unit="img", dynamic_ncols=True):
                buffer.extend(_samples(cfg, raw, row, per_image))
                while len(buffer) > SHUFFLE_BUFFER:
                    writer.write(buffer.pop(rng.randrange(len(buffer))))
            rng.shuffle(buffer)
            for sample in buffer:
                writer.write(sample)
        counts[name] = {"images": len(chosen), "samples": writer.total, "shards": len(writer.written)}
    return counts


def _samples(cfg: DataConfig, raw: Path, row: dict, n: int) -> list[dict]:
    # Raw files passed download's checks, but they are re-decoded through the same guarded path.
    img = load_rgb((raw / row["file"]).read_bytes(), cfg.max_pixels)
    rng = random.Random(f"{cfg.seed}:{row['key']}:crops")
    samples = []
    width = max(2, len(str(n - 1)))
    for i, box in enumerate(square_crops(img.size, n, cfg.min_crop_scale, rng)):
        key = row["key"] if n == 1 else f"{row['key']}-c{i:0{width}d}"
        meta = {
            "key": key,
            "raw_key": row["key"],
            "source": row["source"],
            "width": img.width,
            "height": img.height,
            "crop_box": list(box),
            "resolution": cfg.resolution,
        }
        sample = {"__key__": key, cfg.image_format: encode_image(crop_resize(img, box, cfg.resolution), cfg.image_format)}
        if "caption" in row:
            meta["caption"] = sample["txt"] = row["caption"]
        if "label" in row:
            meta["label"] = row["label"]
            sample["cls"] = str(row["label"]).encode()
        sample["json"] = meta
        samples.append(sample)
    return samples
