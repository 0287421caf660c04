"""The samples of the three shard kinds, defined once: :data:`RAW`, :data:`PREPARED`, :data:`LATENT`.

All three are webdataset tar shards (``shards.py`` writes and reads the tar format): a sample is
the members that share a key, ``<key>.<ext>``. Each kind below lists its members: the member's
extension, its type, whether every sample has it, and what it means; a ``json`` member lists its
own fields the same way. Writers build samples with :meth:`Kind.build` (which refuses a missing,
unknown or mistyped field) and readers take fields with :meth:`Kind.get`, so a format change is
made here, once. ``docs/design.md`` shows the same tables (:meth:`Kind.describe`; a test keeps
them equal).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import atomic_write

# Raw members carry the source's own format; prepared images are PNG (lossless) or JPEG.
RAW_IMAGE_EXTS = ("jpg", "png", "webp", "gif", "bmp", "tif")
IMAGE_KEYS = ("png", "jpg")


@dataclass(frozen=True)
class Field:
    """One member of a sample (or one field of its ``json``)."""

    ext: str  # the member's extension ("mean.npy"); an image: one of ``exts``
    type: str  # image | npy | json | text | label (members); str | int | ints | label (json fields)
    meaning: str
    required: bool = True
    exts: tuple[str, ...] = ()  # an image's possible formats, the first the default


class Kind:
    """A shard kind's sample: its members (name -> :class:`Field`) and its json's fields."""

    def __init__(self, name: str, where: str, fields: dict[str, Field], meta: dict[str, Field] | None = None,
                 one_of: tuple[tuple[str, ...], ...] = ()):
        self.name, self.where, self.fields, self.meta = name, where, fields, meta or {}
        self.one_of = one_of  # groups of optional fields: a sample holds every field of exactly one
        self._by_ext = {f.ext: n for n, f in fields.items() if f.type != "image"}

    def build(self, key: str, fmt: str | None = None, **values) -> dict:
        """The sample dict for :class:`ldm_vae.shards.ShardWriter`: every field encoded. ``fmt``:
        the image member's extension (its format). None values are absent optional fields."""
        values = {n: v for n, v in values.items() if v is not None}
        unknown = sorted(set(values) - set(self.fields))
        missing = sorted(n for n, f in self.fields.items() if f.required and n not in values)
        if unknown or missing:
            raise ValueError(f"{self.name} sample {key!r}: unknown fields {unknown}, missing fields {missing}")
        if self.one_of and [all(n in values for n in g) for g in self.one_of].count(True) != 1:
            raise ValueError(f"{self.name} sample {key!r}: needs exactly one of "
                             f"{' or '.join('+'.join(g) for g in self.one_of)}; got {sorted(values)}")
        sample = {"__key__": key}
        for name, value in values.items():
            field = self.fields[name]
            ext = field.ext
            if field.type == "image":
                ext = fmt or field.exts[0]
                if ext not in field.exts:
                    raise ValueError(f"{self.name} sample {key!r}: image format {ext!r} is not one of {field.exts}")
            sample[ext] = self._encode(key, name, field, value)
        return sample

    def get(self, sample: dict, name: str, default=None):
        """Field ``name`` of a stored sample, decoded (an image stays its encoded bytes); ``default``
        when an optional field is absent."""
        field = self.fields[name]
        exts = field.exts if field.type == "image" else (field.ext,)
        for ext in exts:
            if ext in sample:
                return _DECODE[field.type](sample[ext])
        if field.required or self._needed(sample, name):
            raise KeyError(f"{self.name} sample {sample.get('__key__')!r} has no {name} "
                           f"(member {' or '.join('.' + e for e in exts)})")
        return default

    def _needed(self, sample: dict, name: str) -> bool:
        """A field of a ``one_of`` group is needed unless the sample holds another group whole."""
        for group in self.one_of:
            if name in group:
                others = [g for g in self.one_of if g is not group]
                return not any(all(self.fields[n].ext in sample for n in g) for g in others)
        return False

    def read(self, sample: dict) -> dict:
        """Every field the sample holds, decoded; ValueError for a member this kind does not have."""
        known = {e for f in self.fields.values() for e in (f.exts if f.type == "image" else (f.ext,))}
        extra = sorted(e for e in sample if not e.startswith("__") and e not in known)
        if extra:
            raise ValueError(f"{self.name} sample {sample.get('__key__')!r}: unknown members {extra}")
        return {n: v for n in self.fields if (v := self.get(sample, n)) is not None}

    def describe(self) -> str:
        """The kind as markdown tables (docs/design.md holds the same)."""
        lines = [f"**{self.name}** ({self.where})", ""]
        if self.one_of:
            groups = [" + ".join(f"`{self.fields[n].ext}`" for n in g) for g in self.one_of]
            lines += [f"A sample holds {' or '.join(groups)}.", ""]
        lines += ["| member | type | always | meaning |", "|---|---|---|---|"]
        for f in self.fields.values():
            ext = "|".join(f.exts) if f.type == "image" else f.ext
            lines.append(f"| `{ext}` | {f.type} | {'yes' if f.required else 'no'} | {f.meaning} |")
        if self.meta:
            lines += ["", "| json field | type | always | meaning |", "|---|---|---|---|"]
            lines += [
                f"| `{n}` | {f.type} | {'yes' if f.required else 'no'} | {f.meaning} |" for n, f in self.meta.items()
            ]
        return "\n".join(lines)

    def _encode(self, key: str, name: str, field: Field, value) -> bytes:
        ok = {"image": lambda v: isinstance(v, bytes), "text": lambda v: isinstance(v, str),
              "label": _is_label,
              "npy": lambda v: isinstance(v, np.ndarray) and v.dtype == np.float16 and v.ndim == 3,
              "tokens": lambda v: isinstance(v, np.ndarray) and v.dtype.kind == "u" and v.ndim == 2,
              "json": lambda v: isinstance(v, dict)}[field.type](value)
        if not ok:
            raise ValueError(
                f"{self.name} sample {key!r}: field {name} must be {field.type}, got {type(value).__name__}"
                + (f" {value.dtype} {value.shape}" if isinstance(value, np.ndarray) else "")
            )
        if field.type == "json":
            self._check_meta(key, value)
            return json.dumps(value, sort_keys=True).encode()
        if field.type in ("npy", "tokens"):
            return npy_bytes(value)
        return value if field.type == "image" else str(value).encode()

    def _check_meta(self, key: str, meta: dict) -> None:
        unknown = sorted(set(meta) - set(self.meta))
        missing = sorted(n for n, f in self.meta.items() if f.required and n not in meta)
        wrong = sorted(n for n, v in meta.items() if n in self.meta and not _META_TYPES[self.meta[n].type](v))
        if unknown or missing or wrong:
            raise ValueError(f"{self.name} sample {key!r} json: unknown fields {unknown}, missing {missing}, "
                             f"wrong type {wrong}")


def _ints(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)


def _is_label(v) -> bool:
    return isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool))


def _label(b: bytes) -> int | str:
    text = bytes(b).decode("utf-8")
    return int(text) if re.fullmatch(r"-?[0-9]+", text) else text


_META_TYPES = {"str": lambda v: isinstance(v, str), "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
               "ints": _ints, "label": _is_label}


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
            _NPY_HEADERS[key] = (arr.dtype, arr.shape, start, order, arr.size)
        dtype, shape, offset, order, count = _NPY_HEADERS[key]
        return np.frombuffer(data, dtype=dtype, offset=offset, count=count).reshape(shape, order=order)
    return np.load(io.BytesIO(data), allow_pickle=False)


_DECODE = {
    "image": bytes,
    "npy": npy_load,
    "tokens": npy_load,
    "json": json.loads,
    "text": lambda b: bytes(b).decode("utf-8"),
    "label": _label,
}

_CAPTION = Field("txt", "text", "the caption, UTF-8 (sources with a caption column)", required=False)
_LABEL = Field("cls", "label", "the label (sources with a label column): an integer as decimal digits, "
               "else the text as given", required=False)

RAW = Kind("raw", "data/raw/shards/raw-u<unit>-00000.tar, written by download", {
    "image": Field("image", "image", "the source's bytes, unchanged (sha256 in manifest.jsonl); the extension "
                   "is the real format. What the key is (caption, label, size) lives in manifest.jsonl",
                   exts=RAW_IMAGE_EXTS),
})

_PREPARED_META = {
    "key": Field("key", "str", "the sample's key"),
    "raw_key": Field("raw_key", "str", "the raw image it was cut from (several crops share it)"),
    "source": Field("source", "str", "where the raw image came from (path, URL, dataset row)"),
    "width": Field("width", "int", "the raw image's width, after EXIF orientation"),
    "height": Field("height", "int", "the raw image's height, after EXIF orientation"),
    "crop_box": Field("crop_box", "ints", "[left, top, right, bottom] of the crop in the raw image"),
    "resolution": Field(
        "resolution",
        "int",
        "data.resolution: the stored square's side; with buckets, the side of the square of about the same pixel count",
    ),
    "original_size": Field("original_size", "ints", "SDXL's original_size: [height, width] of the raw image"),
    "crop_top_left": Field(
        "crop_top_left",
        "ints",
        "SDXL's crops_coords_top_left: [top, left] of the crop in the raw "
        "image resized so that the crop has the stored size",
    ),
    "target_size": Field(
        "target_size", "ints", "SDXL's target_size: [height, width] of the stored image (with buckets: its bucket)"
    ),
    "caption": Field("caption", "str", "the caption, as in txt", required=False),
    "label": Field("label", "label", "the label, as in cls", required=False),
}

PREPARED = Kind("prepared", "data/prepared/{train,val}/<split>-u<unit>[-<W>x<H>]-<n>.tar (buckets: one bucket a "
                "shard), written by prepare", {
    "image": Field("image", "image", "an RGB image (data.image_format): a square of data.resolution pixels, or "
                   "with data.crop: bucket its bucket's width x height", exts=IMAGE_KEYS),
    "meta": Field("json", "json", "where the crop came from (fields below)"),
    "caption": _CAPTION,
    "label": _LABEL,
}, _PREPARED_META)

_LATENT_SHAPE = "[C, H/8, W/8]"
LATENT = Kind("latent", "data/latents/{train,val}/<split>-r<rank>-s<input>-<n>.tar, written by encode", {
    "mean": Field("mean.npy", "npy", f"KL: float16 {_LATENT_SHAPE}: the posterior's mean, raw (not scaled or shifted)",
                  required=False),
    "std": Field("std.npy", "npy", f"KL: float16 {_LATENT_SHAPE}: the posterior's standard deviation", required=False),
    "mean_flip": Field("mean_flip.npy", "npy", "as mean, of the image flipped left-right (encode.flip)",
                       required=False),
    "std_flip": Field("std_flip.npy", "npy", "as std, of the flipped image (encode.flip)", required=False),
    "tokens": Field("tokens.npy", "tokens", "VQ: the code indices [H/8, W/8], the smallest unsigned integer type that "
                    "holds codebook_size - 1 (uint8, uint16, uint32)", required=False),
    "tokens_flip": Field("tokens_flip.npy", "tokens", "as tokens, of the flipped image (encode.flip)", required=False),
    "prequant": Field("prequant.npy", "npy", "VQ with encode.prequant: float16 [D, H/8, W/8], the encoder's output "
                      "before the snap to codes (what LDM's VQ diffusion trains on; the decoder quantises)",
                      required=False),
    "meta": Field("json", "json", "the prepared sample's json, plus latent_shape"),
    "caption": _CAPTION,
    "label": _LABEL,
}, {**_PREPARED_META, "latent_shape": Field("latent_shape", "ints", f"{_LATENT_SHAPE} of mean and std; VQ: [D, H/8, "
                                            "W/8] of the codes the tokens stand for")},
    one_of=(("mean", "std"), ("tokens",)))

KINDS = (RAW, PREPARED, LATENT)


def image_bytes(sample: dict) -> bytes:
    """The encoded image of a prepared sample."""
    return PREPARED.get(sample, "image")


def batched(samples, size: int, key=None):
    """Lists of up to ``size`` consecutive samples; with ``key``, a list also ends where
    ``key(sample)`` changes (one image shape a batch)."""
    batch: list = []
    for s in samples:
        if batch and key is not None and key(s) != key(batch[0]):
            yield batch
            batch = []
        batch.append(s)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# -- the class list beside the shards --------------------------------------------------------------

CLASSES_FILE = "classes.json"  # a JSON list of class names: a label is an index into it


def read_classes(folder) -> list[str]:
    """The class names an earlier stage wrote in ``folder`` ([] if none: labels without names)."""
    path = Path(folder) / CLASSES_FILE
    if not path.is_file():
        return []
    names = json.loads(path.read_text())
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: expected a JSON list of class names; remove it to number the classes anew")
    return names


def write_classes(folder, names: list[str]) -> None:
    atomic_write(Path(folder) / CLASSES_FILE, json.dumps(names, indent=0) + "\n")
