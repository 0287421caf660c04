import pytest

from ldm_vae.shards import ShardWriter, iter_samples, shard_paths


def sample(i):
    return {"__key__": f"k{i:03d}", "txt": f"caption {i}".encode()}


def test_writer_splits_into_complete_shards(tmp_path):
    with ShardWriter(tmp_path, "train", per_shard=4) as w:
        for i in range(10):
            w.write(sample(i))
    assert w.written == ["train-00000.tar", "train-00001.tar", "train-00002.tar"]
    keys = [s["__key__"] for s in iter_samples(shard_paths(tmp_path))]
    assert keys == [f"k{i:03d}" for i in range(10)]


def test_crash_mid_shard_leaves_only_complete_shards(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, "train", per_shard=4) as w:
            for i in range(6):
                w.write(sample(i))
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-00000.tar"]
    assert len(list(iter_samples(shard_paths(tmp_path)))) == 4


def test_shard_paths_ignores_temporaries(tmp_path):
    (tmp_path / ".train-00001.tar.tmp").write_bytes(b"partial")
    (tmp_path / "train-00000.tar").write_bytes(b"")
    assert [p.split("/")[-1] for p in shard_paths(tmp_path)] == ["train-00000.tar"]


def test_written_shards_are_standard_tars_that_tarfile_and_webdataset_read(tmp_path):
    import tarfile

    import webdataset as wds

    from ldm_vae.shards import iter_samples, shard_keys

    long_key = "x" * 150  # past ustar's 100-byte name field: carried by a pax header
    samples = [{"__key__": k, "png": b"\x89" * 700, "json": {"key": k}, "txt": "café", "cls": 3}
               for k in ("a", long_key, "b")]
    for run in ("one", "two"):
        with ShardWriter(tmp_path / run, "t", per_shard=10) as w:
            for s in samples:
                w.write(s)
    one, two = (tmp_path / run / "t-00000.tar" for run in ("one", "two"))
    assert one.read_bytes() == two.read_bytes()  # same samples, same bytes (mtime 0, owner 0)
    with tarfile.open(one) as tar:
        members = tar.getmembers()
        assert [m.name for m in members[:4]] == ["a.png", "a.json", "a.txt", "a.cls"]
        assert members[4].name == f"{long_key}.png" and all(m.mtime == 0 and m.mode == 0o444 for m in members)
        assert tar.extractfile(members[1]).read() == b'{"key": "a"}'
    got = list(wds.WebDataset([str(one)], shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in got] == ["a", long_key, "b"] and got[0]["txt"] == "café".encode()
    assert [s["__key__"] for s in iter_samples([str(one)])] == shard_keys(str(one)) == ["a", long_key, "b"]
    assert got[1]["cls"] == b"3" and got[2]["png"] == b"\x89" * 700


def test_reader_refuses_a_corrupt_header(tmp_path):
    with ShardWriter(tmp_path, "t", per_shard=10) as w:
        for i in range(3):
            w.write(sample(i))
    path = tmp_path / "t-00000.tar"
    data = bytearray(path.read_bytes())
    data[1024 + 124] ^= 0x01  # the second member's size field
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        list(iter_samples([str(path)]))
