"""Where images come from: each source yields ``SourceItem``s with a stable key and the raw bytes.

Sources never decode or judge images (that is :mod:`ldm_vae.images`), they only find them.
An item that cannot even be read (a broken symlink, a permission error) is yielded with ``error``
set so that download records it as a rejection instead of losing it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

# Photographs that ship inside installed packages: (package, path inside it, key). Synthetic
# test patterns, documents and the right half of the motorcycle stereo pair (near-identical to
# the left, which would leak between train and validation) are left out.
BUILTIN_PHOTOS = [
    ("skimage", "data/astronaut.png", "skimage-astronaut"),
    ("skimage", "data/chelsea.png", "skimage-chelsea"),
    ("skimage", "data/coffee.png", "skimage-coffee"),
    ("skimage", "data/hubble_deep_field.jpg", "skimage-hubble"),
    ("skimage", "data/ihc.png", "skimage-ihc"),
    ("skimage", "data/motorcycle_left.png", "skimage-motorcycle"),
    ("skimage", "data/retina.jpg", "skimage-retina"),
    ("skimage", "data/rocket.jpg", "skimage-rocket"),
    ("skimage", "data/camera.png", "skimage-camera"),
    ("skimage", "data/coins.png", "skimage-coins"),
    ("skimage", "data/moon.png", "skimage-moon"),
    ("skimage", "data/brick.png", "skimage-brick"),
    ("skimage", "data/grass.png", "skimage-grass"),
    ("skimage", "data/gravel.png", "skimage-gravel"),
    ("sklearn", "datasets/images/china.jpg", "sklearn-china"),
    ("sklearn", "datasets/images/flower.jpg", "sklearn-flower"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "matplotlib-grace_hopper"),
]


@dataclass
class SourceItem:
    key: str  # stable and unique within the source; [A-Za-z0-9_-] only (webdataset splits on dots)
    source: str  # where it came from, for the manifest
    data: bytes | None = None
    error: str | None = None  # set when the item was found but could not be read
    caption: str | None = None
    label: int | str | None = None
    kept_file: Path | None = None  # set when ``data`` was read back from download's own earlier output


def iter_source(cfg, done: Callable[[str], Path | None] = lambda key: None) -> Iterator[SourceItem]:
    """The items of ``cfg.source`` (a DataConfig). ``done(key)`` is the file an earlier run kept
    for ``key``, if any: sources that fetch over the network use it to skip finished work."""
    kind, target = cfg.source_kind, cfg.source_target
    if kind == "builtin":
        return iter_builtin()
    if kind == "folder":
        return iter_folder(Path(target))
    if kind == "hf":
        from .hf_source import iter_hf

        return iter_hf(cfg)
    if kind == "urls":
        from .urls import iter_urls

        return iter_urls(cfg, done)
    raise ValueError(f"data.source: {cfg.source!r}: no reader for source kind {kind!r}")


def iter_builtin() -> Iterator[SourceItem]:
    for package, rel, key in BUILTIN_PHOTOS:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            yield SourceItem(key, f"{package}/{rel}", error=f"package {package} is not installed")
            continue
        path = Path(list(spec.submodule_search_locations)[0]) / rel
        yield _read(key, path, f"{package}/{rel}")


def iter_folder(root: Path) -> Iterator[SourceItem]:
    """Every image file under ``root`` (recursive, sorted); never follows a link out of ``root``."""
    if not root.is_dir():
        raise FileNotFoundError(f"data.source: folder {str(root)!r} does not exist or is not a folder")
    root_real = root.resolve()
    seen: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            rel = path.relative_to(root).as_posix()
            key = _unique_key(folder_key(rel), rel, seen)
            real = path.resolve()
            if not real.is_relative_to(root_real):
                yield SourceItem(key, rel, error=f"link_outside_folder: {rel} -> {real}")
                continue
            yield _read(key, path, rel)


def folder_key(rel: str) -> str:
    """'cats/Tabby 01.jpg' -> 'cats_Tabby_01': readable, stable, safe in a tar member name."""
    stem = rel.rsplit(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "image"


def _unique_key(key: str, rel: str, seen: dict[str, str]) -> str:
    # 'a.jpg' and 'a.png' (or 'a b' and 'a_b') map to one key: suffix a hash of the full path.
    if key in seen and seen[key] != rel:
        key = f"{key}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}"
    seen[key] = rel
    return key


def _read(key: str, path: Path, source: str) -> SourceItem:
    try:
        return SourceItem(key, source, data=path.read_bytes())
    except OSError as e:
        return SourceItem(key, source, error=f"unreadable: {e.strerror or e}")
