"""Shards are untrusted (the loader reads them from URLs): every malformed variant of a real shard
either reads exactly like the original (or differs only in the member whose bytes were changed)
or raises ValueError naming the shard, quickly, without allocating more than the file holds."""

from __future__ import annotations

import io
import json
import random
import signal
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from ldm_vae.ingest.items import folder_key, safe_key, unique_key
from ldm_vae.shards import ShardWriter, check_key, iter_samples, shard_keys, tar_members

TIME_LIMIT_S = 5


def _writer_shard(folder: Path) -> Path:
    """The project's own writer: ustar members, one pax header for a long key."""
    with ShardWriter(folder, "own", 100) as w:
        for i in range(5):
            w.write({"__key__": f"k{i:03d}", "jpg": bytes(range(256)) * (i + 1), "json": {"i": i}})
        w.write({"__key__": "long-" + "x" * 120, "txt": "a caption"})
        w.write({"__key__": "dir/k9", "cls": 3})
    return folder / "own-00000.tar"


def _tarfile_shard(folder: Path, fmt: int, name: str) -> Path:
    """A shard as other tools write it (webdataset's TarWriter uses tarfile): GNU long names or pax."""
    path = folder / name
    with tarfile.open(path, "w", format=fmt) as tf:
        for key, ext, data in [("a", "png", b"\x89PNG" * 50), ("b" * 150, "txt", b"hello"), ("c", "cls", b"7")]:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("shards")
    return [_writer_shard(folder), _tarfile_shard(folder, tarfile.GNU_FORMAT, "gnu.tar"),
            _tarfile_shard(folder, tarfile.PAX_FORMAT, "pax.tar")]


def _read(data: bytes, tmp: Path, header_only: bool = False):
    """Read ``data`` as a shard file under a time limit and an allocation watch:
    (members or keys, or the ValueError)."""
    path = tmp / "variant.tar"
    path.write_bytes(data)

    def timeout(*_):
        raise TimeoutError("the reader did not finish in time (a loop?)")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT_S)
    tracemalloc.start()
    try:
        if header_only:
            result = shard_keys(str(path))
        else:
            with open(path, "rb") as f:
                result = list(tar_members(f))
    except ValueError as e:
        result = e
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak <= len(data) + 65536, f"reading a {len(data)}-byte variant allocated {peak} bytes"
    return result


def _spans(path: Path) -> list[tuple[int, int, int]]:
    """(first header byte, first data byte, end of data) of every member, from tarfile."""
    with tarfile.open(path) as tf:
        return [(m.offset, m.offset_data, m.offset_data + m.size) for m in tf.getmembers()]


def _end_of_archive(path: Path) -> int:
    """The byte after the first zero block: what follows may be cut or changed freely."""
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    last = members[-1]
    return last.offset_data + (last.size + 511) // 512 * 512 + 512


def _differs_only_at(result, original, index: int) -> bool:
    return (len(result) == len(original)
            and all(r == o for j, (r, o) in enumerate(zip(result, original)) if j != index))


def test_byte_flips_read_the_same_or_fail(shards, tmp_path):
    rng = random.Random(0)
    for path in shards:
        data = path.read_bytes()
        original = list(tar_members(open(path, "rb")))
        spans = _spans(path)
        end = _end_of_archive(path)
        outcomes = {"same": 0, "error": 0, "member": 0}
        headers = [range(start, first_data) for start, first_data, _ in spans]
        for n in range(300):
            # Half the flips in the header blocks (where structure lives), half anywhere.
            pos = rng.choice(rng.choice(headers)) if n % 2 else rng.randrange(len(data))
            variant = bytearray(data)
            variant[pos] ^= rng.randrange(1, 256)
            result = _read(bytes(variant), tmp_path)
            if isinstance(result, ValueError):
                assert pos < end, f"{path.name}: a flip at {pos}, after the archive's end, failed: {result}"
                outcomes["error"] += 1
            elif result == original:
                outcomes["same"] += 1
            else:
                # Tar has no checksum over data: a flipped data or long-name byte changes that member only.
                hit = [j for j, (start, _, stop) in enumerate(spans) if start <= pos < stop]
                assert hit and _differs_only_at(result, original, hit[0]), f"{path.name}: flip at {pos} misread"
                outcomes["member"] += 1
            keys = _read(bytes(variant), tmp_path, header_only=True)
            assert isinstance(keys, (list, ValueError))
        assert outcomes["error"] > 100 and outcomes["member"] > 0 and outcomes["same"] > 0, outcomes


def test_every_truncation_fails_until_the_end_block(shards, tmp_path):
    rng = random.Random(1)
    for path in shards:
        data = path.read_bytes()
        original = list(tar_members(open(path, "rb")))
        keys = shard_keys(str(path))
        end = _end_of_archive(path)
        cuts = set(range(0, len(data), 512)) | {rng.randrange(len(data)) for _ in range(60)} | {end - 1, end}
        for cut in sorted(cuts):
            result = _read(data[:cut], tmp_path)
            header_only = _read(data[:cut], tmp_path, header_only=True)
            if cut >= end:
                assert result == original and header_only == keys, f"{path.name} cut at {cut}"
            else:
                assert isinstance(result, ValueError), f"{path.name} cut at {cut} of {len(data)} read without error"
                assert isinstance(header_only, ValueError), f"{path.name} cut at {cut}: header-only reader passed"


def _with_field(data: bytes, header_at: int, start: int, value: bytes) -> bytes:
    """``data`` with bytes [start, start+len(value)) of the header at ``header_at`` replaced and
    the checksum made right again, so only the crafted field can be at fault."""
    out = bytearray(data)
    h = header_at
    out[h + start: h + start + len(value)] = value
    out[h + 148: h + 156] = b" " * 8
    out[h + 148: h + 156] = b"%06o\0 " % sum(out[h: h + 512])
    return bytes(out)


CRAFTED_SIZES = [
    b"0o17\0\0\0\0\0\0\0\0",
    b"1_0\0\0\0\0\0\0\0\0\0",
    b"-1\0\0\0\0\0\0\0\0\0\0",
    b"+7\0\0\0\0\0\0\0\0\0\0",
    b"0x1f\0\0\0\0\0\0\0\0",
    b"\0" * 12,
    b"  1 2\0\0\0\0\0\0\0",
    b"99999999999\0",
    b"77777777777\0",
    b"\xff" * 12,
    b"\x80" + b"\xff" * 11,
]


def test_crafted_size_fields_fail(shards, tmp_path):
    for path in shards:
        data = path.read_bytes()
        starts = sorted({s for s, _, _ in _spans(path)} | {0})
        for header_at in starts:
            for value in CRAFTED_SIZES:
                variant = _with_field(data, header_at, 124, value)
                for header_only in (False, True):
                    result = _read(variant, tmp_path, header_only=header_only)
                    assert isinstance(result, ValueError), f"{path.name} size {value!r} at {header_at}: {result!r}"


def _pax_variant(record: bytes) -> bytes:
    """A one-member shard whose pax header holds ``record``."""
    out = io.BytesIO()
    head = bytearray(512)
    head[0:14] = b"././@PaxHeader"
    head[100:108], head[108:116], head[116:124], head[136:148] = (
        b"0000644\0",
        b"0000000\0",
        b"0000000\0",
        b"0" * 11 + b"\0",
    )
    head[124:136] = b"%011o\0" % len(record)
    head[156:157], head[257:265] = b"x", b"ustar\x0000"
    head[148:156] = b" " * 8
    head[148:156] = b"%06o\0 " % sum(head)
    out.write(bytes(head) + record + bytes(-len(record) % 512))
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        info = tarfile.TarInfo("short.txt")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    return out.getvalue()


@pytest.mark.parametrize("record", [
    b"0 path=x\n", b"1 path=x\n", b"5 path=long.txt\n", b"99999 path=x.txt\n", b"abc path=x.txt\n",
    b"15 pathx.txt0000\n", b"16 path=x.txt0000", b" 12 path=x\n", b"12path=x.txt\n", b"-5 path=x\n",
    b"13 path=\xff\xfe.txt\n", b"17 path=a\x00b.txt\n",
])
def test_crafted_pax_records_fail(record, tmp_path):
    result = _read(_pax_variant(record), tmp_path)
    assert isinstance(result, ValueError), f"{record!r}: {result!r}"


def test_a_good_pax_record_still_names_the_member(tmp_path):
    record = b"20 path=renamed.txt\n"
    assert _read(_pax_variant(record), tmp_path) == [("renamed.txt", b"abc")]


def test_crafted_long_names_fail(shards, tmp_path):
    gnu = shards[1]
    data = gnu.read_bytes()
    long_at = next(s for s, d, _ in _spans(gnu) if d - s > 512)  # the member behind a GNU long name
    for size in (b"%011o\0" % (1 << 30), b"%011o\0" % 0, b"%011o\0" % 10**6):
        result = _read(_with_field(data, long_at, 124, size), tmp_path)
        assert isinstance(result, ValueError), f"long-name size {size!r}: {result!r}"


@pytest.mark.parametrize("data", [b"", b"\0" * 100, b"not a tar at all" * 64, bytes(random.Random(3).randbytes(4096))])
def test_empty_or_garbage_files_fail(data, tmp_path):
    for header_only in (False, True):
        result = _read(data, tmp_path, header_only=header_only)
        assert isinstance(result, ValueError), f"{data[:20]!r}: {result!r}"


def test_errors_name_the_shard(shards, tmp_path):
    bad = tmp_path / "cut-00000.tar"
    bad.write_bytes(shards[0].read_bytes()[:1500])
    with pytest.raises(ValueError, match="cut-00000.tar"):
        list(iter_samples([str(bad)]))
    with pytest.raises(ValueError, match="cut-00000.tar"):
        shard_keys(str(bad))


def test_a_stream_with_a_lying_size_stops_at_its_end(shards):
    """A pipe or socket cannot be measured first: the reader takes what arrives, in chunks."""

    class Pipe(io.RawIOBase):
        def __init__(self, data):
            self.data = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, b):
            n = self.data.readinto(memoryview(b)[:4096])  # short reads, as a socket gives
            return n

    data = _with_field(shards[0].read_bytes(), 0, 124, b"\x80" + (1 << 62).to_bytes(11, "big"))
    tracemalloc.start()
    with pytest.raises(ValueError, match="truncated"):
        list(tar_members(Pipe(data)))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak <= 3 * len(data) + 2 * 65536  # what arrived, a chunk, and their join


def test_the_loader_rejects_a_truncated_shard_by_name(shards, tmp_path):
    from ldm_vae.shards import tar_samples

    bad = tmp_path / "short-00000.tar"
    bad.write_bytes(shards[0].read_bytes()[:3000])
    with pytest.raises(ValueError, match="short-00000.tar"):
        list(tar_samples([{"url": str(bad)}]))


# --- the writer refuses what readers would misread --------------------------------------------

@pytest.mark.parametrize(
    "key", ["a.b", "img.final", "a\0b", "a\nb", "/a", "a/", "a//b", "../up", "a\\b", "", "x" * 1001]
)
def test_writer_refuses_keys_readers_would_misread(key, tmp_path):
    with pytest.raises(ValueError, match="sample key"):
        with ShardWriter(tmp_path, "w", 10) as w:
            w.write({"__key__": key, "txt": "x"})
    assert not list(tmp_path.glob("*.tar")) and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("exts", [{"jpg": b"1", "JPG": b"2"}, {"": b"1"}, {"a/b": b"1"}, {".jpg": b"1"}, {"j\0": b"1"}])
def test_writer_refuses_bad_extensions(exts, tmp_path):
    with pytest.raises(ValueError, match="sample key 'k'"):
        ShardWriter(tmp_path, "w", 10).write({"__key__": "k", **exts})


def test_keys_that_pass_the_writer_read_back_unchanged(tmp_path):
    keys = ["a", "dir/sub/k-1_2", "ünï-cödé", "x" * 300, "a b"]
    with ShardWriter(tmp_path, "ok", 100) as w:
        for k in keys:
            w.write({"__key__": k, "seg.png": b"1", "txt": "t"})
    samples = list(iter_samples([str(tmp_path / "ok-00000.tar")]))
    assert [s["__key__"] for s in samples] == keys
    assert all(set(s) == {"__key__", "__url__", "seg.png", "txt"} for s in samples)


def _random_text(rng: random.Random) -> str:
    alphabet = "ab./\\\0\n _-:%[]+*?~#ü字\t" + "".join(map(chr, range(0x20, 0x7f)))
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))


def test_every_derived_key_is_safe():
    """Folder paths, URL-list key columns and hf split names: whatever the text, the key the
    project derives passes the writer, and different inputs keep different keys."""
    rng = random.Random(7)
    seen: dict[str, str] = {}
    for _ in range(3000):
        text = _random_text(rng)
        for key in (folder_key(text), safe_key(text), f"{safe_key(text)}-{rng.randrange(10**8):08d}"):
            assert check_key(key) == key
        raw = text or "empty"
        unique = unique_key(folder_key(raw), raw, seen)
        assert check_key(unique) == unique and seen[unique] == raw


def test_url_list_keys_are_safe_and_distinct(tmp_path):
    from ldm_vae.ingest.urls import read_url_list

    raw = ["a.b", "a b", "a_b", "a.b", "../etc/passwd", "x\0y", "img.001.jpg", "img.002.jpg"]
    listing = tmp_path / "list.jsonl"
    listing.write_text("".join(json.dumps({"url": f"http://h/{i}", "key": k}) + "\n" for i, k in enumerate(raw)))
    rows = read_url_list(listing)
    keys = [r.key for r in rows]
    assert all(check_key(k) == k for k in keys)
    assert keys[0] == keys[3]  # the same key twice stays one key: plan_urls rejects the second
    assert len(set(keys)) == len(raw) - 1
