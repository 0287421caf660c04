import pytest

from ldm_vae.files import atomic_path, atomic_write


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_folder_replaces_the_old_one_whole(tmp_path):
    target = tmp_path / "vae"
    (target).mkdir()
    (target / "stale.bin").write_bytes(b"x")
    (tmp_path / ".vae.tmp").mkdir()  # left by a killed run
    (tmp_path / ".vae.tmp" / "junk").write_bytes(b"y")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]


def test_a_rename_never_writes_through_a_hard_link(tmp_path):
    """DVC's cache hard-links outputs: replacing must leave the cached copy untouched."""
    import os

    target, cached = tmp_path / "out.json", tmp_path / "cache"
    atomic_write(target, "v1")
    os.link(target, cached)
    atomic_write(target, "v2")
    assert cached.read_text() == "v1" and target.read_text() == "v2"
