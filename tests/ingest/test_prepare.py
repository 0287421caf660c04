import json

import numpy as np
import pytest

from ldm_vae.images import decode_uint8
from ldm_vae.ingest.download import run_download
from ldm_vae.ingest.prepare import run_prepare, split_keys
from ldm_vae.samples import image_bytes
from ldm_vae.shards import iter_samples, shard_paths

from helpers.common import make_params


def test_split_is_deterministic_stable_and_never_empty():
    keys = [f"img{i}" for i in range(200)]
    a = split_keys(keys, 0.2, seed=0)
    assert a == split_keys(list(reversed(keys)), 0.2, seed=0)
    assert 20 < sum(v == "val" for v in a.values()) < 60
    # Adding images never moves an existing one to the other split.
    b = split_keys(keys + [f"new{i}" for i in range(50)], 0.2, seed=0)
    assert all(b[k] == a[k] for k in keys)
    assert set(split_keys(["a", "b"], 0.01, 0).values()) == {"train", "val"}


@pytest.fixture
def prepared(tmp_path, photo_folder):
    params = make_params(data={"source": f"folder:{photo_folder}"})
    run_download(params.data, tmp_path / "raw")
    counts = run_prepare(params.data, tmp_path / "raw", tmp_path / "prepared")
    return params, tmp_path / "prepared", counts


def test_prepared_shards_hold_rgb_crops_and_metadata(prepared):
    params, out, counts = prepared
    samples = {s: list(iter_samples(shard_paths(out / s))) for s in ("train", "val")}
    assert counts["train"]["samples"] == 3 * counts["train"]["images"]
    assert counts["val"]["samples"] == 2 * counts["val"]["images"]
    for split, rows in samples.items():
        assert len(rows) == counts[split]["samples"]
        for s in rows:
            arr = decode_uint8(image_bytes(s))
            assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8
            meta = json.loads(s["json"])
            assert meta["key"] == s["__key__"] and s["__key__"].startswith(meta["raw_key"] + "-c")
            assert meta["resolution"] == 32 and len(meta["crop_box"]) == 4
    train_photos = {json.loads(s["json"])["raw_key"] for s in samples["train"]}
    val_photos = {json.loads(s["json"])["raw_key"] for s in samples["val"]}
    assert val_photos and train_photos and not (train_photos & val_photos)
    # Five samples per shard: several shards, each complete.
    assert counts["train"]["shards"] == len(shard_paths(out / "train")) > 1


def test_prepare_is_deterministic(prepared, tmp_path):
    params, out, _ = prepared
    run_prepare(params.data, tmp_path / "raw", tmp_path / "again")
    for split in ("train", "val"):
        a = [p.split("/")[-1] for p in shard_paths(out / split)]
        assert a == [p.split("/")[-1] for p in shard_paths(tmp_path / "again" / split)]
        for name in a:
            assert (out / split / name).read_bytes() == (tmp_path / "again" / split / name).read_bytes()
