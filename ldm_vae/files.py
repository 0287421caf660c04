"""Writing outputs so that a kill never leaves a short one: under a temporary sibling name, then
renamed into place (an atomic step on one filesystem).

A rename also replaces rather than writes through: DVC's cache hard-links outputs, and writing
into a linked file would change the cached copy too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path (``.<name>.tmp`` beside ``path``) to write a file or a folder under; it
    becomes ``path`` when the block ends without an error and is removed when it fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    _remove(tmp)  # left by a killed run
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if tmp.is_dir() and path.is_dir():
        shutil.rmtree(path)  # a folder cannot be renamed over a non-empty one
    os.replace(tmp, path)


def atomic_write(path: Path, data: bytes | str) -> None:
    """``path`` holds ``data`` (str as UTF-8), whole or not at all."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def md5_of(path: Path) -> str:
    """A file's md5, read in 1 MiB chunks: what DVC records for it in dvc.lock."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
