import random

import numpy as np
import pytest
from PIL import Image

from conftest import image_bytes, photo
from ldm_vae.images import ALPHA_BACKGROUND, ImageRejected, crop_resize, load_rgb, square_crops

CAP = 10_000_000


def test_rgb_png_and_jpeg_decode():
    for fmt in ("PNG", "JPEG"):
        img = load_rgb(image_bytes(photo(), fmt), CAP)
        assert img.mode == "RGB" and img.size == (96, 80)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA"])
def test_modes_become_rgb(mode):
    src = photo().convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = load_rgb(image_bytes(src, fmt), CAP)
    assert out.mode == "RGB" and out.size == src.size


def test_alpha_is_composited_on_documented_background():
    src = Image.new("RGBA", (40, 40), (10, 20, 30, 0))  # fully transparent
    out = np.asarray(load_rgb(image_bytes(src), CAP))
    assert (out == np.array(ALPHA_BACKGROUND)).all()


def test_palette_transparency_is_composited():
    src = Image.new("P", (40, 40), 0)
    src.putpalette([0, 0, 0] * 256)
    out = np.asarray(load_rgb(image_bytes(src, transparency=0), CAP))
    assert (out == np.array(ALPHA_BACKGROUND)).all()


def test_16bit_grey_uses_full_range():
    arr = np.full((40, 40), 65535, dtype=np.uint16)
    arr[:, :20] = 32768
    src = Image.fromarray(arr)
    out = np.asarray(load_rgb(image_bytes(src), CAP))
    assert out[0, 30, 0] == 255 and 126 <= out[0, 5, 0] <= 129


def test_exif_orientation_is_applied():
    src = photo(96, 48)
    exif = src.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    out = load_rgb(image_bytes(src, "JPEG", exif=exif), CAP)
    assert out.size == (48, 96)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"this is not an image", "not_an_image"),
        (image_bytes(photo(), "JPEG")[:-600], "truncated"),
        (image_bytes(photo(), "PNG")[:-300], "truncated"),
    ],
)
def test_bad_bytes_are_rejected_with_reason(data, reason):
    with pytest.raises(ImageRejected) as e:
        load_rgb(data, CAP)
    assert e.value.reason == reason


def test_pixel_cap_and_min_size():
    with pytest.raises(ImageRejected) as e:
        load_rgb(image_bytes(photo(96, 80)), max_pixels=96 * 80 - 1)
    assert e.value.reason == "too_many_pixels"
    with pytest.raises(ImageRejected) as e:
        load_rgb(image_bytes(photo(96, 20)), CAP, min_size=32)
    assert e.value.reason == "too_small"


def test_crops_are_deterministic_inside_and_multiscale():
    a = square_crops((300, 200), 20, 0.2, random.Random(1))
    b = square_crops((300, 200), 20, 0.2, random.Random(1))
    assert a == b and len(a) == 20
    assert a[0] == (50, 0, 250, 200)  # the centre crop comes first
    sides = [r - l for l, t, r, b_ in a]
    assert all(r - l == b_ - t for l, t, r, b_ in a)
    assert all(0 <= l and r <= 300 and 0 <= t and b_ <= 200 for l, t, r, b_ in a)
    assert min(sides) < 100 < max(sides)  # several scales, not one
    assert crop_resize(photo(300, 200), a[3], 32).size == (32, 32)
