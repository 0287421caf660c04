"""The three shard kinds' schemas (ldm_vae/samples.py): each round-trips through a real tar shard,
refuses what does not fit, matches what the stages really write, and is what the design notes show."""

from pathlib import Path

import numpy as np
import pytest
import torch

from ldm_vae.encode.latents import latent_sample
from ldm_vae.ingest.download import run_download
from ldm_vae.ingest.prepare import run_prepare
from ldm_vae.loader import latent_dataset
from ldm_vae.samples import KINDS, LATENT, PREPARED, RAW
from ldm_vae.shards import ShardWriter, iter_samples, shard_paths

from helpers.common import ROOT, image_bytes, make_params, photo


def _meta(key, **extra):
    return {"key": key, "raw_key": "photo", "source": "a/b.jpg", "width": 500, "height": 375,
            "crop_box": [62, 0, 437, 375], "resolution": 64, "original_size": [375, 500], "crop_top_left": [0, 11],
            "target_size": [64, 64], **extra}


def _arrays(rng, flip: bool):
    names = ("mean", "std", "mean_flip", "std_flip") if flip else ("mean", "std")
    return {n: rng.standard_normal((4, 8, 8)).astype(np.float16) for n in names}


def _examples():
    rng = np.random.default_rng(0)
    png, jpg = image_bytes(photo(64, 64)), image_bytes(photo(64, 64), "JPEG")
    yield RAW, "r1", "jpg", {"image": jpg}
    yield RAW, "r2", "png", {"image": png}
    yield PREPARED, "p1", "png", {"image": png, "meta": _meta("p1")}
    yield PREPARED, "p2", "jpg", {"image": jpg, "meta": _meta("p2", caption="a café", label=7),
                                  "caption": "a café", "label": 7}
    yield PREPARED, "p3", "png", {"image": png, "meta": _meta("p3", label="n01440764"), "label": "n01440764"}
    yield LATENT, "l1", None, {**_arrays(rng, False), "meta": {**_meta("l1"), "latent_shape": [4, 8, 8]}}
    yield LATENT, "l2", None, {**_arrays(rng, True), "meta": {**_meta("l2", label=3), "latent_shape": [4, 8, 8]},
                               "caption": "two\nlines", "label": 3}


def _equal(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    return a == b and type(a) is type(b)


def test_every_kind_round_trips_through_a_real_shard(tmp_path):
    examples = list(_examples())
    with ShardWriter(tmp_path, "s", 100) as w:
        for kind, key, fmt, values in examples:
            w.write(kind.build(key, fmt=fmt, **values))
    got = {s["__key__"]: s for s in iter_samples(shard_paths(tmp_path))}
    assert {kind.name for kind, *_ in examples} == {k.name for k in KINDS}
    for kind, key, fmt, values in examples:
        read = kind.read(got[key])
        assert set(read) == set(values), key
        assert all(_equal(read[n], v) for n, v in values.items()), key
        if fmt:
            assert f"{fmt}" in got[key]  # the image member carries its format


@pytest.mark.parametrize("kind, key, values, fmt, what", [
    (RAW, "r", {}, "jpg", "missing fields ['image']"),
    (RAW, "r", {"image": b"x"}, "heic", "image format 'heic'"),
    (RAW, "r", {"image": "not bytes"}, "jpg", "must be image"),
    (PREPARED, "p", {"image": b"x", "meta": _meta("p"), "mask": b""}, "png", "unknown fields ['mask']"),
    (PREPARED, "p", {"image": b"x", "meta": {"key": "p"}}, "png", "missing ['crop_box', 'crop_top_left', 'height'"),
    (PREPARED, "p", {"image": b"x", "meta": {**_meta("p"), "width": "500"}}, "png", "wrong type ['width']"),
    (PREPARED, "p", {"image": b"x", "meta": {**_meta("p"), "crop": "adm"}}, "png", "unknown fields ['crop']"),
    (PREPARED, "p", {"image": b"x", "meta": _meta("p"), "label": True}, "png", "field label must be label"),
    (LATENT, "l", {"mean": np.zeros((4, 8, 8), np.float32), "std": np.zeros((4, 8, 8), np.float16),
                   "meta": {**_meta("l"), "latent_shape": [4, 8, 8]}}, None, "mean must be npy, got ndarray float32"),
    (LATENT, "l", {"mean": np.zeros((8, 8), np.float16), "std": np.zeros((4, 8, 8), np.float16),
                   "meta": {**_meta("l"), "latent_shape": [4, 8, 8]}}, None, "(8, 8)"),
    (LATENT, "l", {"mean": np.zeros((4, 8, 8), np.float16), "std": np.zeros((4, 8, 8), np.float16),
                   "meta": _meta("l")}, None, "missing ['latent_shape']"),
])
def test_a_sample_that_does_not_fit_its_kind_is_refused_naming_the_field(kind, key, values, fmt, what):
    with pytest.raises(ValueError) as e:
        kind.build(key, fmt=fmt, **values)
    assert what in str(e.value) and repr(key) in str(e.value)


def test_reading_names_a_missing_member_and_refuses_an_unknown_one():
    with pytest.raises(KeyError, match=r"latent sample 'k' has no std \(member \.std\.npy\)"):
        LATENT.get({"__key__": "k", "mean.npy": b""}, "std")
    assert LATENT.get({"__key__": "k"}, "caption", "") == ""
    with pytest.raises(ValueError, match=r"unknown members \['exr'\]"):
        PREPARED.read({"__key__": "k", "png": b"", "json": b"{}", "exr": b""})


def test_what_download_prepare_and_encode_write_is_exactly_their_kind(tmp_path, photo_folder):
    params = make_params(data={"source": f"folder:{photo_folder}"})
    run_download(params.data, tmp_path / "raw")
    run_prepare(params.data, tmp_path / "raw", tmp_path / "prepared")
    raws = list(iter_samples(shard_paths(tmp_path / "raw" / "shards")))
    assert raws and all(set(RAW.read(s)) == {"image"} for s in raws)
    prepared = [s for split in ("train", "val") for s in iter_samples(shard_paths(tmp_path / "prepared" / split))]
    assert prepared
    for s in prepared:
        fields = PREPARED.read(s)
        assert fields["meta"]["key"] == s["__key__"] and len(fields["meta"]["crop_box"]) == 4
    # The latent writer's own sample function, on a real prepared sample: the json carried over.
    mean = torch.randn(2, 4, 8, 8).to(torch.float16)
    latent = latent_sample(prepared[0], {"": {"mean": mean[0].numpy(), "std": mean[1].numpy()}}, [4, 8, 8])
    back = LATENT.read(next(iter_samples([_one_shard(tmp_path / "lat", latent)])))
    assert back["meta"] == {**PREPARED.get(prepared[0], "meta"), "latent_shape": [4, 8, 8]}
    assert np.array_equal(back["mean"], mean[0].numpy()) and "tokens" not in back
    tokens = np.arange(16, dtype=np.uint16).reshape(4, 4)  # a VQ latent: tokens, no mean or std
    vq = latent_sample(prepared[0], {"": {"tokens": tokens}}, [4, 4, 4])
    back = LATENT.read(next(iter_samples([_one_shard(tmp_path / "vq", vq)])))
    assert back["tokens"].dtype == np.uint16 and np.array_equal(back["tokens"], tokens) and "mean" not in back


def _one_shard(folder: Path, sample: dict) -> str:
    with ShardWriter(folder, "x", 10) as w:
        w.write(sample)
    return str(folder / w.written[0])


def test_the_loader_refuses_a_text_label_naming_the_sample(tmp_path):
    rng = np.random.default_rng(0)
    meta = {**_meta("k"), "label": "tabby", "latent_shape": [4, 8, 8]}
    shard = _one_shard(tmp_path, LATENT.build("k", **_arrays(rng, False), meta=meta, label="tabby"))
    ds = latent_dataset([shard], normalize="none", shuffle=0, counts={Path(shard).name: 1})
    with pytest.raises(ValueError, match=r"'k': label 'tabby' is text"):
        next(iter(ds))


def test_the_design_notes_show_each_kind_as_defined():
    design = (ROOT / "docs" / "design.md").read_text()
    for kind in KINDS:
        assert kind.describe() in design, f"docs/design.md: the {kind.name} tables differ from ldm_vae/samples.py"


def test_batched_cuts_at_the_size_and_where_the_key_changes():
    from ldm_vae.samples import batched

    assert list(batched(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(batched([], 3)) == []
    shapes = ["a", "a", "b", "b", "b", "b", "a"]
    got = list(batched(range(7), 3, key=lambda i: shapes[i]))
    assert got == [[0, 1], [2, 3, 4], [5], [6]]  # one key a batch, never above the size
