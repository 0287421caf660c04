"""The ``hf:<name or path>`` source, through the Hugging Face ``datasets`` library.

What the target may be:
  - a hub dataset name (``user/name``; needs the network): streamed;
  - a folder written by ``Dataset.save_to_disk``: memory-mapped from its arrow files;
  - a data file (``.parquet``, ``.arrow``, ``.csv``, ``.json``, ``.jsonl``) or a folder of them, or
    an ``imagefolder`` (images in class sub-folders): streamed.

Streaming means rows are read as they are needed: the whole set is never held in memory and
never copied into the datasets cache (the only copy made is the image file download keeps).
The image column is read undecoded (``Image(decode=False)``), so the bytes kept are exactly the
source's and decoding goes through the project's guarded :func:`ldm_vae.images.load_rgb`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from .sources import SourceItem

DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}


def iter_hf(cfg) -> Iterator[SourceItem]:
    """One SourceItem per row of ``cfg.split`` (keys ``<split>-<row index>``), in dataset order."""
    import datasets

    target = cfg.source_target
    ds = open_dataset(target, cfg.split)
    features = ds.features or {}
    columns = list(features) if features else None
    for key in ("image_column", "caption_column", "label_column"):
        col = getattr(cfg, key)
        if col and columns is not None and col not in columns:
            raise ValueError(f"data.{key}: {col!r}: no such column in {target!r}; columns: {', '.join(columns)}")
    if isinstance(features.get(cfg.image_column), datasets.Image):
        ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
    label_names = None
    if cfg.label_column and isinstance(features.get(cfg.label_column), datasets.ClassLabel):
        label_names = features[cfg.label_column].names
    root = Path(target) if Path(target).exists() else None
    for i, row in enumerate(ds):
        if cfg.max_images and i >= cfg.max_images:
            break
        key = f"{cfg.split}-{i:08d}"
        item = SourceItem(key, f"hf:{target}/{cfg.split}[{i}]")
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
        yield item


def open_dataset(target: str, split: str):
    """A ``datasets`` Dataset (memory-mapped) or IterableDataset (streamed) for one split."""
    import datasets

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
