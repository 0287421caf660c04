"""The ``urls:<file>`` source: image URLs fetched in parallel, retried, resumable.

The list is a text file (one URL a line; blank lines and ``#`` comments skipped) or a table
(``.csv``, ``.parquet``, ``.jsonl``) with a ``url`` column and optional ``caption``, ``label``,
``sha256`` and ``key`` columns. Without a ``key`` column an item's key is a hash of its URL, so
keys stay the same when the list is re-ordered or extended.

Fetching is the slow part, so it runs on ``data.download_workers`` threads; items come back in
list order (a bounded window of fetches runs ahead), which keeps the manifest and the choice
among duplicates deterministic. The list is cut into units (the download runner's); every worker
process fetches its units on its own threads, and a re-run after a kill fetches only the units
that were not finished.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import csv
import dataclasses
import hashlib
import json
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from .runner import Unit
from .sources import SourceItem, chunks, fingerprint, folder_key, unique_key

RETRY_STATUS = {429, 500, 502, 503, 504}  # and any other 5xx
CHUNK = 1 << 16


@dataclass
class UrlRow:
    key: str
    url: str
    caption: str | None = None
    label: int | str | None = None
    sha256: str | None = None


class FetchError(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def read_url_list(path: Path) -> list[UrlRow]:
    """Every row of a URL list, in file order."""
    if not path.is_file():
        raise FileNotFoundError(f"data.source: URL list {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        records = pq.read_table(path).to_pylist()
    elif suffix == ".csv":
        with open(path, newline="") as f:
            records = list(csv.DictReader(f))
    elif suffix == ".jsonl":
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    else:
        with open(path) as f:
            records = [{"url": s} for s in (line.strip() for line in f) if s and not s.startswith("#")]
    if records and "url" not in records[0]:
        raise ValueError(f"data.source: {str(path)!r} has no 'url' column (columns: {', '.join(records[0])})")
    rows, seen = [], {}
    for r in records:
        url = str(r.get("url") or "").strip()
        raw = str(r["key"]) if r.get("key") not in (None, "") else None
        # Two different keys that read the same once made safe ('a b', 'a_b') stay two keys; the
        # same key twice stays one (plan_urls rejects the second as a duplicate).
        key = unique_key(folder_key(raw), raw, seen) if raw is not None else url_key(url)
        rows.append(UrlRow(key, url, _opt(r.get("caption")), _label(r.get("label")), _opt(r.get("sha256"))))
    return rows


def url_key(url: str) -> str:
    return "url-" + hashlib.sha1(url.encode()).hexdigest()[:16]


def plan_urls(cfg) -> list[Unit]:
    """The list cut into units of ``cfg.unit_images`` rows. A key seen earlier in the list is
    marked here, once for the whole list, so the choice does not depend on the units."""
    rows = read_url_list(Path(cfg.source_target))
    if cfg.max_images:
        rows = rows[: cfg.max_images]
    seen: set[str] = set()
    marked = []
    for row in rows:
        marked.append((row, f"duplicate_url: key {row.key} appears earlier in the list" if row.key in seen else None))
        seen.add(row.key)
    return [Unit(f"u{n:05d}", {"kind": "urls", "rows": fingerprint([(dataclasses.astuple(r), e) for r, e in chunk])},
                 ("urls", chunk), len(chunk), f"URL list rows {n * cfg.unit_images}-{n * cfg.unit_images + len(chunk) - 1}")
            for n, chunk in enumerate(chunks(marked, cfg.unit_images))]


def iter_url_rows(cfg, rows: list[tuple[UrlRow, str | None]], skip: set[str] = frozenset()) -> Iterator[SourceItem]:
    """SourceItems of ``rows`` (row, error) in order, fetched on ``cfg.download_workers`` threads
    (a bounded window of fetches runs ahead of the item being yielded)."""
    fetcher = Fetcher(cfg)
    window = cfg.download_workers * 4  # fetches in flight or finished but not yet taken
    with cf.ThreadPoolExecutor(cfg.download_workers, thread_name_prefix="fetch") as pool:
        pending: collections.deque = collections.deque()
        it = iter(rows)

        def submit(entry) -> None:
            row, error = entry
            fetch = not error and row.key not in skip
            pending.append((row, pool.submit(fetcher.fetch, row.url) if fetch else None, error))

        for entry in it:
            submit(entry)
            if len(pending) >= window:
                break
        while pending:
            yield _item(*pending.popleft())
            nxt = next(it, None)
            if nxt is not None:
                submit(nxt)


def _item(row: UrlRow, future: cf.Future | None, error: str | None) -> SourceItem:
    item = SourceItem(row.key, row.url, caption=row.caption, label=row.label)
    if error:
        item.error = error
        return item
    if future is None:
        return item  # not fetched: the caller has its bytes
    try:
        data = future.result()
    except FetchError as e:
        item.error = f"{e.reason}: {e.detail}"
        return item
    except OSError as e:
        item.error = f"unreadable: {e}"
        return item
    if row.sha256 and hashlib.sha256(data).hexdigest() != row.sha256.lower():
        item.error = f"sha256_mismatch: expected {row.sha256}, got {hashlib.sha256(data).hexdigest()}"
        return item
    item.data = data
    return item


class Fetcher:
    """HTTP(S) GET with timeouts, a size cap and retries with exponential back-off and jitter."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._local = threading.local()  # one requests.Session (connection pool) per thread

    def _session(self):
        import requests

        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
            self._local.session.headers["User-Agent"] = "ldm-vae-download/0.1"
        return self._local.session

    def fetch(self, url: str) -> bytes:
        import requests

        scheme = urlsplit(url).scheme.lower()
        if scheme not in ("http", "https"):
            raise FetchError("bad_url", f"only http(s) URLs are fetched, got {url[:200]!r}")
        last: FetchError | None = None
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(self.cfg.retry_backoff * 2 ** (attempt - 1) * random.uniform(0.75, 1.25))
            try:
                return self._get(url)
            except FetchError as e:
                last = e
                if not _retryable(e.reason):
                    raise
            except requests.exceptions.Timeout as e:
                last = FetchError("timeout", f"{type(e).__name__} after {attempt + 1} tries")
            except requests.exceptions.ConnectionError as e:
                last = FetchError("connection_error", str(e)[:300])
            except requests.exceptions.RequestException as e:
                raise FetchError("bad_url", f"{type(e).__name__}: {e}"[:300]) from e
        assert last is not None
        raise FetchError(last.reason, f"{last.detail} (gave up after {self.cfg.retries + 1} tries)")

    def _get(self, url: str) -> bytes:
        timeout = (self.cfg.connect_timeout, self.cfg.read_timeout)
        with self._session().get(url, timeout=timeout, stream=True, allow_redirects=True) as r:
            if urlsplit(r.url).scheme.lower() not in ("http", "https"):
                raise FetchError("bad_url", f"redirected to {r.url[:200]!r}")
            if r.status_code != 200:
                raise FetchError(f"http_{r.status_code}", url[:200])
            declared = int(r.headers.get("Content-Length") or 0)
            if declared > self.cfg.max_bytes:
                raise FetchError("too_large", f"{declared} bytes > data.max_bytes {self.cfg.max_bytes}")
            body = bytearray()
            for chunk in r.iter_content(CHUNK):
                body += chunk
                if len(body) > self.cfg.max_bytes:
                    raise FetchError("too_large", f"more than data.max_bytes {self.cfg.max_bytes}")
            if declared and len(body) < declared:
                raise FetchError("connection_error", f"body cut short: {len(body)} of {declared} bytes")
            return bytes(body)


def _retryable(reason: str) -> bool:
    """Timeouts, dropped connections, 429 and 5xx are worth another try; 404 and other 4xx are not."""
    if reason in ("timeout", "connection_error"):
        return True
    code = reason.removeprefix("http_")
    return code.isdigit() and (int(code) in RETRY_STATUS or int(code) >= 500)


def _opt(value) -> str | None:
    return None if value is None or value == "" else str(value)


def _label(value):
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return str(value)
