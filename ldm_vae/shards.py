"""Writing and reading webdataset tar shards.

Writers put each shard under a temporary name and rename it only once it is complete, so a
killed run never leaves a short shard that a reader or a re-run would take for a finished one.

Readers walk the tar's 512-byte headers directly (ustar, pax and GNU long names, checksums
verified) instead of going through the tarfile module: 5-10x less Python per member, which is
most of the cost of streaming small samples (64 px images to the trainer, latents to a diffusion
trainer). Nothing is ever extracted to disk, so member paths cannot escape anywhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

_ZERO_BLOCK = bytes(512)


class ShardWriter:
    """Numbered shards ``<dir>/<prefix>-00000.tar`` of at most ``per_shard`` samples each.

    Samples are dicts in webdataset form: ``__key__`` plus one entry per extension, each bytes,
    str (UTF-8), a dict or list (JSON) or a number. Members are plain ustar entries (mode 0444,
    owner 0, mtime 0: the same samples give the same bytes), with a pax header only for a path
    over 100 bytes; written directly, which costs a tenth of tarfile's header building.
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
        self._tmp: Path | None = None

    def write(self, sample: dict) -> None:
        key = sample["__key__"]
        members = b"".join(_member(f"{key}.{ext}", _to_bytes(ext, value))
                           for ext, value in sample.items() if not ext.startswith("__"))
        if self._stream is None:
            self._open()
        self._stream.write(members)
        self.count += 1
        self.total += 1
        if self.count >= self.per_shard:
            self._close()

    def close(self) -> list[str]:
        if self._stream is not None:
            self._close()
        return self.written

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        elif self._stream is not None:  # failed mid-shard: drop the partial file
            self._stream.close()
            self._tmp.unlink(missing_ok=True)

    def _open(self) -> None:
        name = f"{self.prefix}-{self.index:05d}.tar"
        self._tmp = self.directory / f".{name}.tmp"
        self._stream = open(self._tmp, "wb")

    def _close(self) -> None:
        self._stream.write(bytes(1024))  # the end-of-archive marker: two zero blocks
        self._stream.close()
        name = f"{self.prefix}-{self.index:05d}.tar"
        os.replace(self._tmp, self.directory / name)
        self.written.append(name)
        self._stream = self._tmp = None
        self.index += 1
        self.count = 0


def _to_bytes(ext: str, value) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (dict, list)):
        return json.dumps(value).encode("utf-8")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value).encode()
    raise TypeError(f"shard member .{ext}: cannot store a {type(value).__name__}")


def _header(name: bytes, size: int, kind: bytes) -> bytes:
    h = bytearray(512)
    h[0 : len(name)] = name
    h[100:108] = b"0000444\0"  # mode
    h[108:116] = h[116:124] = b"0000000\0"  # uid, gid
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"  # mtime
    h[148:156] = b" " * 8  # the checksum counts its own field as spaces
    h[156:157] = kind
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _member(name: str, data: bytes) -> bytes:
    """One tar member: header(s), data, zero padding to the 512-byte block."""
    raw = name.encode("utf-8")
    head = b""
    if len(raw) > 100:  # a pax header carries the full path
        body = b" path=" + raw + b"\n"
        n = len(body) + 1
        while len(str(n)) + len(body) != n:
            n = len(str(n)) + len(body)
        record = str(n).encode() + body
        head = _header(b"././@PaxHeader", len(record), b"x") + record + bytes(-len(record) % 512)
        raw = raw[:100]
    return head + _header(raw, len(data), b"0") + data + bytes(-len(data) % 512)


def shard_paths(directory: Path) -> list[str]:
    """Completed shards in a folder, sorted (temporary files are never listed)."""
    return sorted(str(p) for p in Path(directory).glob("*.tar") if not p.name.startswith("."))


def iter_samples(paths: Iterable[str]) -> Iterator[dict]:
    """Every sample of ``paths`` in order, raw bytes per extension, in this process only.

    For stages that must see each sample exactly once (encode, evaluate): no node or worker
    splitting and no shuffling.
    """
    for path in paths:
        with open(path, "rb") as f:
            yield from _group(tar_members(f), str(path))


def tar_samples(src: Iterable[dict], handler=None) -> Iterator[dict]:
    """A webdataset pipeline stage: ``{"url": ...}`` dicts in, samples out (as
    ``wds.tarfile_to_samples()``, local paths or URLs through webdataset's opener)."""
    # Imported here: webdataset imports torch (a second), which download and prepare never need.
    import webdataset as wds

    handler = handler or wds.reraise_exception
    for source in wds.tariterators.url_opener(src, handler=handler):
        stream, url = source["stream"], source["url"]
        try:
            yield from _group(tar_members(stream), url)
        except Exception as exn:
            exn.args = exn.args + (url,)
            if not handler(exn):
                break
        finally:
            stream.close()


def shard_keys(path: str) -> list[str]:
    """The sample keys of a shard from its member headers only (the data is skipped, not read)."""
    keys = []
    with open(path, "rb") as f:
        for name, _ in tar_members(f, read_data=False):
            key = _split(name)[0]
            if key is not None and (not keys or keys[-1] != key):
                keys.append(key)
    return keys


def tar_members(stream: BinaryIO, read_data: bool = True) -> Iterator[tuple[str, bytes | None]]:
    """(path, data) of every regular file of a tar stream, in order; data None if not ``read_data``
    (then the stream must be seekable)."""
    override = None  # a pax or GNU long-name header's path for the next member
    while True:
        header = stream.read(512)
        if len(header) < 512 or header == _ZERO_BLOCK:
            return
        if int(header[148:156].rstrip(b"\0 ") or b"0", 8) != sum(header) - sum(header[148:156]) + 8 * 32:
            raise ValueError("corrupt tar header (checksum mismatch)")
        kind = header[156:157]
        if header[124] & 0x80:  # base-256 size (GNU, members over 8 GB)
            size = int.from_bytes(header[125:136], "big")
        else:
            size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
        padded = (size + 511) // 512 * 512
        if kind in (b"x", b"L"):  # a pax header (webdataset can write them) or a GNU long name
            data = _read_exact(stream, padded)[:size]
            override = _pax_path(data) if kind == b"x" else data.split(b"\0", 1)[0].decode()
            continue
        if kind in (b"0", b"\0"):  # a regular file
            name = override
            if name is None:
                name = header[0:100].split(b"\0", 1)[0].decode()
                prefix = header[345:500].split(b"\0", 1)[0].decode()
                name = f"{prefix}/{name}" if prefix else name
            if read_data:
                yield name, _read_exact(stream, padded)[:size]
            else:
                stream.seek(padded, os.SEEK_CUR)
                yield name, None
        elif read_data:
            _read_exact(stream, padded)
        else:
            stream.seek(padded, os.SEEK_CUR)
        override = None


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    while len(data) < n:  # pipes and sockets may return short reads
        more = stream.read(n - len(data))
        if not more:
            raise ValueError(f"truncated tar: wanted {n} bytes, got {len(data)}")
        data += more
    return data


def _pax_path(data: bytes) -> str | None:
    # pax records: b"<length> <key>=<value>\n" ...
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode()
        pos += length
    return None


def _split(name: str) -> tuple[str | None, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name."""
    dot = name.find(".", name.rfind("/") + 1)
    return (None, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def _group(members: Iterable[tuple[str, bytes]], url: str) -> Iterator[dict]:
    """Consecutive members with one key -> one sample {"__key__", "__url__", ext: bytes, ...}."""
    sample = None
    for name, data in members:
        key, ext = _split(name)
        if key is None:
            continue
        ext = ext.lower()
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        if ext in sample:
            raise ValueError(f"{url}: {name}: duplicate member in one sample")
        sample[ext] = data
    if sample is not None:
        yield sample
