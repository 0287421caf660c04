"""What every source yields and the rules every source shares: the item, its key, the units.

Kept apart from the sources themselves (sources.py, hf_source.py, urls.py) so that each of them
imports this and none imports another: no import circle.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class SourceItem:
    key: str  # stable and unique within the source; [A-Za-z0-9_-] only (webdataset splits on dots)
    source: str  # where it came from, for the manifest
    data: bytes | None = None
    error: str | None = None  # set when the item was found but could not be read
    caption: str | None = None
    label: int | str | None = None
    final_url: str | None = None  # urls: where the redirects ended, when not at ``source``


class SourceSlice(Protocol):
    """What a download unit reads (its ``Unit.task``): a frozen dataclass per source kind, planned
    by rank 0 and picklable to a pool process or a Ray task; it reads its own items."""

    def items(self, cfg, skip: set[str]) -> Iterator[SourceItem]:
        """The slice's items in source order; URL rows whose key is in ``skip`` come without data."""
        ...


@dataclass(frozen=True)
class FileRef:
    """A local file a unit reads (builtin and folder: sources): planned by rank 0, read by a worker."""
    key: str
    path: str | None
    source: str  # the path relative to the source folder (builtin: package/path), for the manifest
    error: str | None = None  # found but not usable (a missing package, no class folder)
    label: int | None = None  # the class index (data.labels), None: no label

    def ident(self, stat: tuple) -> list:
        """What a unit's fingerprint holds of this file: its names, size and mtime (and label)."""
        return [self.key, self.path, self.source, *stat] + ([] if self.label is None else [self.label])


# data.unit_images: auto. Sizes double from 125 to 4,000, so that a unit of one size is two units
# of the size below (an S3 listing merges its units as it grows, s3_source.py).
UNIT_LADDER = (125, 250, 500, 1000, 2000, 4000)
MIN_UNITS = 64  # auto cuts a source into at least this many units while the units are above 125


def unit_size(setting: str, items: int) -> int:
    """Source items per unit: the number ``data.unit_images`` gives, or for ``auto`` the largest
    size of UNIT_LADDER that still cuts ``items`` into MIN_UNITS units (125 below 16,000 items).

    A function of the item count alone, never of the process count, so outputs stay the same on
    any machine; a set of 2,000 is 16 units, enough for every core of a 16-core machine, while
    ImageNet's 1.28 M are 320 units of 4,000 (a unit's fixed costs stay small). The size changes
    only where the count crosses 64 x a ladder size (16,000, 32,000, 64,000, 128,000, 256,000
    items): adding images across one of those redoes every unit once."""
    if setting != "auto":
        return int(setting)
    fits = [size for size in UNIT_LADDER if items >= MIN_UNITS * size]
    return fits[-1] if fits else UNIT_LADDER[0]


def chunks(items: list, size: int) -> list[list]:
    return [items[i: i + size] for i in range(0, len(items), size)]


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def folder_key(rel: str) -> str:
    """'cats/Tabby 01.jpg' -> 'cats_Tabby_01': readable, stable, safe in a tar member name."""
    return safe_key(rel.rsplit(".", 1)[0], "image")


def safe_key(text: str, empty: str = "item") -> str:
    """Any text -> [A-Za-z0-9_-]+ (what :func:`ldm_vae.shards.check_key` accepts, and more: no
    slash either, so a key is one flat name): runs of anything else become one '_'."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or empty


def unique_key(key: str, raw: str, seen: dict[str, str]) -> str:
    """``key``, or ``key-<hash of raw>`` when another ``raw`` ('a.jpg' and 'a.png', 'a b' and
    'a_b') already took it: different inputs never share a key."""
    if key in seen and seen[key] != raw:
        key = f"{key}-{hashlib.sha1(raw.encode()).hexdigest()[:8]}"
    seen[key] = raw
    return key


def ordered_map(fn: Callable, items: Iterable, threads: int) -> Iterator:
    """``fn`` of each item on ``threads`` threads, results in item order, with a bounded window
    (4 per thread) of calls running ahead of the consumer: memory stays flat however slow it is."""
    window = threads * 4
    with cf.ThreadPoolExecutor(threads, thread_name_prefix="fetch") as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
