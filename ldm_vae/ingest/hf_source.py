"""The ``hf:<name or path>`` source, through the Hugging Face ``datasets`` library.

What the target may be:
  - a hub dataset name (``user/name``; needs the network): streamed;
  - a folder written by ``Dataset.save_to_disk``: memory-mapped from its arrow files;
  - a data file (``.parquet``, ``.arrow``, ``.csv``, ``.json``, ``.jsonl``) or a folder of them, or
    an ``imagefolder`` (images in class sub-folders): streamed.

Streaming means rows are read as they are needed: the whole set is never held in memory and
never copied into the datasets cache (the only copy made is the image file download keeps).
Work is split by the dataset's own layout: row ranges of a memory-mapped set, the data files
(shards) of a streamed one, so several processes and machines read disjoint parts without ever
listing all rows. The image column is read undecoded (``Image(decode=False)``), so the bytes kept are exactly the
source's and decoding goes through the project's guarded :func:`ldm_vae.images.load_rgb`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .. import s3 as store
from ..runner import Unit
from .items import SourceItem, fingerprint, safe_key, unit_size

DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}


def plan_hf(cfg) -> list[Unit]:
    """Units of one split: a memory-mapped dataset in row ranges of ``data.unit_images`` (keys
    ``<split>-<row>``); a streamed one by its own shards (data files), one unit each (keys
    ``<split>-<row>`` with one shard, ``<split>-<shard>-<row in shard>`` with several). With
    ``data.max_images``, a streamed set takes an equal share of rows from each of its shards."""
    import datasets

    target = cfg.source_target
    ds = open_dataset(target, cfg.split, cfg.s3_endpoint)
    _check_columns(cfg, ds)
    about = f"hf:{target} split {cfg.split}"
    base = {"kind": "hf", "target": target, "split": cfg.split,
            "columns": [cfg.image_column, cfg.caption_column, cfg.label_column],
            "files": _files_id(target, cfg.s3_endpoint)}
    if isinstance(ds, datasets.Dataset):
        rows = min(len(ds), cfg.max_images) if cfg.max_images else len(ds)
        base["fingerprint"] = getattr(ds, "_fingerprint", "")
        size = unit_size(cfg.unit_images, rows)
        return [Unit(f"u{n:05d}", {**base, "rows": [lo, min(lo + size, rows)]},
                     HfRows(lo, min(lo + size, rows)), min(size, rows - lo),
                     f"{about} rows {lo}-{min(lo + size, rows) - 1}")
                for n, lo in enumerate(range(0, rows, size))]
    shards = max(1, ds.n_shards)
    units = []
    for i in range(shards):
        quota = cfg.max_images // shards + (i < cfg.max_images % shards) if cfg.max_images else 0
        if cfg.max_images and not quota:
            continue
        units.append(Unit(f"u{i:05d}", {**base, "shard": [i, shards], "quota": quota},
                          HfShard(i, shards, quota), quota, f"{about} shard {i} of {shards}"))
    return units


@dataclass(frozen=True)
class HfRows:
    """A memory-mapped dataset's unit: rows lo..hi-1."""
    lo: int
    hi: int

    def items(self, cfg, skip: set[str] = frozenset()) -> Iterator[SourceItem]:
        return iter_hf_unit(cfg, self)


@dataclass(frozen=True)
class HfShard:
    """A streamed dataset's unit: its shard ``shard`` of ``shards`` (at most ``quota`` rows; 0: all)."""
    shard: int
    shards: int
    quota: int

    def items(self, cfg, skip: set[str] = frozenset()) -> Iterator[SourceItem]:
        return iter_hf_unit(cfg, self)


def iter_hf_unit(cfg, task: HfRows | HfShard) -> Iterator[SourceItem]:
    """The SourceItems of one planned unit, in dataset order."""
    import datasets

    ds = open_dataset(cfg.source_target, cfg.split, cfg.s3_endpoint)
    features = ds.features or {}
    if isinstance(features.get(cfg.image_column), datasets.Image):
        ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
    label_names = None
    if cfg.label_column and isinstance(features.get(cfg.label_column), datasets.ClassLabel):
        label_names = features[cfg.label_column].names
    local = not store.is_s3(cfg.source_target) and Path(cfg.source_target).exists()
    root = Path(cfg.source_target) if local else None
    if isinstance(task, HfRows):
        lo, hi = task.lo, task.hi
        rows = ds.select(range(lo, hi))
        keyed = ((f"{safe_key(cfg.split)}-{lo + j:08d}", lo + j, row) for j, row in enumerate(rows))
    else:
        shard, shards, quota = task.shard, task.shards, task.quota
        part = ds.shard(num_shards=shards, index=shard) if shards > 1 else ds
        # 'train[:10%]' is a valid split; keys take its safe form ('train_10')
        prefix = f"{safe_key(cfg.split)}-{shard:05d}-" if shards > 1 else f"{safe_key(cfg.split)}-"
        keyed = ((f"{prefix}{j:08d}", f"{shard}:{j}" if shards > 1 else j, row) for j, row in enumerate(part))
        if quota:
            keyed = itertools.islice(keyed, quota)
    for key, where, row in keyed:
        yield _item(cfg, key, where, row, label_names, root)


def _item(cfg, key: str, where, row: dict, label_names, root: Path | None) -> SourceItem:
    item = SourceItem(key, f"hf:{cfg.source_target}/{cfg.split}[{where}]")
    if cfg.caption_column and row.get(cfg.caption_column) is not None:
        item.caption = str(row[cfg.caption_column])
    if cfg.label_column and row.get(cfg.label_column) is not None:
        label = row[cfg.label_column]
        # ClassLabel ints stay ints (the webdataset `cls` convention); other labels as given.
        item.label = int(label) if label_names is not None or isinstance(label, int) else str(label)
    try:
        item.data = _image_bytes(row.get(cfg.image_column), root)
    except ValueError as e:
        item.error = str(e)
    return item


def _check_columns(cfg, ds) -> None:
    columns = list(ds.features) if ds.features else None
    for key in ("image_column", "caption_column", "label_column"):
        col = getattr(cfg, key)
        if col and columns is not None and col not in columns:
            raise ValueError(f"data.{key}: {col!r}: no such column in {cfg.source_target!r}; "
                             f"columns: {', '.join(columns)}")


def _files_id(target: str, endpoint: str = "") -> str:
    """Sizes and mtimes of a local dataset's files, or ETags and sizes of its data files on S3:
    edited files redo the download's units."""
    if store.is_s3(target):
        s3 = store.process_client(endpoint)
        heads = [(url, s3.head_object(**dict(zip(("Bucket", "Key"), store.split_url(url)))))
                 for url in store.glob(target, endpoint)]
        return fingerprint([(url, head.get("ETag", ""), head.get("ContentLength", -1)) for url, head in heads])
    path = Path(target)
    if not path.exists():
        return ""  # a hub dataset: its name (and revision) is its identity
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return fingerprint([(p.as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def open_dataset(target: str, split: str, endpoint: str = ""):
    """A ``datasets`` Dataset (memory-mapped) or IterableDataset (streamed) for one split."""
    import datasets

    if store.is_s3(target):
        return _open_s3(target, split, endpoint)
    path = Path(target)
    try:
        if path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"data.split: {split!r}: not in {target!r}; splits: {', '.join(ds)}")
                ds = ds[split]
            return ds
        if path.is_file():
            builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise ValueError(f"data.source: {target!r}: cannot read {path.suffix} files; "
                                 f"use one of {', '.join(DATA_FILE_BUILDERS)} or a dataset folder")
            return datasets.load_dataset(builder, data_files={split: str(path)}, split=split, streaming=True)
        return datasets.load_dataset(str(path) if path.is_dir() else target, split=split, streaming=True)
    except ValueError:
        raise
    except FileNotFoundError as e:
        raise FileNotFoundError(f"data.source: hf:{target}: not a local dataset and not found on the hub ({e})") from e
    except Exception as e:  # datasets raises many types (hub offline, bad split, bad files)
        raise ValueError(f"data.source: hf:{target} (split {split!r}): {type(e).__name__}: {e}") from e


def _open_s3(target: str, split: str, endpoint: str):
    """Data files on S3 (one URL or a glob: ``s3://bucket/laion/*.parquet``), streamed through
    datasets with ``storage_options`` (endpoint and credentials as :mod:`ldm_vae.s3` says)."""
    import datasets

    builder = DATA_FILE_BUILDERS.get(Path(target.split("?")[0]).suffix.lower())
    if builder is None:
        raise ValueError(f"data.source: hf:{target}: data files on S3 must be one of {', '.join(DATA_FILE_BUILDERS)} "
                         "(a URL or a glob of them)")
    if not store.glob(target, endpoint):  # a refusal names the URL; nothing found is no dataset
        raise store.StoreError(f"{target}: no data files match")
    try:
        return datasets.load_dataset(builder, data_files={split: target}, split=split, streaming=True,
                                     storage_options=store.storage_options(endpoint))
    except Exception as e:
        raise ValueError(f"data.source: hf:{target} (split {split!r}): {type(e).__name__}: {e}") from e


def _image_bytes(value, root: Path | None) -> bytes:
    """The encoded image of one row: an undecoded Image cell, raw bytes, or a path in the dataset."""
    if value is None:
        raise ValueError("missing_image: the image cell is empty")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
        if not value:
            raise ValueError("missing_image: the image cell has neither bytes nor a path")
    if isinstance(value, str):
        return _read_inside(value, root)
    raise ValueError(f"not_an_image: image column holds {type(value).__name__}, not image bytes or a path")


def _read_inside(rel: str, root: Path | None) -> bytes:
    # A path cell is data too: only a file inside the local dataset's folder is read.
    if root is None:
        raise ValueError(f"missing_image: path {rel[:200]!r} without bytes in a hub dataset")
    base = (root if root.is_dir() else root.parent).resolve()
    path = (base / rel).resolve()
    if not path.is_relative_to(base):
        raise ValueError(f"link_outside_folder: image path {rel[:200]!r} leaves {str(base)!r}")
    try:
        return path.read_bytes()
    except OSError as e:
        raise ValueError(f"unreadable: {e.strerror or e}") from e
