"""Aspect-ratio buckets: the generated sets against SDXL's published ones, the nearest bucket,
crops whose recorded SDXL size fields re-make the stored pixels exactly, no-upscale, the
minimum side, and the params' refusals."""

import json
import random

import numpy as np
import pytest

from ldm_vae.buckets import (
    bucket_crop,
    bucket_set,
    cover_size,
    cut,
    make_buckets,
    nearest_bucket,
    shrink_to_fit,
    square_sizes,
)
from ldm_vae.config import ParamError
from ldm_vae.images import decode_uint8, encode_image
from ldm_vae.ingest.prepare import crop_samples
from ldm_vae.samples import PREPARED, image_bytes

from helpers.common import make_params, photo

# SDXL's multi-aspect training buckets at 1024² (the SDXL report, appendix), as (width, height).
SDXL = {(512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
        (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
        (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
        (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1344, 704), (1408, 704), (1472, 704),
        (1536, 640), (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512),
        (2048, 512)}


def test_the_generated_sdxl_set_is_sdxls_own_buckets():
    buckets = make_buckets(1024, 64, 4.0)
    assert set(buckets) <= SDXL  # every one is a bucket SDXL trained on
    assert len(buckets) == 33 and len(set(buckets)) == 33
    # Worked by hand: width 640 -> 1024² / 640 = 1638.4 -> 1600; 896 -> 1170.3 -> 1152; 576 -> 1820.4 -> 1792.
    assert {(640, 1600), (896, 1152), (576, 1792), (1024, 1024), (512, 2048), (2048, 512)} <= set(buckets)
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and 0.9 * 1024**2 <= w * h <= 1024**2
        assert (h, w) in buckets  # both orientations
    assert [b[0] / b[1] for b in buckets] == sorted(b[0] / b[1] for b in buckets)


def test_ratio_step_and_minimum_side_limit_the_set():
    assert make_buckets(64, 8, 2.0) == [(48, 80), (56, 72), (64, 64), (72, 56), (80, 48)]
    assert make_buckets(64, 16, 2.0) == [(48, 80), (64, 64), (80, 48)]
    assert make_buckets(64, 8, 2.0, min_side=56) == [(56, 72), (64, 64), (72, 56)]
    assert make_buckets(1024, 64, 2.0) == [b for b in make_buckets(1024, 64, 4.0) if max(b) / min(b) <= 2.0]
    assert bucket_set(make_params(data={"buckets": ["64x96", "96x64", "64x96"]}).data) == [(64, 96), (96, 64)]


def test_nearest_bucket_by_aspect_ratio():
    sdxl = make_buckets(1024, 64, 4.0)
    assert nearest_bucket((1920, 1080), sdxl) == (1344, 768)  # 16:9 (1.778): 1344/768 = 1.75
    assert nearest_bucket((1080, 1920), sdxl) == (768, 1344)
    assert nearest_bucket((1600, 1200), sdxl) == (1152, 896)  # 4:3: 1.286 beats 1.462 in log ratio
    assert nearest_bucket((3000, 3000), sdxl) == (1024, 1024)
    assert nearest_bucket((10000, 100), sdxl) == (2048, 512)  # beyond the range: the widest


@pytest.mark.parametrize("how", ["center", "random"])
def test_the_recorded_size_fields_remake_the_stored_crop_exactly(how):
    cfg = make_params(data={"crop": "bucket", "crops_per_image": 1, "val_crops_per_image": 1, "resolution": 64,
                            "bucket_step": 8, "bucket_max_ratio": 2.0, "bucket_crop": how},
                      train={"crop_size": 32}, probe={"widths": [8]}).data  # odd latent sides: a flat probe
    rng = random.Random(0)
    for i, size in enumerate([(96, 48), (48, 96), (64, 64), (200, 61), (61, 200), (77, 65), (300, 290), (50, 40)]):
        img = photo(*size, seed=i)
        crop, box, sizes = bucket_crop(img, cfg, bucket_set(cfg), rng)
        h, w = sizes["target_size"]
        assert crop.size == (w, h) == nearest_bucket(size, bucket_set(cfg))
        assert sizes["original_size"] == [size[1], size[0]]
        # From the three fields alone: resize to cover the target, cut at crop_top_left.
        remade = cut(img, (w, h), tuple(sizes["crop_top_left"]))
        assert np.array_equal(np.asarray(remade), np.asarray(crop))
        rw, rh = cover_size(size, (w, h))
        top, left = sizes["crop_top_left"]
        assert (rw == w or rh == h) and 0 <= top <= rh - h and 0 <= left <= rw - w  # covers, cuts one side only
        assert 0 <= box[0] < box[2] <= size[0] and 0 <= box[1] < box[3] <= size[1]
        if how == "center":
            assert (top, left) == ((rh - h) // 2, (rw - w) // 2)


def test_prepare_writes_the_bucket_and_fields_that_remake_it(tmp_path):
    cfg = make_params(data={"crop": "bucket", "crops_per_image": 1, "val_crops_per_image": 1, "bucket_step": 16,
                            "bucket_max_ratio": 2.0, "resolution": 64, "bucket_crop": "random"},
                      train={"crop_size": 32}).data
    raw = encode_image(photo(150, 70, seed=3), "png")
    row = {"key": "wide", "source": "a.png", "caption": "a wide photo"}
    [(sample, bucket)] = crop_samples(cfg, row, raw, 1)
    meta = PREPARED.get(sample, "meta")
    assert bucket == "80x48" and meta["target_size"] == [48, 80] and meta["original_size"] == [70, 150]
    stored = decode_uint8(image_bytes(sample))
    assert stored.shape == (48, 80, 3)
    from ldm_vae.images import load_rgb

    remade = np.asarray(cut(load_rgb(raw, cfg.max_pixels), (80, 48), tuple(meta["crop_top_left"])))
    assert np.array_equal(remade, stored)
    assert json.loads(sample["json"])["caption"] == "a wide photo"


def test_square_crops_record_the_sizes_sdxl_would_see():
    assert square_sizes(500, 375, (62, 0, 437, 375), 64) == {
        "original_size": [375, 500], "crop_top_left": [0, 11], "target_size": [64, 64]}  # 62 * 64 / 375 = 10.6
    cfg = make_params(data={"crop": "multiscale", "resolution": 32}).data
    samples = crop_samples(cfg, {"key": "p", "source": "p.png"}, encode_image(photo(96, 80), "png"), 3)
    for sample, bucket in samples:
        meta = PREPARED.get(sample, "meta")
        assert bucket is None and meta["target_size"] == [32, 32] and meta["original_size"] == [80, 96]


def test_without_upscaling_a_small_image_gets_a_smaller_bucket():
    assert shrink_to_fit((1000, 800), (64, 64), 8, 0) == (64, 64)  # large enough: the bucket itself
    assert shrink_to_fit((50, 40), (64, 64), 8, 0) == (40, 40)  # scaled to fit, floored to the step
    assert shrink_to_fit((50, 20), (80, 48), 8, 24) == (32, 24)  # the minimum side wins (then it is enlarged)
    cfg = make_params(data={"crop": "bucket", "crops_per_image": 1, "val_crops_per_image": 1, "bucket_step": 8,
                            "bucket_max_ratio": 2.0, "resolution": 64, "bucket_upscale": False},
                      train={"crop_size": 8}, probe={"widths": [8]}).data
    for size in [(50, 40), (41, 33), (70, 36)]:
        crop, _, sizes = bucket_crop(photo(*size), cfg, bucket_set(cfg), random.Random(0))
        assert crop.width <= size[0] and crop.height <= size[1]  # never enlarged
        assert cover_size(size, crop.size)[0] <= size[0] and crop.width % 8 == 0 and crop.height % 8 == 0


@pytest.mark.parametrize("data,train,words", [
    ({"crop": "bucket"}, {}, ["data.crop: 'bucket' takes one crop per image", "data.crops_per_image"]),
    ({"buckets": ["64x60"]}, {}, ["data.buckets: '64x60'", "multiple of 8"]),
    ({"buckets": ["wide"]}, {}, ["data.buckets: 'wide'", "WIDTHxHEIGHT"]),
    ({"bucket_step": 12}, {}, ["data.bucket_step: 12", "multiple of 8"]),
    ({"bucket_crop": "top"}, {}, ["data.bucket_crop: 'top'", "center, random"]),
    ({"bucket_max_ratio": 0.5}, {}, ["data.bucket_max_ratio: 0.5", ">= 1.0"]),
    ({"crop": "bucket", "crops_per_image": 1, "val_crops_per_image": 1, "resolution": 64, "bucket_step": 64,
      "bucket_min_side": 128}, {}, ["data.bucket_*: no bucket"]),
    ({"crop": "bucket", "crops_per_image": 1, "val_crops_per_image": 1, "resolution": 64, "bucket_step": 16,
      "bucket_max_ratio": 2.0}, {"crop_size": 64}, ["train.crop_size: 64", "smallest bucket side (48)"]),
    ({"crop": "bucket", "crops_per_image": 1, "val_crops_per_image": 1, "resolution": 64, "bucket_step": 16},
     {"crop_size": 0}, ["train.crop_size: 0", "differ in shape"]),
])
def test_bucket_params_are_refused_naming_the_key(data, train, words):
    with pytest.raises(ParamError) as e:
        make_params(data=data, train=train)
    for w in words:
        assert w in str(e.value)
