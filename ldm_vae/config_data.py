"""The `data` section of params.yaml (download and prepare): its keys, defaults and value checks.
Part of :mod:`ldm_vae.config`, which re-exports it; import it from there."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .param_checks import ParamError, check_at_least, check_choice, check_processes, check_range

SOURCE_KINDS = ("builtin", "folder", "hf", "urls", "s3")
CROP_METHODS = ("multiscale", "adm", "random", "bucket")
LABEL_MODES = ("none", "folder", "file")


@dataclass(frozen=True)
class DataConfig:
    source: str = "builtin"  # builtin | folder:<path> | hf:<name, path or s3://...> | urls:<file or s3://...> | s3://bucket/prefix
    # The endpoint URL of an S3-compatible store (MinIO, R2, SeaweedFS) for s3:// sources, URL
    # lists and hf data files; "" = AWS_ENDPOINT_URL or AWS itself. Credentials never go here:
    # they come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws.
    s3_endpoint: str = ""
    # hf: which split and columns to read; "" means the dataset has no such column.
    split: str = "train"
    image_column: str = "image"
    caption_column: str = ""
    label_column: str = ""
    # folder: and s3:// sources: where a class label comes from. folder: the first folder under the
    # source (train/n01440764/x.JPEG -> n01440764), indexed as torchvision's ImageFolder does;
    # file: data.label_file maps file names to classes (a flat folder: ImageNet's val). The class
    # list goes to classes.json, and a later run never renumbers it (ingest/labels.py).
    labels: str = "none"
    label_file: str = ""
    max_images: int = 0  # stop after this many source items (0: all); for hf and urls
    # Worker processes per machine for download and prepare (auto: every core). Results do not
    # depend on it, so dvc.yaml does not list it: changing it re-runs nothing.
    num_workers: str = "auto"
    # Source items per unit of work: one raw shard, one task of a worker, the most a killed run
    # redoes. auto: 125 to 4,000 by the source's size alone (ingest/items.py: unit_size), so that
    # a small set still gives every core work. Streamed hf: sets are cut by their own shards instead.
    unit_images: str = "auto"
    # urls: parallel fetches, timeouts in seconds, retries (5xx, 429, connection errors, timeouts)
    # with exponential back-off starting at retry_backoff seconds, and a cap on a response's size.
    download_workers: int = 16
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    retries: int = 3
    retry_backoff: float = 1.0
    # urls: the most one URL may take, retries and waits included (a server that drips a byte
    # at a time never trips read_timeout); a 429/503's Retry-After is honoured within it.
    fetch_deadline: float = 60.0
    # urls: X-Robots-Tag directives that mean "not for AI training" (img2dataset's default set): a
    # response carrying one, for every agent or for ldm-vae, is rejected as opted_out. () fetches all.
    disallowed_header_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    max_bytes: int = 50_000_000
    min_size: int = 32  # shorter side in pixels below which an image is rejected
    max_pixels: int = 64_000_000  # decompression-bomb cap (width * height)
    resolution: int = 64  # side of the square training images, a multiple of 8
    val_fraction: float = 0.15  # share of source images (not crops) held out for validation
    crops_per_image: int = 90  # >1: random multi-scale crops per train image (small collections)
    val_crops_per_image: int = 24
    min_crop_scale: float = 0.3  # smallest crop side as a fraction of the image's shorter side
    # multiscale: a centred square, then random squares of 0.3-1.0 of the shorter side (small
    # collections); adm: ADM's center_crop_arr (DiT, SiT, REPA, EDM2 ImageNet latents), one per
    # image; random: squares of the whole shorter side at random places.
    # bucket: one crop per image at the aspect-ratio bucket nearest its own (text-to-image, SDXL
    # size conditioning; ldm_vae/buckets.py). The buckets have about resolution² pixels,
    # sides a multiple of bucket_step (SDXL: 64) and at least bucket_min_side (0: one step), aspect
    # ratios within 1/bucket_max_ratio .. bucket_max_ratio; or exactly the list `buckets` ("WxH").
    crop: str = "multiscale"
    bucket_step: int = 64
    bucket_max_ratio: float = 4.0
    bucket_min_side: int = 0
    buckets: tuple[str, ...] = ()
    bucket_crop: str = "center"  # center | random: where the bucket is cut from the resized image
    bucket_upscale: bool = True  # false: a smaller image gets a smaller bucket (kohya's bucket_no_upscale)
    image_format: str = "png"  # how prepared images are stored in the shards
    samples_per_shard: int = 1000
    seed: int = 0

    def check(self) -> None:
        kind = self.source.split(":", 1)[0]
        check_choice("data.source", kind, SOURCE_KINDS, shown=self.source)
        if kind in ("folder", "hf", "urls") and not self.source_target:
            raise ParamError(f"data.source: {self.source!r}: {kind} needs a target, e.g. {kind}:<path>")
        if kind == "s3" and not re.fullmatch(r"s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?", self.source):
            raise ParamError(f"data.source: {self.source!r}: an S3 source is s3://BUCKET[/PREFIX] (bucket names: "
                             "3-63 lowercase letters, digits, dots and hyphens)")
        if self.s3_endpoint and not re.fullmatch(r"https?://[^\s/@]+/?", self.s3_endpoint):
            raise ParamError(f"data.s3_endpoint: {self.s3_endpoint!r}: an http(s) URL of the store, no path and no "
                             "credentials (e.g. http://127.0.0.1:8333), or '' for AWS_ENDPOINT_URL / AWS")
        if not re.fullmatch(r"[A-Za-z0-9_.\-\[\]:%+]+", self.split):
            raise ParamError(f"data.split: {self.split!r}: a split name (letters, digits, _ . -) or datasets' "
                             "slicing syntax ('train[:10%]', 'train+validation')")
        if kind == "hf" and not self.image_column:
            raise ParamError("data.image_column: '': an hf source needs the name of its image column")
        self._check_labels(kind)
        check_at_least("data.max_images", self.max_images, 0)
        check_processes("data.num_workers", self.num_workers)
        check_processes("data.unit_images", str(self.unit_images))
        check_at_least("data.download_workers", self.download_workers, 1)
        check_range("data.connect_timeout", self.connect_timeout, 0.0, 3600.0, open_lo=True)
        check_range("data.read_timeout", self.read_timeout, 0.0, 3600.0, open_lo=True)
        check_at_least("data.retries", self.retries, 0)
        check_at_least("data.retry_backoff", self.retry_backoff, 0.0)
        check_range("data.fetch_deadline", self.fetch_deadline, 0.0, 3600.0, open_lo=True)
        for d in self.disallowed_header_directives:
            if not d or d != d.strip().lower() or "," in d or ":" in d:
                raise ParamError(f"data.disallowed_header_directives: {d!r}: a directive is one lower-case word, "
                                 "e.g. noai, noimageai, noindex, noimageindex")
        check_at_least("data.max_bytes", self.max_bytes, 1)
        check_at_least("data.min_size", self.min_size, 1)
        check_at_least("data.max_pixels", self.max_pixels, 1)
        if self.resolution < 8 or self.resolution % 8:
            raise ParamError(
                f"data.resolution: {self.resolution}: must be a multiple of 8 (8x downsampling), at least 8"
            )
        check_range("data.val_fraction", self.val_fraction, 0.0, 1.0, open_hi=True, open_lo=True)
        check_at_least("data.crops_per_image", self.crops_per_image, 1)
        check_at_least("data.val_crops_per_image", self.val_crops_per_image, 1)
        check_range("data.min_crop_scale", self.min_crop_scale, 0.0, 1.0, open_lo=True)
        check_choice("data.image_format", self.image_format, ("png", "jpg"))
        check_choice("data.crop", self.crop, CROP_METHODS)
        if self.crop == "adm" and (self.crops_per_image, self.val_crops_per_image) != (1, 1):
            raise ParamError(f"data.crop: 'adm' takes one centre crop per image: set data.crops_per_image "
                             f"({self.crops_per_image}) and data.val_crops_per_image ({self.val_crops_per_image}) to 1")
        check_at_least("data.samples_per_shard", self.samples_per_shard, 1)
        self._check_buckets()

    def _check_labels(self, kind: str) -> None:
        check_choice("data.labels", self.labels, LABEL_MODES)
        if self.labels != "none" and kind not in ("folder", "s3"):
            raise ParamError(f"data.labels: {self.labels!r}: labels from the layout need a folder: or s3:// source "
                             f"(this is {kind}; hf: and urls: take data.label_column / a label column)")
        if self.labels == "file":
            if kind != "folder":
                raise ParamError("data.labels: 'file': a label file labels a folder: source (put an s3 set's "
                                 "images in class folders and use data.labels: folder)")
            if not self.label_file:
                raise ParamError("data.label_file: '': data.labels: file needs the file mapping image names to "
                                 "classes (LOC_val_solution.csv, or lines of 'file,class')")
            if not os.path.isfile(self.label_file):
                raise ParamError(f"data.label_file: {self.label_file!r} does not exist")
        elif self.label_file:
            raise ParamError(f"data.label_file: {self.label_file!r} is read only with data.labels: file "
                             f"(data.labels is {self.labels!r})")

    def _check_buckets(self) -> None:
        if self.bucket_step < 8 or self.bucket_step % 8:
            raise ParamError(f"data.bucket_step: {self.bucket_step}: must be a multiple of 8, at least 8")
        check_at_least("data.bucket_max_ratio", self.bucket_max_ratio, 1.0)
        check_at_least("data.bucket_min_side", self.bucket_min_side, 0)
        check_choice("data.bucket_crop", self.bucket_crop, ("center", "random"))
        for b in self.buckets:
            m = re.fullmatch(r"([0-9]+)x([0-9]+)", b)
            if not m or int(m[1]) % 8 or int(m[2]) % 8 or not (int(m[1]) and int(m[2])):
                raise ParamError(f"data.buckets: {b!r}: a bucket is WIDTHxHEIGHT, each a positive multiple of 8 "
                                 "(e.g. 1152x896)")
        if self.crop == "bucket":
            if (self.crops_per_image, self.val_crops_per_image) != (1, 1):
                raise ParamError(
                    f"data.crop: 'bucket' takes one crop per image: set data.crops_per_image "
                    f"({self.crops_per_image}) and data.val_crops_per_image ({self.val_crops_per_image}) to 1"
                )
            from .buckets import bucket_set

            if not bucket_set(self):
                raise ParamError(f"data.bucket_*: no bucket of about {self.resolution}² pixels has sides that are "
                                 f"multiples of {self.bucket_step}, at least {self.bucket_min_side} and a ratio "
                                 f"within {self.bucket_max_ratio}")

    @property
    def source_kind(self) -> str:
        return self.source.split(":", 1)[0]

    @property
    def source_target(self) -> str:
        return self.source.split(":", 1)[1] if ":" in self.source else ""
