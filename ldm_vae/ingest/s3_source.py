"""The ``s3://bucket/prefix`` source: every image object under a prefix, as ``folder:`` takes
every image file under a folder (the same keys for the same tree).

Planning streams the listing page by page and keeps, per unit, only a summary: the key the unit
starts after, its image count, a fingerprint of its objects (key, ETag, size) and the few keys
that needed a collision suffix. A worker lists its own slice again from that key and checks the
fingerprint, so a listing of any length is never held, and objects changed between planning and
reading fail the unit instead of mixing two listings. A changed object changes only its own
unit's fingerprint: a re-run (``dvc repro -f -s download``) reads that unit again, keeps the rest.

A unit is ``data.unit_images`` images in key order (auto: merged in pairs as the listing grows,
see :func:`plan_s3`). As with a folder, adding objects before the
end shifts the slices after them (those units are read again), editing objects does not.

An object the store refuses alone (404: deleted since listing, 403: a policy) is that image's
rejection (``http_404``, ...), as for a URL; a store that stops answering (connection errors and
5xx after botocore's retries with back-off) fails the unit, naming it: the re-run reads it again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from typing import Iterator

from .. import s3 as store
from ..runner import Unit
from .items import IMAGE_EXTENSIONS, UNIT_LADDER, SourceItem, folder_key, ordered_map, unique_key, unit_size
from .labels import LabelRule


def listing_root(url: str) -> str:
    """The prefix a source lists: 's3://b/photos' and 's3://b/photos/' both mean the folder."""
    bucket, prefix = store.split_url(url)
    return f"s3://{bucket}/{prefix.rstrip('/') + '/' if prefix.strip('/') else ''}"


def plan_s3(cfg, labels=None) -> list[Unit]:
    """Units of ``data.unit_images`` images in key order (at most ``cfg.max_images`` in all).

    ``auto`` (:func:`~ldm_vae.ingest.items.unit_size`) needs the count, which only the end of the
    listing tells: the planner cuts the listing into units of the smallest size as it streams and
    merges neighbours in pairs whenever the count so far allows the next size (the sizes double):
    at most 2 x MIN_UNITS summaries until units reach the largest size, then one per unit.

    ``labels`` (:class:`~ldm_vae.ingest.sources.Labels`, ``data.labels: folder``): each unit
    carries the index of each class its objects name (a few per unit), and a worker labels them."""
    root = listing_root(cfg.source)
    s3 = _client(cfg)
    auto = cfg.unit_images == "auto"
    leaf = UNIT_LADDER[0] if auto else int(cfg.unit_images)  # rows per fingerprinted leaf
    size = leaf  # rows per unit so far
    done: list[_Summary] = []
    cur = _Summary("", leaf)
    total = 0
    with _DiskSeen() as seen:
        for obj in _images(store.iter_objects(s3, root), root):
            rel = obj["rel"]
            key = unique_key(folder_key(rel), rel, seen)
            cur.add(key, obj, folder_key(rel))
            if labels is not None:
                name, _ = labels.rule.class_name(rel)  # no class: rejected when the unit reads it
                if name is not None:
                    cur.classes.add(name)
            total += 1
            if cur.count == size:
                done.append(cur)
                cur = _Summary(obj["Key"], leaf)
                if auto and unit_size("auto", total) > size:  # the count allows the next size
                    size *= 2
                    done = [a.merge(b) for a, b in zip(done[0::2], done[1::2])]
            if cfg.max_images and total >= cfg.max_images:
                break
    if cur.count:
        done.append(cur)
    index = labels.finish({c for summary in done for c in summary.classes}) if labels is not None else None
    units = [summary.unit(n, root, index) for n, summary in enumerate(done)]
    if not units:
        raise store.StoreError(f"{root}: no image objects under this prefix (extensions "
                               f"{', '.join(sorted(IMAGE_EXTENSIONS))}): an empty dataset is not a success")
    return units


@dataclass(frozen=True)
class S3Slice:
    """An s3:// unit: ``count`` image objects after the key ``after`` under ``root``, with the
    fingerprint of its listing (``planned``, over leaves of ``leaf`` rows), the keys that needed a
    collision suffix (``renamed``: index -> key), and with data.labels its classes' indices."""
    root: str
    after: str
    count: int
    renamed: dict
    planned: str
    leaf: int
    classes: dict | None = None

    def items(self, cfg, skip: set[str] = frozenset()) -> Iterator[SourceItem]:
        return iter_s3_unit(cfg, self)


def iter_s3_unit(cfg, task: S3Slice) -> Iterator[SourceItem]:
    """The SourceItems of one planned unit, in key order, read on ``cfg.download_workers``
    threads; fails the unit if its slice of the listing is no longer what was planned."""
    root, after, count, renamed, planned, leaf, classes = (task.root, task.after, task.count, task.renamed,
                                                            task.planned, task.leaf, task.classes)
    s3 = _client(cfg)
    bucket, _ = store.split_url(root)
    objs = list(itertools.islice(_images(store.iter_objects(s3, root, start_after=after), root), count))
    leaves = bytearray()
    for start in range(0, len(objs), leaf):
        check = hashlib.sha256()
        for i, obj in enumerate(objs[start: start + leaf], start):
            obj["key"] = renamed.get(str(i)) or folder_key(obj["rel"])
            check.update(_row(obj["key"], obj))
        leaves += check.digest()
    if len(objs) != count or hashlib.sha256(leaves).hexdigest()[:16] != planned:
        where = f"s3://{bucket}/{after}" if after else "the start of the prefix"
        raise store.StoreError(f"{root}: the objects after {where} changed since the stage planned "
                               "(listing, ETags or sizes): run the stage again")
    rule = LabelRule(cfg.labels) if classes is not None else None
    yield from ordered_map(lambda o: _labelled(_read(cfg, s3, bucket, o), rule, classes, o["rel"]), objs,
                           cfg.download_workers)


def _labelled(item: SourceItem, rule: LabelRule | None, classes: dict | None, rel: str) -> SourceItem:
    """The item with its class index (``data.labels``), or rejected for having no class."""
    if rule is None or item.error:
        return item
    name, error = rule.class_name(rel)
    if error:
        return SourceItem(item.key, item.source, error=error)
    item.label = classes[name]
    return item


def _read(cfg, s3, bucket: str, obj: dict) -> SourceItem:
    url = f"s3://{bucket}/{obj['Key']}"
    item = SourceItem(obj["key"], url)
    try:
        item.data = store.get_bytes(s3, bucket, obj["Key"], cfg.max_bytes, time.monotonic() + cfg.fetch_deadline,
                                    cfg.retries, cfg.retry_backoff)
    except store.TooLarge as e:
        item.error = f"too_large: {e}"
    except TimeoutError as e:
        item.error = f"timeout: {e}"
    except store.StoreError as e:  # cut on every try: the store is failing, the unit fails
        e.abort_stage = True
        raise
    except Exception as e:
        status = store.status_of(e)
        if status is not None and 400 <= status < 500:
            item.error = f"http_{status}: {url}"  # this object alone: deleted since listing, a policy
        else:  # the store itself failed after the retries: the unit fails, the re-run reads it again
            raise store.explain(url, e, s3.meta.endpoint_url) from e
    return item


def _client(cfg):
    return store.process_client(cfg.s3_endpoint, connect_timeout=cfg.connect_timeout, read_timeout=cfg.read_timeout,
                                retries=cfg.retries, connections=cfg.download_workers)


def _images(objects, root: str) -> Iterator[dict]:
    """Image objects (by extension) with their path under the prefix as ``rel``."""
    skip = len(store.split_url(root)[1])
    for obj in objects:
        rel = obj["Key"][skip:]
        if rel and not rel.endswith("/") and os.path.splitext(rel)[1].lower() in IMAGE_EXTENSIONS:
            obj["rel"] = rel
            yield obj


def _row(key: str, obj: dict) -> bytes:
    return json.dumps([key, obj["rel"], obj.get("ETag", ""), obj.get("Size", -1)]).encode()


class _Summary:
    """What a unit keeps of its slice of the listing while the planner streams past it: its
    fingerprint is the hash of its leaves' digests (``leaf`` rows each), so two neighbours merge
    into one unit without their rows."""

    def __init__(self, after: str, leaf: int):
        self.after, self.leaf, self.count, self.renamed = after, leaf, 0, {}
        self.leaves = bytearray()  # 32 bytes per finished leaf
        self.hash = hashlib.sha256()  # the leaf being filled
        self.first = ""
        self.classes: set[str] = set()  # data.labels: the class names of its objects

    def add(self, key: str, obj: dict, plain: str) -> None:
        if key != plain:
            self.renamed[str(self.count)] = key  # a collision suffix: rare, so kept per unit
        self.first = self.first or obj["rel"]
        self.hash.update(_row(key, obj))
        self.count += 1
        if self.count % self.leaf == 0:
            self.leaves += self.hash.digest()
            self.hash = hashlib.sha256()

    def merge(self, other: "_Summary") -> "_Summary":
        """This unit and the next as one (this one's leaves are all full)."""
        self.renamed.update({str(int(i) + self.count): k for i, k in other.renamed.items()})
        self.count += other.count
        self.leaves += other.leaves
        self.hash = other.hash
        self.classes |= other.classes
        return self

    def unit(self, n: int, root: str, index: dict[str, int] | None) -> Unit:
        leaves = self.leaves + (self.hash.digest() if self.count % self.leaf else b"")
        digest = hashlib.sha256(leaves).hexdigest()[:16]
        ident = {"kind": "s3", "root": root, "after": self.after, "count": self.count, "objects": digest}
        classes = None if index is None else {c: index[c] for c in sorted(self.classes)}
        if classes is not None:
            ident["classes"] = classes  # a relabelled class redoes the units that hold it
        return Unit(f"u{n:05d}", ident, S3Slice(root, self.after, self.count, self.renamed, digest, self.leaf, classes),
                    self.count, f"{root}{self.first} and {self.count - 1} objects after it")


class _DiskSeen:
    """``unique_key``'s key -> path map on disk (SQLite in a temporary folder): the planner's
    memory stays flat however many keys the listing has."""

    def __enter__(self):
        self._dir = tempfile.TemporaryDirectory(prefix="ldm-vae-keys-")
        self._db = sqlite3.connect(os.path.join(self._dir.name, "keys.sqlite"))
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE seen (key TEXT PRIMARY KEY, raw TEXT) WITHOUT ROWID")
        return self

    def __exit__(self, *exc):
        self._db.close()
        self._dir.cleanup()
        return False

    def __contains__(self, key: str) -> bool:
        return self._get(key) is not None

    def __getitem__(self, key: str) -> str:
        raw = self._get(key)
        if raw is None:
            raise KeyError(key)
        return raw

    def __setitem__(self, key: str, raw: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO seen VALUES (?, ?)", (key, raw))

    def _get(self, key: str) -> str | None:
        row = self._db.execute("SELECT raw FROM seen WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None
