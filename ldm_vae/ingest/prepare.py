"""The prepare stage's work: raw shards -> RGB crops in train/val webdataset shards: squares, or
with ``data.crop: bucket`` one crop per image at its aspect-ratio bucket (:mod:`ldm_vae.buckets`).

The split is decided per *source image* by a hash of its key, so every crop of a photograph lands
in the same split (validation never sees a training photograph), and adding images to a
collection never moves an existing image from one split to the other.

One unit per raw shard (:mod:`ldm_vae.runner`): a worker reads the shard's block of manifest rows
and the shard, crops every image and writes ``<split>/<split>-<unit>-<n>.tar``, its crops shuffled
in a bounded buffer seeded by the unit. Buckets go to shards of their own,
``<split>-<unit>-<W>x<H>-<n>.tar``: every shard then holds one image shape, so encode's batches
and the loader's epoch plan work per shard without looking inside. Everything a unit writes is a
function of its own inputs,
so the prepared samples are the same, byte for byte, whatever the number of processes or machines.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..buckets import bucket_crop, bucket_name, bucket_set, square_sizes
from ..config import DataConfig
from ..files import atomic_write
from ..images import adm_center_crop, crop_resize, encode_image, load_rgb, random_squares, square_crops
from ..runner import Placement, StageWork, Unit, code_hash, iter_records, resolve_workers, run_units, stage_code, tick
from ..samples import PREPARED, read_classes, write_classes
from ..shards import ShardWriter, tar_members

SPLITS = ("train", "val")
SHUFFLE_BUFFER = 4096  # samples held before writing, so crops of one photograph spread over shards
PARAMS = ("max_pixels", "resolution", "val_fraction", "crops_per_image", "val_crops_per_image", "min_crop_scale",
          "crop", "bucket_step", "bucket_max_ratio", "bucket_min_side", "buckets", "bucket_crop", "bucket_upscale",
          "image_format", "samples_per_shard", "seed")


def key_fraction(key: str, seed: int) -> float:
    """A stable number in [0, 1) for a key: the split lottery, the same on every machine."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_keys(keys: list[str], val_fraction: float, seed: int) -> dict[str, str]:
    """key -> 'train' | 'val'. With two or more keys, each split gets at least one."""
    lottery = _Lottery(val_fraction)
    for k in keys:
        lottery.add(k, key_fraction(k, seed))
    forced = lottery.forced()
    return {k: forced.get(k) or ("val" if key_fraction(k, seed) < val_fraction else "train") for k in keys}


class _Lottery:
    """A tiny collection may draw no validation (or no training) image: then the key closest to
    the threshold moves, still a deterministic function of the keys. Kept in one pass: the keys
    are never all held."""

    def __init__(self, val_fraction: float):
        self.val_fraction = val_fraction
        self.n = 0
        self.has: set[str] = set()
        self.lo, self.hi = (2.0, ""), (-1.0, "")

    def add(self, key: str, f: float) -> None:
        self.n += 1
        self.has.add("val" if f < self.val_fraction else "train")
        self.lo = min(self.lo, (f, key))
        self.hi = max(self.hi, (f, key))

    def forced(self) -> dict[str, str]:
        if self.n < 2:
            return {}
        if "val" not in self.has:
            return {self.lo[1]: "val"}
        if "train" not in self.has:
            return {self.hi[1]: "train"}
        return {}


def run_prepare(cfg: DataConfig, raw: Path, out: Path, engine=None) -> dict | None:
    """Crop every manifest image into ``out``; return the counts. ``engine``: where the units run
    (an :class:`~ldm_vae.config.EngineConfig`; None: this machine)."""
    raw, out = Path(raw), Path(out)
    settings = {"params": {k: getattr(cfg, k) for k in PARAMS}, "code": code_hash(*stage_code("ingest/prepare"))}

    def plan() -> list[Unit]:
        return plan_units(cfg, raw, settings)

    stage = StageWork("prepare", out, plan, _Work(cfg, raw, out), clean=list(SPLITS))
    units = run_units(stage, Placement(engine, resolve_workers(cfg.num_workers), [raw]))
    if units is None:
        return None
    counts = {s: {"images": 0, "samples": 0, "shards": 0} for s in SPLITS}
    for record in iter_records(out, units):
        for split in SPLITS:
            c = record["counts"][split]
            for name in ("images", "samples", "shards"):
                counts[split][name] += c[name]
            if cfg.crop == "bucket":  # samples per bucket, "WxH"
                per = counts[split].setdefault("buckets", {})
                for b, n in c.get("buckets", {}).items():
                    per[b] = per.get(b, 0) + n
    for split in SPLITS:
        if "buckets" in counts[split]:
            counts[split]["buckets"] = dict(sorted(counts[split]["buckets"].items()))
    atomic_write(out / "counts.json", json.dumps(counts, indent=2) + "\n")
    write_classes(out, read_classes(raw))  # the labels' names travel with the shards
    return counts


def plan_units(cfg: DataConfig, raw: Path, settings: dict) -> list[Unit]:
    """One unit per raw shard: the byte range of its block of manifest lines (the manifest lists
    each shard's images together), read in one streaming pass."""
    manifest = raw / "manifest.jsonl"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} does not exist: run the download stage first")
    blocks: list[dict] = []
    shards: set[str] = set()
    lottery = _Lottery(cfg.val_fraction)
    offset = 0
    with open(manifest, "rb") as f:
        for line in f:
            row = json.loads(line)
            if not blocks or blocks[-1]["shard"] != row["shard"]:
                if row["shard"] in shards:
                    raise ValueError(f"{manifest}: the rows of {row['shard']} are not together (byte {offset})")
                shards.add(row["shard"])
                blocks.append({"shard": row["shard"], "offset": offset, "nbytes": 0, "count": 0,
                               "hash": hashlib.sha256()})
            b = blocks[-1]
            b["nbytes"] += len(line)
            b["count"] += 1
            b["hash"].update(line)
            lottery.add(row["key"], key_fraction(row["key"], cfg.seed))
            offset += len(line)
    if not blocks:
        raise RuntimeError(f"{manifest} lists no images: nothing to prepare")
    forced = lottery.forced()
    units = []
    for n, b in enumerate(blocks):
        st = (raw / b["shard"]).stat()
        ident = {"shard": b["shard"], "shard_id": [st.st_size, st.st_mtime_ns], "rows": b["hash"].hexdigest()[:16],
                 "forced": forced, **settings}
        units.append(Unit(f"u{n:05d}", ident, RawBlock(b["shard"], b["offset"], b["nbytes"], forced), b["count"],
                          b["shard"]))
    return units


@dataclass(frozen=True)
class RawBlock:
    """A prepare unit: one raw shard and its block of manifest lines (a byte range), with the keys
    the split lottery forced to a side (tiny collections)."""
    shard: str
    offset: int
    nbytes: int
    forced: dict


class _Work:
    """One raw shard -> crops in train and val shards (picklable for the pool)."""

    def __init__(self, cfg: DataConfig, raw: Path, out: Path):
        self.cfg, self.raw, self.out = cfg, raw, out

    def __call__(self, unit: Unit) -> dict:
        cfg = self.cfg
        block: RawBlock = unit.task
        shard, offset, nbytes, forced = block.shard, block.offset, block.nbytes, block.forced
        with open(self.raw / "manifest.jsonl", "rb") as f:
            f.seek(offset)
            rows = {r["member"]: r for r in map(json.loads, f.read(nbytes).splitlines())}
        writers = _Writers(self.out, unit.name, cfg.samples_per_shard)
        buffers: dict[str, list] = {s: [] for s in SPLITS}
        rngs = {s: random.Random(f"{cfg.seed}:{s}:{unit.name}:shuffle") for s in SPLITS}
        images = {s: 0 for s in SPLITS}
        try:
            with open(self.raw / shard, "rb") as f:
                for name, data in tar_members(f):
                    row = rows.pop(name, None)
                    if row is None:
                        continue  # a duplicate of an earlier unit's image: the manifest rejected it
                    split = forced.get(row["key"]) or (
                        "val" if key_fraction(row["key"], cfg.seed) < cfg.val_fraction else "train")
                    images[split] += 1
                    per_image = cfg.crops_per_image if split == "train" else cfg.val_crops_per_image
                    buffers[split].extend(crop_samples(cfg, row, data, per_image))
                    while len(buffers[split]) > SHUFFLE_BUFFER:
                        writers.write(split, *buffers[split].pop(rngs[split].randrange(len(buffers[split]))))
                    tick()
            if rows:
                raise ValueError(f"{len(rows)} manifest images are missing from {shard}, e.g. {next(iter(rows))}")
            for s in SPLITS:
                rngs[s].shuffle(buffers[s])
                for sample, bucket in buffers[s]:
                    writers.write(s, sample, bucket)
            writers.close()
        except BaseException:
            writers.abort()
            raise
        return {"outputs": writers.outputs(), "counts": {s: {"images": images[s], **writers.counts(s)} for s in SPLITS}}


class _Writers:
    """A unit's shard writers: one per split, or with buckets one per (split, bucket), made when
    its first sample comes (a unit sees only some buckets)."""

    def __init__(self, out: Path, unit: str, per_shard: int):
        self.out, self.unit, self.per_shard = out, unit, per_shard
        self.open: dict[tuple[str, str | None], ShardWriter] = {}
        for split in SPLITS:
            (out / split).mkdir(parents=True, exist_ok=True)

    def write(self, split: str, sample: dict, bucket: str | None) -> None:
        w = self.open.get((split, bucket))
        if w is None:
            prefix = f"{split}-{self.unit}" + (f"-{bucket}" if bucket else "")
            w = self.open[(split, bucket)] = ShardWriter(self.out / split, prefix, self.per_shard)
        w.write(sample)

    def close(self) -> None:
        for w in self.open.values():
            w.close()

    def abort(self) -> None:
        for w in self.open.values():
            w.__exit__(RuntimeError, None, None)  # drop the partial shard

    def outputs(self) -> list[str]:
        return [f"{s}/{n}" for (s, _), w in sorted(self.open.items(), key=str) for n in w.written]

    def counts(self, split: str) -> dict:
        mine = {b: w for (s, b), w in self.open.items() if s == split}
        c = {"samples": sum(w.total for w in mine.values()), "shards": sum(len(w.written) for w in mine.values())}
        if any(b is not None for b in mine):
            c["buckets"] = {b: w.total for b, w in sorted(mine.items())}
        return c


def crop_samples(cfg: DataConfig, row: dict, data: bytes, n: int) -> list[tuple[dict, str | None]]:
    """The prepared samples of one raw image: ``n`` crops by ``cfg.crop``, each with its metadata,
    and its bucket's name (None for squares)."""
    # Raw bytes passed download's checks, but they are re-decoded through the same guarded path.
    img = load_rgb(data, cfg.max_pixels)
    rng = random.Random(f"{cfg.seed}:{row['key']}:crops")
    if cfg.crop == "bucket":
        crop, box, sizes = bucket_crop(img, cfg, bucket_set(cfg), rng)
        crops = [(crop, box, sizes)]
    elif cfg.crop == "adm":
        crop, box = adm_center_crop(img, cfg.resolution)
        crops = [(crop, box, square_sizes(img.width, img.height, box, cfg.resolution))]
    else:
        boxes = (square_crops(img.size, n, cfg.min_crop_scale, rng) if cfg.crop == "multiscale"
                 else random_squares(img.size, n, rng))
        crops = [(crop_resize(img, box, cfg.resolution), box, square_sizes(img.width, img.height, box, cfg.resolution))
                 for box in boxes]
    samples = []
    width = max(2, len(str(n - 1)))
    for i, (crop, box, sizes) in enumerate(crops):
        key = row["key"] if n == 1 else f"{row['key']}-c{i:0{width}d}"
        meta = {"key": key, "raw_key": row["key"], "source": row["source"], "width": img.width,
                "height": img.height, "crop_box": list(box), "resolution": cfg.resolution, **sizes}
        for name in ("caption", "label"):
            if name in row:
                meta[name] = row[name]
        sample = PREPARED.build(key, fmt=cfg.image_format, image=encode_image(crop, cfg.image_format),
                                meta=meta, caption=row.get("caption"), label=row.get("label"))
        samples.append((sample, bucket_name(crop.size) if cfg.crop == "bucket" else None))
    return samples
