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

import csv
import dataclasses
import email.utils
import hashlib
import io
import json
import random
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from .. import s3 as store
from ..runner import Unit
from .items import SourceItem, chunks, fingerprint, folder_key, ordered_map, unique_key, unit_size

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
    def __init__(self, reason: str, detail: str = "", retry_after: float | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.retry_after = reason, detail, retry_after


def read_url_list(target: str, endpoint: str = "") -> list[UrlRow]:
    """Every row of a URL list (a local path or an ``s3://`` URL), in file order."""
    target = str(target)
    name = target.lower()
    if store.is_s3(target):
        with store.open_read(target, endpoint) as f:
            records = _records(name, io.BytesIO(f.read()))  # parquet needs to seek
    else:
        if not Path(target).is_file():
            raise FileNotFoundError(f"data.source: URL list {target!r} does not exist")
        with open(target, "rb") as f:
            records = _records(name, f)
    if records and "url" not in records[0]:
        raise ValueError(f"data.source: {target!r} has no 'url' column (columns: {', '.join(records[0])})")
    rows, seen = [], {}
    for r in records:
        url = str(r.get("url") or "").strip()
        raw = str(r["key"]) if r.get("key") not in (None, "") else None
        # Two different keys that read the same once made safe ('a b', 'a_b') stay two keys; the
        # same key twice stays one (plan_urls rejects the second as a duplicate).
        key = unique_key(folder_key(raw), raw, seen) if raw is not None else url_key(url)
        rows.append(UrlRow(key, url, _opt(r.get("caption")), _label(r.get("label")), _opt(r.get("sha256"))))
    return rows


def _records(name: str, f) -> list[dict]:
    """The rows of a list file opened in binary: parquet, csv, jsonl, or one URL a line."""
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(f).to_pylist()
    text = io.TextIOWrapper(f, encoding="utf-8", newline="")
    if name.endswith(".csv"):
        return list(csv.DictReader(text))
    if name.endswith(".jsonl"):
        return [json.loads(line) for line in text if line.strip()]
    return [{"url": s} for s in (line.strip() for line in text) if s and not s.startswith("#")]


def url_key(url: str) -> str:
    return "url-" + hashlib.sha1(url.encode()).hexdigest()[:16]


def plan_urls(cfg) -> list[Unit]:
    """The list cut into units of ``data.unit_images`` rows (:func:`unit_size`). A key seen earlier in the list is
    marked here, once for the whole list, so the choice does not depend on the units."""
    rows = read_url_list(cfg.source_target, cfg.s3_endpoint)
    if cfg.max_images:
        rows = rows[: cfg.max_images]
    seen: set[str] = set()
    marked = []
    for row in rows:
        marked.append((row, f"duplicate_url: key {row.key} appears earlier in the list" if row.key in seen else None))
        seen.add(row.key)
    size = unit_size(cfg.unit_images, len(marked))
    return [Unit(f"u{n:05d}", {"kind": "urls", "rows": fingerprint([(dataclasses.astuple(r), e) for r, e in chunk])},
                 UrlSlice(tuple(chunk)), len(chunk), f"URL list rows {n * size}-{n * size + len(chunk) - 1}")
            for n, chunk in enumerate(chunks(marked, size))]


@dataclass(frozen=True)
class UrlSlice:
    """A urls: unit: its rows of the list, each with the error planning found (a duplicate key)."""
    rows: tuple[tuple[UrlRow, str | None], ...]

    def items(self, cfg, skip: set[str] = frozenset()) -> Iterator[SourceItem]:
        return iter_url_rows(cfg, list(self.rows), skip)


def iter_url_rows(cfg, rows: list[tuple[UrlRow, str | None]], skip: set[str] = frozenset()) -> Iterator[SourceItem]:
    """SourceItems of ``rows`` (row, error) in order, fetched on ``cfg.download_workers`` threads
    (a bounded window of fetches runs ahead of the item being yielded: ``ordered_map``)."""
    fetcher = Fetcher(cfg)
    return ordered_map(lambda entry: _item(fetcher, *entry, skip), rows, cfg.download_workers)


def _item(fetcher: "Fetcher", row: UrlRow, error: str | None, skip: set[str]) -> SourceItem:
    item = SourceItem(row.key, row.url, caption=row.caption, label=row.label)
    if error:
        item.error = error
        return item
    if row.key in skip:
        return item  # not fetched: the caller has its bytes
    try:
        data, final = fetcher.fetch(row.url)
    except FetchError as e:
        item.error = f"{e.reason}: {e.detail}"
        return item
    except Exception as e:  # anything else one URL does is that URL's rejection, never the stage's end
        item.error = f"fetch_error: {type(e).__name__}: {e}"[:400]
        return item
    if final != row.url:
        item.final_url = final
    if row.sha256 and hashlib.sha256(data).hexdigest() != row.sha256.lower():
        item.error = f"sha256_mismatch: expected {row.sha256}, got {hashlib.sha256(data).hexdigest()}"
        return item
    item.data = data
    return item


class Fetcher:
    """HTTP(S) GET with timeouts, a total deadline, a size cap and retries (exponential back-off
    with jitter, or the server's Retry-After on 429/503 while it fits in the deadline)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._local = threading.local()  # one requests.Session (connection pool) per thread

    def _session(self):
        import requests

        if not hasattr(self._local, "session"):
            session = requests.Session()
            session.headers["User-Agent"] = "ldm-vae-download/0.1"
            adapter = _watched_adapter()
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
        return self._local.session

    def fetch(self, url: str) -> tuple[bytes, str]:
        """(body, final URL after redirects), or FetchError."""
        import requests

        try:
            scheme = urlsplit(url).scheme.lower()
        except ValueError as e:  # '[::1/x': a broken IPv6 host
            raise FetchError("bad_url", f"{e}: {url[:200]!r}") from None
        if scheme not in ("http", "https"):
            raise FetchError("bad_url", f"only http(s) URLs are fetched, got {url[:200]!r}")
        deadline = time.monotonic() + self.cfg.fetch_deadline
        last: FetchError | None = None
        wait, tries = 0.0, 0
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                if time.monotonic() + wait > deadline:
                    break
                time.sleep(wait)
            tries += 1
            wait = self.cfg.retry_backoff * 2 ** attempt * random.uniform(0.75, 1.25)
            try:
                return self._get(url, deadline)
            except FetchError as e:
                last = e
                if not _retryable(e.reason):
                    raise
                if e.retry_after is not None and e.reason in ("http_429", "http_503"):
                    # the server said when: wait that long, if it fits in the deadline
                    wait = e.retry_after
            except requests.exceptions.Timeout as e:
                last = FetchError("timeout", f"{type(e).__name__} after {attempt + 1} tries")
            except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
                if time.monotonic() >= deadline:  # the watchdog cut it: the deadline, not the network
                    raise FetchError("timeout", f"over data.fetch_deadline ({self.cfg.fetch_deadline} s)") from e
                last = FetchError("connection_error", str(e)[:300])
            except requests.exceptions.RequestException as e:
                raise FetchError("bad_url", f"{type(e).__name__}: {e}"[:300]) from e
            if time.monotonic() >= deadline:
                raise FetchError("timeout", f"over data.fetch_deadline ({self.cfg.fetch_deadline} s)")
        assert last is not None
        raise FetchError(last.reason, f"{last.detail} (gave up after {tries} tries)")

    def _get(self, url: str, deadline: float) -> tuple[bytes, str]:
        timeout = (self.cfg.connect_timeout, self.cfg.read_timeout)
        # The read timeout is per recv: a server that drips a byte at a time never trips it. The
        # watchdog shuts this thread's connection down at the deadline, wherever the fetch is.
        with _Watchdog(deadline - time.monotonic()):
            with self._session().get(url, timeout=timeout, stream=True, allow_redirects=True) as r:
                if urlsplit(r.url).scheme.lower() not in ("http", "https"):
                    raise FetchError("bad_url", f"redirected to {r.url[:200]!r}")
                if r.status_code != 200:
                    raise FetchError(f"http_{r.status_code}", url[:200], _retry_after(r.headers.get("Retry-After")))
                refused = opted_out(_header_values(r, "X-Robots-Tag"), self.cfg.disallowed_header_directives)
                if refused:  # before the body: an opted-out image is never downloaded
                    raise FetchError("opted_out", f"X-Robots-Tag: {refused}")
                declared = _content_length(r.headers.get("Content-Length"))
                if declared is None:  # no way to tell where the body ends: never wait for it
                    raise FetchError("bad_response", f"Content-Length {r.headers['Content-Length'][:40]!r}")
                if declared > self.cfg.max_bytes:
                    raise FetchError("too_large", f"{declared} bytes > data.max_bytes {self.cfg.max_bytes}")
                body = bytearray()
                for chunk in r.iter_content(CHUNK):
                    body += chunk
                    if len(body) > self.cfg.max_bytes:
                        raise FetchError("too_large", f"more than data.max_bytes {self.cfg.max_bytes}")
                if declared and len(body) < declared:
                    raise FetchError("connection_error", f"body cut short: {len(body)} of {declared} bytes")
                return bytes(body), r.url


USER_AGENT_TOKEN = "ldm-vae"  # the name an X-Robots-Tag may address this downloader by


def opted_out(values: list[str], disallowed: tuple[str, ...]) -> str | None:
    """The X-Robots-Tag value that opts this image out, or None, by img2dataset's rule: each header
    value is ``directives`` or ``agent: directives`` (comma-separated); it applies when it names
    no agent or names ldm-vae, and refuses when one of its directives is ``disallowed``."""
    wanted = set(disallowed)
    for value in values:
        head, sep, rest = value.partition(":")
        # "otherbot: noai" addresses one crawler; "noindex, unavailable_after: <date>" addresses all
        addressed = bool(sep) and "," not in head and " " not in head.strip()
        if addressed and head.strip().lower() != USER_AGENT_TOKEN:
            continue
        directives = {d.strip().lower() for d in (rest if addressed else value).split(",")}
        if directives & wanted:
            return value.strip()[:200]
    return None


def _header_values(response, name: str) -> list[str]:
    """Every value of a header, one per header line (requests joins repeated lines with commas,
    which would merge an agent-addressed line with the next)."""
    raw = getattr(response.raw, "headers", None)
    if raw is not None and hasattr(raw, "getlist"):
        return list(raw.getlist(name))
    value = response.headers.get(name)
    return [value] if value else []


_WATCHED = threading.local()  # .box: [the connection this thread's current fetch runs on]


def _watched_adapter():
    """A requests adapter whose connections note themselves as the thread's current one."""
    from requests.adapters import HTTPAdapter
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    def watched(base):
        class Watched(base):
            def request(self, *args, **kwargs):
                box = getattr(_WATCHED, "box", None)
                if box is not None:
                    box[0] = self
                return super().request(*args, **kwargs)

        return Watched

    class Pool(HTTPConnectionPool):
        ConnectionCls = watched(HTTPConnection)

    class SPool(HTTPSConnectionPool):
        ConnectionCls = watched(HTTPSConnection)

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": Pool, "https": SPool}

    return Adapter()


class _Watchdog:
    """Shut down the calling thread's current connection after ``seconds`` (a blocked recv then
    returns at once); cancelled when the block ends first."""

    def __init__(self, seconds: float):
        self.seconds = max(0.0, seconds)

    def __enter__(self):
        self.box = _WATCHED.box = [None]  # filled by the connection's request(), in this thread
        self.fired = threading.Event()
        self.timer = threading.Timer(self.seconds, self._cut)
        self.timer.daemon = True
        self.timer.start()
        return self

    def _cut(self) -> None:
        self.fired.set()
        sock = getattr(self.box[0], "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed

    def __exit__(self, *exc):
        self.timer.cancel()
        _WATCHED.box = None
        if self.fired.is_set() and self.box[0] is not None:
            self.box[0].close()  # never reused: its stream was cut mid-response
        return False


def _content_length(value: str | None) -> int | None:
    """The declared length: 0 when absent (the size cap still holds as the body arrives), None
    when present but not a plain number."""
    if value is None:
        return 0
    value = value.strip()
    return int(value) if value.isdigit() and value.isascii() else None


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


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
