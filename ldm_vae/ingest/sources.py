"""Where images come from: each source yields ``SourceItem``s with a stable key and the raw bytes.

Sources never decode or judge images (that is :mod:`ldm_vae.images`), they only find them. A
source is planned into units (slices of its items, in source order) that download's workers read
independently, so keys and order never depend on how many processes read them.
An item that cannot even be read (a broken symlink, a permission error) is yielded with ``error``
set so that download records it as a rejection instead of losing it.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from ..runner import Unit
from .items import (
    IMAGE_EXTENSIONS,
    FileRef,
    SourceItem,
    SourceSlice,
    chunks,
    fingerprint,
    folder_key,
    unique_key,
    unit_size,
)
from .labels import ClassList, LabelRule, extend_classes

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


def plan_source(cfg, labels: Labels | None = None) -> list[Unit]:
    """The source's items cut into units of ``data.unit_images`` (:func:`unit_size`; an hf streaming set: its own
    shards), in source order. Only rank 0 plans; workers read a unit with :func:`iter_unit`.
    ``labels`` (``data.labels`` folder or file): the class of each item, and ``labels.classes``
    the list they index, once planned.

    A unit's ident fingerprints what it would read (paths with sizes and mtimes, their labels, URL
    rows, the dataset's rows), so a re-run redoes a unit whose items changed and keeps every other one."""
    kind, target = cfg.source_kind, cfg.source_target
    if kind == "hf":
        from .hf_source import plan_hf

        return plan_hf(cfg)
    if kind == "urls":
        from .urls import plan_urls

        return plan_urls(cfg)
    if kind == "s3":
        from .s3_source import plan_s3

        return plan_s3(cfg, labels)
    files = builtin_files() if kind == "builtin" else folder_files(Path(target))
    if cfg.max_images:
        files = files[: cfg.max_images]
    if labels is not None:
        files = labels.label_files(files)
    root = str(Path(target).resolve()) if kind == "folder" else None
    units = []
    for n, chunk in enumerate(chunks(files, unit_size(cfg.unit_images, len(files)))):
        ident = {"kind": kind, "files": fingerprint([f.ident(_stat(f.path)) for f in chunk])}
        about = f"{kind} items {chunk[0].key} ..."
        units.append(Unit(f"u{n:05d}", ident, FileSlice(root, tuple(chunk)), len(chunk), about))
    return units


@dataclass(frozen=True)
class FileSlice:
    """A builtin or folder: unit: its files, read from ``root`` (a folder: links may not leave it)."""
    root: str | None
    files: tuple[FileRef, ...]

    def items(self, cfg, skip: set[str] = frozenset()) -> Iterator[SourceItem]:
        return (_read_file(f, self.root) for f in self.files)


class Labels:
    """``data.labels`` applied while planning: each path's class name by the rule, then the class
    list (:func:`~ldm_vae.ingest.labels.extend_classes` of the last run's) and each item's index."""

    def __init__(self, rule: LabelRule, previous: list[str]):
        self.rule, self.previous = rule, previous
        self.classes: ClassList | None = None

    def label_files(self, files: list[FileRef]) -> list[FileRef]:
        named = [(f, *self.rule.class_name(f.source)) for f in files]
        index = self.finish(name for _, name, _ in named if name is not None)
        return [f if f.error else replace(f, error=error) if error else replace(f, label=index[name])
                for f, name, error in named]

    def finish(self, found) -> dict[str, int]:
        """The class list from the names found; name -> index."""
        self.classes = extend_classes(self.previous, found)
        return self.classes.index()


def iter_unit(cfg, task: SourceSlice, skip: set[str] = frozenset()) -> Iterator[SourceItem]:
    """The items of one planned unit, in order. URL rows whose key is in ``skip`` are not
    fetched: they come without data (the caller has their bytes)."""
    return task.items(cfg, skip)


def builtin_files() -> list[FileRef]:
    """Every builtin photograph (an error where its package is not installed)."""
    files = []
    for package, rel, key in BUILTIN_PHOTOS:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            files.append(FileRef(key, None, f"{package}/{rel}", f"package {package} is not installed"))
        else:
            files.append(FileRef(key, str(Path(list(spec.submodule_search_locations)[0]) / rel), f"{package}/{rel}"))
    return files


def iter_builtin() -> Iterator[SourceItem]:
    return (_read_file(f, None) for f in builtin_files())


def folder_files(root: Path) -> list[FileRef]:
    """Every image file under ``root`` (recursive, sorted), ``source`` its path relative to the root.

    Plain string operations, not pathlib: this runs once per file before any work starts, and
    pathlib's parsing made it 36 us a file (45 s for ImageNet's 1.28 M)."""
    if not root.is_dir():
        raise FileNotFoundError(f"data.source: folder {str(root)!r} does not exist or is not a folder")
    top = os.fspath(root)
    seen: dict[str, str] = {}
    files = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, top)
        prefix = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        for name in sorted(filenames):
            if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            rel = prefix + name
            files.append(FileRef(unique_key(folder_key(rel), rel, seen), os.path.join(dirpath, name), rel))
    return files


def _stat(path: str | None) -> tuple:
    try:
        st = os.stat(path)
        return (st.st_size, st.st_mtime_ns)
    except (OSError, TypeError):
        return (-1, -1)


def _read_file(f: FileRef, root: str | None) -> SourceItem:
    if f.error:
        return SourceItem(f.key, f.source, error=f.error)
    if root is not None:  # a folder: never follow a link out of it
        real = Path(f.path).resolve()
        if not real.is_relative_to(root):
            return SourceItem(f.key, f.source, error=f"link_outside_folder: {f.source} -> {real}")
    try:
        return SourceItem(f.key, f.source, data=Path(f.path).read_bytes(), label=f.label)
    except OSError as e:
        return SourceItem(f.key, f.source, error=f"unreadable: {e.strerror or e}")
