"""The samples of the three shard kinds, and the one place their members are encoded and decoded.

All three are webdataset tar shards (``shards.py`` writes and reads the tar format): a sample is
the members that share a key, ``<key>.<ext>``.

- **raw** (``data/raw/shards/raw-u<unit>-00000.tar``, download): ``<key>.<jpg|png|webp|gif|bmp|tif>``,
  the source's bytes unchanged; what each key is lives in ``manifest.jsonl``.
- **prepared** (``data/prepared/<split>/*.tar``, prepare): ``png`` (or ``jpg``) an RGB square at
  ``data.resolution``; ``json`` {raw_key, source, width, height (of the raw image), crop_box,
  crop, resolution}; ``txt`` the caption and ``cls`` the label when the source has them.
- **latent** (``data/latents/<split>/*.tar``, encode): ``mean.npy`` and ``std.npy`` float16
  ``[C, H/8, W/8]``, the raw (unscaled) posterior; with ``encode.flip`` also ``mean_flip.npy`` /
  ``std_flip.npy``; ``json`` the prepared sample's metadata; ``txt`` / ``cls`` as above.
"""

from __future__ import annotations

import io

import numpy as np

IMAGE_KEYS = ("png", "jpg")


def image_bytes(sample: dict) -> bytes:
    for ext in IMAGE_KEYS:
        if ext in sample:
            return sample[ext]
    raise KeyError(f"sample {sample.get('__key__')!r} holds no image ({', '.join(IMAGE_KEYS)})")


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


_NPY_HEADERS: dict[bytes, tuple] = {}  # header bytes -> (dtype, shape, data offset, order)


def npy_load(data: bytes) -> np.ndarray:
    """An .npy file's array (read-only view of ``data``), no pickles.

    Every latent of a set has the same header, and numpy parses headers with ``ast`` (tens of
    microseconds, as much as the rest of a loader step): parsed once per distinct header here.
    """
    if data[:6] == b"\x93NUMPY" and data[6:7] in (b"\x01", b"\x02"):
        head_len = int.from_bytes(data[8:10], "little") if data[6] == 1 else int.from_bytes(data[8:12], "little")
        start = (10 if data[6] == 1 else 12) + head_len
        key = data[:start]
        if key not in _NPY_HEADERS:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
            if arr.dtype.hasobject or arr.dtype.byteorder not in ("=", "|", "<") or len(_NPY_HEADERS) >= 64:
                return arr  # a set has a few distinct headers: a crafted shard cannot grow the cache
            order = "F" if arr.flags.f_contiguous and not arr.flags.c_contiguous else "C"
            _NPY_HEADERS[key] = (arr.dtype, arr.shape, start, order)
        dtype, shape, offset, order = _NPY_HEADERS[key]
        return np.frombuffer(data, dtype=dtype, offset=offset, count=int(np.prod(shape))).reshape(shape, order=order)
    return np.load(io.BytesIO(data), allow_pickle=False)


