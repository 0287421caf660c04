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
