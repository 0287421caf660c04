"""Decoding untrusted image bytes into clean RGB, and the crops that prepare takes from them.

Everything that reads an image goes through :func:`load_rgb` (or, for download's verdict,
:func:`check_image`: the same steps and rejections, a JPEG decoded at reduced size), so the pixel
cap, the full decode (truncated files fail here, not in a training worker), EXIF orientation and
the mode conversion are the same for every source and every stage.
"""

from __future__ import annotations

import io
import math
import os
import random
import re
import warnings
from typing import TYPE_CHECKING

from PIL import Image, ImageOps

if TYPE_CHECKING:  # numpy is imported where it is used: download's workers never need it
    import numpy as np

# Alpha is composited on white: the convention of most photo tools, and what a viewer shows.
ALPHA_BACKGROUND = (255, 255, 255)
# The formats the project reads (sources.IMAGE_EXTENSIONS): no other PIL plugin ever parses
# untrusted bytes (a camera's multi-picture JPEG opens through JPEG, as format MPO).
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
ROWS_PER_BLOCK = 256  # 16-bit to 8-bit conversion in row blocks: memory stays near the image's own

# PIL hands each decoded image's memory back to the OS and maps it afresh for the next one (page
# faults on every image); keeping a few blocks (16 MB at most each) made a worker's decoding
# steady from its first image: the first 5,000-image unit of a process took 9.6-10 s, the
# others 6.1-7.6 s (bench/scale.py, BENCHMARKS.md). PILLOW_BLOCKS_MAX, when set, wins.
if not os.environ.get("PILLOW_BLOCKS_MAX"):
    Image.core.set_blocks_max(4)


class ImageRejected(Exception):
    """An input that is not a usable image; ``reason`` is a short, stable tag for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def load_rgb(data: bytes, max_pixels: int, min_size: int = 1) -> Image.Image:
    """Decode ``data`` fully into an RGB image with EXIF orientation applied.

    Raises ImageRejected with reason ``empty``, ``not_an_image``, ``too_many_pixels``,
    ``truncated``, ``bad_exif`` or ``too_small``.
    """
    img = _open(data, max_pixels)
    _decode(img)
    _turn(img)
    img = to_rgb(img)
    if min(img.size) < min_size:
        raise ImageRejected("too_small", f"{img.size[0]}x{img.size[1]} < {min_size}")
    return img


def check_image(data: bytes, max_pixels: int, min_size: int = 1) -> tuple[int, int]:
    """What download needs of an image: (width, height) after EXIF orientation, with exactly
    :func:`load_rgb`'s rejections, at less cost. A JPEG decodes in its reduced-size (DCT-scaled)
    mode: libjpeg still entropy-decodes every block, so a truncated or corrupt stream fails as in a
    full decode, but the inverse DCT, upsampling and colour conversion run on 1/64 of the pixels.
    No conversion to RGB either (prepare's decode does that): 0.53 ms instead of 0.76 ms for a
    500x375 JPEG (BENCHMARKS.md)."""
    img = _open(data, max_pixels)
    w, h = img.size
    if img.format in ("JPEG", "MPO"):
        img.draft(img.mode, ((w + 7) // 8, (h + 7) // 8))
    _decode(img)
    if _turn(img):
        w, h = h, w
    if min(w, h) < min_size:
        raise ImageRejected("too_small", f"{w}x{h} < {min_size}")
    return w, h


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """The image's header parsed (only the project's FORMATS), its pixel count capped."""
    if not data:
        raise ImageRejected("empty", "0 bytes")
    try:
        with warnings.catch_warnings():
            # PIL warns (not raises) above its own bomb limit; our cap below is the one that counts.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as e:
        raise ImageRejected("too_many_pixels", str(e)) from e
    except Exception as e:  # PIL raises many types for garbage input
        # Without the buffer's address: a rejection reads the same on every run and process.
        detail = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the bytes", str(e))
        if isinstance(e, Image.UnidentifiedImageError):
            detail = f"not a {', '.join(FORMATS)} image, or damaged beyond its header"
        raise ImageRejected("not_an_image", f"{type(e).__name__}: {detail}") from e
    w, h = img.size
    if w * h > max_pixels:
        raise ImageRejected("too_many_pixels", f"{w}x{h} > {max_pixels}")
    return img


def _decode(img: Image.Image) -> None:
    try:
        img.load()  # the full decode: a truncated file raises here
    except Exception as e:
        raise ImageRejected("truncated", f"{type(e).__name__}: {e}") from e


def _turn(img: Image.Image) -> bool:
    """Apply EXIF orientation in place; True when it swapped width and height."""
    try:
        before = img.size
        ImageOps.exif_transpose(img, in_place=True)  # no copy when there is nothing to turn
    except Exception as e:
        raise ImageRejected("bad_exif", f"{type(e).__name__}: {e}") from e
    return img.size != before and img.size == before[::-1]


FORMAT_EXT = {
    "JPEG": ".jpg",
    "MPO": ".jpg",
    "PNG": ".png",
    "WEBP": ".webp",
    "GIF": ".gif",
    "BMP": ".bmp",
    "TIFF": ".tif",
}


def image_ext(data: bytes) -> str:
    """The file extension of an image's actual format (a URL or a cell says nothing reliable)."""
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            return FORMAT_EXT.get(img.format, "." + (img.format or "img").lower())
    except Exception:
        return ".img"


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency composited on ALPHA_BACKGROUND."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        return _grey16_to_8(img).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        out = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))  # in place: no second RGBA copy
        return out
    return img.convert("RGB")  # L, P, CMYK, YCbCr, LAB, 1, F ...


def _grey16_to_8(img: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer) greyscale -> 8-bit L, the full 0-65535 range scaled to 0-255
    (round(v / 257)) instead of clipped at 255. In row blocks of uint32: a 64-megapixel image
    costs its own 2 bytes per pixel plus the 1-byte result, not gigabytes of float64."""
    import numpy as np

    src = np.asarray(img)  # [H, W] uint16 or int32
    out = np.empty(src.shape, np.uint8)
    for r in range(0, src.shape[0], ROWS_PER_BLOCK):
        block = np.clip(src[r: r + ROWS_PER_BLOCK], 0, 65535).astype(np.uint32)
        out[r: r + ROWS_PER_BLOCK] = (block * 255 + 32767) // 65535
    return Image.fromarray(out, "L")


def square_crops(
    size: tuple[int, int], n: int, min_scale: float, rng: random.Random
) -> list[tuple[int, int, int, int]]:
    """Crop boxes (left, top, right, bottom) for an image of ``size``.

    n == 1: the centred square of the shorter side (the usual single-view preparation).
    n > 1: the centred square first, then n - 1 random squares whose side is log-uniform between
    ``min_scale`` and 1 times the shorter side, so one photograph yields views at several scales.
    """
    w, h = size
    side = min(w, h)
    boxes = [((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)]
    for _ in range(n - 1):
        c = max(1, round(side * math.exp(rng.uniform(math.log(min_scale), 0.0))))
        x, y = rng.randint(0, w - c), rng.randint(0, h - c)
        boxes.append((x, y, x + c, y + c))
    return boxes


def random_squares(size: tuple[int, int], n: int, rng: random.Random) -> list[tuple[int, int, int, int]]:
    """n squares of the whole shorter side at random places (a resize-then-random-crop)."""
    w, h = size
    side = min(w, h)
    boxes = []
    for _ in range(n):
        x, y = rng.randint(0, w - side), rng.randint(0, h - side)
        boxes.append((x, y, x + side, y + side))
    return boxes


def adm_center_crop(img: Image.Image, resolution: int) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """ADM's ``center_crop_arr`` (guided-diffusion; used by DiT, SiT, REPA, LightningDiT, EDM2 for
    ImageNet latents), and the crop's box in the original image's pixels (rounded).

    While the shorter side is at least twice the target, halve the image with BOX filtering (its
    integer sizes floor); then BICUBIC so that the shorter side equals ``resolution`` (sizes
    rounded); then the centred square, its offset floored.
    """
    w0, h0 = img.size
    while min(img.size) >= 2 * resolution:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    scale = resolution / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), resample=Image.BICUBIC)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    sx, sy = w0 / img.width, h0 / img.height
    box = (round(left * sx), round(top * sy), round((left + resolution) * sx), round((top + resolution) * sy))
    return img.crop((left, top, left + resolution, top + resolution)), box


def crop_resize(img: Image.Image, box: tuple[int, int, int, int], resolution: int) -> Image.Image:
    """Crop then resize to resolution x resolution; antialiased when shrinking."""
    crop = img.crop(box)
    if crop.size == (resolution, resolution):
        return crop
    shrinking = crop.size[0] > resolution
    return crop.resize((resolution, resolution), Image.LANCZOS if shrinking else Image.BICUBIC)


def encode_image(img: Image.Image, fmt: str) -> bytes:
    if fmt == "png":
        return png_bytes(img)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()


PNG_LEVEL = 2  # ISA-L's levels are 0-3; 2 is as fast as 1 here and 2% smaller


def png_bytes(img: Image.Image) -> bytes:
    """An 8-bit RGB image as a PNG: every row with PNG's Sub filter (each byte minus the one a
    pixel to its left), deflated by ISA-L. Pillow's writer tries all five filters on every row
    and deflates with zlib: 5.3 ms for a 256 px crop against 0.6 ms here, for files 9% smaller
    (BENCHMARKS.md). Any PNG reader decodes it to the same pixels."""
    import struct
    import zlib

    import numpy as np
    from isal import isal_zlib

    if img.mode != "RGB":
        raise ValueError(f"png_bytes: an RGB image, not {img.mode}")
    w, h = img.size
    px = np.asarray(img).reshape(h, 3 * w)  # [H, 3W] uint8
    rows = np.empty((h, 3 * w + 1), np.uint8)  # [H, 1 + 3W]: the filter byte, then the row
    rows[:, 0] = 1  # Sub
    rows[:, 1:4] = px[:, :3]
    np.subtract(px[:, 3:], px[:, :-3], out=rows[:, 4:])  # modulo 256, as PNG's filters are

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit, truecolour, deflate, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", isal_zlib.compress(rows.tobytes(), PNG_LEVEL))
        + chunk(b"IEND", b"")
    )


def decode_uint8(data: bytes) -> np.ndarray:
    """Prepared-shard image bytes -> uint8 array [H, W, 3] (trusted: written by prepare).

    On the training hot path: the format is named (no probing of every PIL plugin) and the pixels
    go from PIL's buffer into a writable array in one copy (torch.from_numpy needs writable).
    """
    import numpy as np

    with Image.open(io.BytesIO(data), formats=("PNG", "JPEG")) as img:
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.frombuffer(bytearray(img.tobytes()), np.uint8).reshape(img.height, img.width, 3)
