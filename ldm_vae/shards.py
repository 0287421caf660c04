"""Writing and reading webdataset tar shards.

Writers put each shard under a temporary name and rename it only once it is complete, so a
killed run never leaves a short shard that a reader or a re-run would take for a finished one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

import webdataset as wds


class ShardWriter:
    """Numbered shards ``<dir>/<prefix>-00000.tar`` of at most ``per_shard`` samples each.

    Samples are dicts in webdataset form (``__key__`` plus one entry per extension, values
    already bytes or something webdataset's default encoder handles).
    """

    def __init__(self, directory: Path, prefix: str, per_shard: int):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.per_shard = per_shard
        self.index = 0
        self.count = 0  # samples in the open shard
        self.total = 0
        self.written: list[str] = []  # names of completed shards
        self._stream = None
        self._writer = None
        self._tmp: Path | None = None

    def write(self, sample: dict) -> None:
        if self._writer is None:
            self._open()
        self._writer.write(sample)
        self.count += 1
        self.total += 1
        if self.count >= self.per_shard:
            self._close()

    def close(self) -> list[str]:
        if self._writer is not None:
            self._close()
        return self.written

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        elif self._writer is not None:  # failed mid-shard: drop the partial file
            self._writer.close()
            self._tmp.unlink(missing_ok=True)

    def _open(self) -> None:
        name = f"{self.prefix}-{self.index:05d}.tar"
        self._tmp = self.directory / f".{name}.tmp"
        self._stream = open(self._tmp, "wb")
        # mtime 0 (an int): identical bytes on re-runs, and plain ustar headers (a float mtime makes
        # tarfile add a pax header to every member, which doubles the cost of reading the shards).
        self._writer = wds.TarWriter(self._stream, mtime=0)

    def _close(self) -> None:
        self._writer.close()  # closes the stream too
        name = f"{self.prefix}-{self.index:05d}.tar"
        os.replace(self._tmp, self.directory / name)
        self.written.append(name)
        self._writer = self._stream = self._tmp = None
        self.index += 1
        self.count = 0


def shard_paths(directory: Path) -> list[str]:
    """Completed shards in a folder, sorted (temporary files are never listed)."""
    return sorted(str(p) for p in Path(directory).glob("*.tar") if not p.name.startswith("."))


def iter_samples(paths: Iterable[str]) -> Iterator[dict]:
    """Every sample of ``paths`` in order, raw bytes per extension, in this process only.

    For stages that must see each sample exactly once (encode, evaluate): no node or worker
    splitting and no shuffling.
    """
    paths = list(paths)
    if not paths:
        return iter(())
    ds = wds.WebDataset(
        paths, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
    )
    return iter(ds)
