"""Aspect-ratio buckets (``data.crop: bucket``): which bucket an image goes to, and how it is cut.

A bucket is a (width, height) pair with about ``data.resolution``² pixels. The generated set
follows SDXL's and kohya's rule: for each width w, a multiple of the step, the largest height
that is a multiple of the step and keeps w·h within resolution², plus the transposed pair; pairs
whose sides fall below the minimum side, or whose aspect ratio is beyond the maximum, are left
out. At resolution 1024, step 64, ratio 4 every bucket it makes is one of SDXL's published ones
(tests/ingest/test_buckets.py).

An image goes to the bucket nearest its aspect ratio (in log ratio, so 2:1 and 1:2 are equally
far from 1:1), is resized so that it covers the bucket (the smallest scale at which both sides
reach it) and cut to the bucket, centred or at random. What the sample records is what diffusers'
SDXL pipeline conditions on, in its conventions: ``original_size`` and ``target_size`` as
(height, width), ``crop_top_left`` as (top, left) in the resized image's pixels. From those three
alone :func:`cover_size` gives the resized image, so the crop can be re-made exactly.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

Bucket = tuple[int, int]  # (width, height)


def smallest_side(step: int, min_side: int) -> int:
    """The smallest side a bucket may have: ``min_side`` rounded up to the step, at least one step."""
    return max(step, -(-min_side // step) * step)


def make_buckets(resolution: int, step: int, max_ratio: float, min_side: int = 0) -> list[Bucket]:
    """The SDXL/kohya bucket set, sorted by aspect ratio (tallest first)."""
    area = resolution * resolution
    lo = smallest_side(step, min_side)
    out: set[Bucket] = set()
    w = lo
    while w * lo <= area:
        h = area // w // step * step
        if h >= lo and max(w / h, h / w) <= max_ratio + 1e-9:
            out.update({(w, h), (h, w)})
        w += step
    return sorted(out, key=lambda b: (b[0] / b[1], b))


def parse_bucket(text: str) -> Bucket:
    w, h = text.split("x")
    return int(w), int(h)


def bucket_name(bucket: Bucket) -> str:
    """"WxH", as in shard names, stats.json and params."""
    return f"{bucket[0]}x{bucket[1]}"


def bucket_set(cfg) -> list[Bucket]:
    """``data.buckets`` when given, else :func:`make_buckets` of the data params."""
    if cfg.buckets:
        return sorted({parse_bucket(b) for b in cfg.buckets}, key=lambda b: (b[0] / b[1], b))
    return make_buckets(cfg.resolution, cfg.bucket_step, cfg.bucket_max_ratio, cfg.bucket_min_side)


def nearest_bucket(size: tuple[int, int], buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest ``size``'s (width, height); ties go to the smaller
    width, so the choice is the same everywhere."""
    r = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - r), b))


def shrink_to_fit(size: tuple[int, int], bucket: Bucket, step: int, min_side: int) -> Bucket:
    """``bucket_upscale: false``: a bucket no larger than the image (its sides scaled by one factor,
    floored to the step), so the image is only ever cut, never enlarged; except up to the minimum
    side, which wins. An image at least as large as the bucket keeps it."""
    k = min(1.0, size[0] / bucket[0], size[1] / bucket[1])
    if k == 1.0:
        return bucket
    lo = smallest_side(step, min_side)
    return (max(lo, int(bucket[0] * k) // step * step), max(lo, int(bucket[1] * k) // step * step))


def cover_size(original: tuple[int, int], bucket: Bucket) -> tuple[int, int]:
    """The (width, height) the image is resized to: the smallest that covers the bucket."""
    w, h = original
    scale = max(bucket[0] / w, bucket[1] / h)
    return max(bucket[0], round(w * scale)), max(bucket[1], round(h * scale))


def crop_offset(resized: tuple[int, int], bucket: Bucket, how: str, rng: random.Random) -> tuple[int, int]:
    """(top, left) of the bucket in the resized image: centred (floored) or uniform at random."""
    dx, dy = resized[0] - bucket[0], resized[1] - bucket[1]
    if how == "random":
        return rng.randint(0, dy), rng.randint(0, dx)
    return dy // 2, dx // 2


def cut(img: "Image.Image", bucket: Bucket, top_left: tuple[int, int]) -> "Image.Image":
    """Resize ``img`` to :func:`cover_size` (antialiased when shrinking) and cut the bucket at
    (top, left): the one function both prepare and the exact re-make use."""
    from PIL import Image

    rw, rh = cover_size(img.size, bucket)
    if (rw, rh) != img.size:
        img = img.resize((rw, rh), Image.LANCZOS if rw < img.width else Image.BICUBIC)
    top, left = top_left
    return img.crop((left, top, left + bucket[0], top + bucket[1]))


def bucket_crop(img: "Image.Image", cfg, buckets: list[Bucket], rng: random.Random):
    """(the cut image, its crop box in the original's pixels, its SDXL size fields) for ``img``."""
    bucket = nearest_bucket(img.size, buckets)
    if not cfg.bucket_upscale:
        bucket = shrink_to_fit(img.size, bucket, cfg.bucket_step, cfg.bucket_min_side)
    resized = cover_size(img.size, bucket)
    top, left = crop_offset(resized, bucket, cfg.bucket_crop, rng)
    sx, sy = img.width / resized[0], img.height / resized[1]
    box = (round(left * sx), round(top * sy), round((left + bucket[0]) * sx), round((top + bucket[1]) * sy))
    sizes = {"original_size": [img.height, img.width], "crop_top_left": [top, left],
             "target_size": [bucket[1], bucket[0]]}
    return cut(img, bucket, (top, left)), box, sizes


def square_sizes(width: int, height: int, box: tuple[int, int, int, int], resolution: int) -> dict:
    """The SDXL size fields of a square crop (multiscale, random, adm): the image scaled so that
    the box becomes ``resolution`` wide, the box's corner in that scaled image."""
    s = resolution / (box[2] - box[0])
    return {"original_size": [height, width], "crop_top_left": [round(box[1] * s), round(box[0] * s)],
            "target_size": [resolution, resolution]}
