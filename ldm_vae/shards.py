"""Writing and reading webdataset tar shards.

Writers put each shard under a temporary name and rename it only once it is complete, so a
killed run never leaves a short shard that a reader or a re-run would take for a finished one.

Readers walk the tar's 512-byte headers directly (ustar, pax and GNU long names, checksums
verified) instead of going through the tarfile module: 5-10x less Python per member, which is
most of the cost of streaming small samples (64 px images to the trainer, latents to a diffusion
trainer). Nothing is ever extracted to disk, so member paths cannot escape anywhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import zlib
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
        key = check_key(sample["__key__"])
        exts = [ext for ext in sample if not ext.startswith("__")]
        check_extensions(key, exts)
        members = b"".join(_member(f"{key}.{ext}", _to_bytes(ext, sample[ext])) for ext in exts)
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
        # A name of this attempt's own: a unit that Ray re-runs elsewhere, while the lost worker
        # still writes, never shares a half-written file with it (the runner removes strays).
        self._tmp = self.directory / f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
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


# Readers (webdataset's and ours) take a sample's key as the member path up to the first dot of
# its file name, and group consecutive members by it: a key must survive that unchanged.
_KEY_FORBIDDEN = re.compile(r"[.\\\x00-\x1f\x7f]")
MAX_KEY_BYTES = 1000


def check_key(key) -> str:
    """``key`` if a reader will group its members back under exactly it, else ValueError naming it:
    no dot (readers cut there), no NUL, control character or backslash, no empty, ``.`` or
    ``..`` path part (a leading, trailing or doubled slash would change the grouping)."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"sample key {key!r}: must be a non-empty string")
    bad = _KEY_FORBIDDEN.search(key)
    if bad:
        raise ValueError(f"sample key {key!r}: {bad.group()!r} is not allowed in a key "
                         "(readers cut a key at its first dot; NUL, control characters and '\\' are refused)")
    if any(part == "" for part in key.split("/")):
        raise ValueError(f"sample key {key!r}: a leading, trailing or doubled '/' changes how readers group members")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise ValueError(f"sample key {key[:60]!r}...: longer than {MAX_KEY_BYTES} bytes")
    return key


def check_extensions(key: str, exts: list[str]) -> None:
    """Every member extension of a sample: non-empty, no '/', NUL or control character, and no
    two that differ only by case (readers match extensions case-insensitively)."""
    seen: dict[str, str] = {}
    for ext in exts:
        if not isinstance(ext, str) or not ext or ext.startswith(".") or ext.endswith(".") or "/" in ext \
                or re.search(r"[\x00-\x1f\x7f\\]", ext):
            raise ValueError(f"sample key {key!r}: member extension {ext!r} is not allowed")
        if ext.lower() in seen:
            raise ValueError(f"sample key {key!r}: extensions {seen[ext.lower()]!r} and {ext!r} differ only by case")
        seen[ext.lower()] = ext


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
        with open(path, "rb", buffering=READ_BUFFER) as f, _naming(path):
            yield from _group(tar_members(f), str(path))


def tar_samples(src: Iterable[dict], handler=None) -> Iterator[dict]:
    """A webdataset pipeline stage: ``{"url": ...}`` dicts in, samples out (as
    ``wds.tarfile_to_samples()``, local paths or URLs through webdataset's opener)."""
    # Imported here: webdataset imports torch (a second), which download and prepare never need.
    import webdataset as wds

    handler = handler or wds.reraise_exception
    for source in _opened(src, handler):
        stream, url = source["stream"], source["url"]
        try:
            with _naming(url):
                yield from _group(tar_members(stream), url)
        except Exception as exn:
            if not isinstance(exn, ValueError):
                exn.args = exn.args + (url,)
            if not handler(exn):
                break
        finally:
            stream.close()


# Local shards are read through a 64 KiB buffer: members are a few KB (latents, small images), and
# through the default 4-8 KiB one each member past the buffer's size was a system call of its own
# (1.3x the members per second, BENCHMARKS.md).
READ_BUFFER = 1 << 16


def _opened(src: Iterable[dict], handler) -> Iterator[dict]:
    """``{"url": ...}`` -> ``{"url", "stream"}``: local paths opened here (buffered as above), URLs
    through webdataset's opener (pipes, curl, its handlers)."""
    import webdataset as wds

    for source in src:
        url = source["url"]
        if "://" in url or url.startswith("pipe:"):
            yield from wds.tariterators.url_opener([source], handler=handler)
            continue
        try:
            yield {**source, "stream": open(url.removeprefix("file:"), "rb", buffering=READ_BUFFER)}
        except Exception as exn:
            exn.args = exn.args + (url,)
            if not handler(exn):
                return


def shard_keys(path: str) -> list[str]:
    """The sample keys of a shard from its member headers only (the data is skipped, not read)."""
    keys = []
    with open(path, "rb") as f, _naming(path):
        for name, _ in tar_members(f, read_data=False):
            key = _split(name)[0]
            if key is not None and (not keys or keys[-1] != key):
                keys.append(key)
    return keys


class ShardError(ValueError):
    """A shard that cannot be read as written (truncated, a corrupt header, a sample that does not
    decode): the message starts with the shard's path or URL."""

    HINT = ("`python -m ldm_vae.verify`, run where the shard was made, finds every damaged file and says how "
            "to get it back")


@contextlib.contextmanager
def _naming(path) -> Iterator[None]:
    """A malformed shard's ValueError names the shard (a ShardError)."""
    try:
        yield
    except ShardError:
        raise
    except ValueError as e:
        raise ShardError(str(e) if str(path) in str(e) else f"{path}: {e}") from e


def tar_members(stream: BinaryIO, read_data: bool = True) -> Iterator[tuple[str, bytes | None]]:
    """(path, data) of every regular file of a tar stream, in order; data None if not ``read_data``
    (then the stream must be seekable).

    The stream is untrusted (the loader reads shards from URLs): any malformed header, pax
    record or long name, any member that runs past the end, and a stream without the
    end-of-archive block raise ValueError. A member is read only once the file is known to hold
    it (streams: in chunks as they arrive), so no header makes this allocate more than the input.
    This runs once per member of every shard the loader streams: keep the common path short.
    """
    src = _Source(stream)
    read = src.read
    override = None  # a pax or GNU long-name header's path for the next member
    while True:
        header = read(512, True)
        if header is None:
            raise ValueError("empty file: not a tar shard" if src.pos == 0
                             else "truncated tar: no end-of-archive block")
        if header == _ZERO_BLOCK:
            if override is not None:
                raise ValueError(f"truncated tar: a long-name header at byte {src.pos - 512} has no member")
            return
        if _octal(header[148:156], "checksum") != _header_sum(header):
            raise ValueError(f"corrupt tar header at byte {src.pos - 512} (checksum mismatch)")
        kind = header[156:157]
        size = _size(header)
        padded = (size + 511) & ~511
        if kind in (b"x", b"L"):  # a pax header (webdataset can write them) or a GNU long name
            if size > MAX_NAME_RECORD:
                raise ValueError(f"tar header at byte {src.pos - 512}: a {size}-byte long-name record")
            data = read(padded)[:size]
            override = _pax_path(data) if kind == b"x" else _name(data.split(b"\0", 1)[0])
            continue
        if kind in (b"0", b"\0"):  # a regular file
            name = override
            if name is None:
                name = _name(header[0:100].split(b"\0", 1)[0])
                if header[345]:  # a ustar prefix
                    prefix = _name(header[345:500].split(b"\0", 1)[0])
                    name = f"{prefix}/{name}"
            if not name or "\0" in name:
                raise ValueError(f"tar member name {name[:100]!r} is empty or holds a NUL")
            if read_data:
                data = read(padded)
                yield name, (data if size == padded else data[:size])
            else:
                yield name, src.skip(padded)
        elif read_data:
            read(padded)
        else:
            src.skip(padded)
        override = None


def _header_sum(header: bytes) -> int:
    """The checksum a tar header should hold: its bytes summed, the checksum field counted as
    spaces. adler32's low half is 1 + the byte sum mod 65521; 256 bytes sum to at most 65,280, so
    over each half it is exact, and two C calls cost a tenth of ``sum(header)`` (a third of the
    reader's time per member)."""
    total = (zlib.adler32(header[:256]) & 0xFFFF) + (zlib.adler32(header[256:]) & 0xFFFF) - 2
    return total - sum(header[148:156]) + 8 * 32


MAX_NAME_RECORD = 1 << 20  # pax and long-name records: a path, never megabytes
_CHUNK = 1 << 16


class _Source:
    """A tar stream with its position and, for files, its size: reads and skips never run past
    the end (ValueError), and never allocate more than the bytes that are there."""

    def __init__(self, stream: BinaryIO):
        self.stream, self.pos, self.size = stream, 0, None
        try:
            if stream.seekable():
                self.pos = stream.tell()
                self.size = os.fstat(stream.fileno()).st_size
        except (AttributeError, OSError, ValueError):
            self.size = None  # a BytesIO, a socket: read in chunks instead

    def _check(self, n: int) -> None:
        if self.size is not None and self.pos + n > self.size:
            raise ValueError(f"truncated tar: {n} bytes wanted at byte {self.pos}, the file has {self.size}")

    def read(self, n: int, final_ok: bool = False) -> bytes | None:
        """``n`` bytes, or None at a clean end of the stream when ``final_ok``."""
        if self.size is not None:  # a file: the common case, kept short (it runs per member)
            if self.pos + n <= self.size:
                data = self.stream.read(n)
                if len(data) == n:
                    self.pos += n
                    return data
                self.stream.seek(self.pos)  # the file shrank under us: the careful path below
            elif final_ok and self.pos == self.size:
                return None
        self._check(n)
        parts, got = [], 0
        while got < n:  # pipes and sockets return short reads
            # A stream's size is unknown: ask for no more than has arrived so far (64 KiB at first),
            # so a lying size field costs at most about twice the bytes that really came.
            part = self.stream.read(n - got if self.size is not None else min(n - got, max(_CHUNK, got)))
            if not part:
                if final_ok and got == 0:
                    return None
                raise ValueError(f"truncated tar: {n} bytes wanted at byte {self.pos}, got {got}")
            parts.append(part)
            got += len(part)
        self.pos += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def skip(self, n: int) -> None:
        self._check(n)
        self.stream.seek(n, os.SEEK_CUR)
        self.pos += n


_OCTAL = re.compile(rb" *([0-7]+)[ \0]*")


def _octal(field: bytes, what: str) -> int:
    """A tar numeric field: octal digits, optionally space-led, NUL/space-terminated; nothing else
    (int() alone would take '0o17', '1_0', '-1' or '+7'). A regex: this runs twice per member."""
    match = _OCTAL.fullmatch(field)
    if match is None:
        raise ValueError(f"corrupt tar header: {what} field {field!r} is not an octal number")
    return int(match.group(1), 8)


def _size(header: bytes) -> int:
    if header[124] == 0x80:  # base-256 (GNU: members over 8 GB), positive
        return int.from_bytes(header[125:136], "big")
    if header[124] & 0x80:
        raise ValueError(f"corrupt tar header: negative size field {header[124:136]!r}")
    return _octal(header[124:136], "size")


def _name(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"tar member name {raw[:100]!r} is not UTF-8") from None


def _pax_path(data: bytes) -> str | None:
    """The path of pax records b"<length> <key>=<value>\\n"...; a malformed record raises."""
    pos, path = 0, None
    while pos < len(data):
        space = data.find(b" ", pos, pos + 21)
        field = data[pos:space] if space > pos else b""
        length = int(field) if field.isdigit() else 0
        end = pos + length
        if length <= len(field) + 1 or end > len(data) or data[end - 1:end] != b"\n" or b"=" not in data[space:end]:
            raise ValueError(f"malformed pax record at offset {pos}: {data[pos:pos + 40]!r}")
        key, _, value = data[space + 1: end - 1].partition(b"=")
        if key == b"path":
            path = _name(value)
        pos = end
    return path


def _split(name: str) -> tuple[str | None, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name."""
    dot = name.find(".", name.rfind("/") + 1)
    return (None, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def _group(members: Iterable[tuple[str, bytes]], url: str) -> Iterator[dict]:
    """Consecutive members with one key -> one sample {"__key__", "__url__", ext: bytes, ...}."""
    sample = None
    for name, data in members:
        dot = name.find(".", name.rfind("/") + 1)  # _split, inlined: this runs per member
        if dot < 0:
            continue
        key, ext = name[:dot], name[dot + 1:].lower()
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        if ext in sample:
            raise ValueError(f"{url}: {name}: duplicate member in one sample (extensions differ only by case?)")
        sample[ext] = data
    if sample is not None:
        yield sample
