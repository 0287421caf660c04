"""Prepared-image streams for training and evaluation (tensors in [-1, 1])."""

from __future__ import annotations

import random

import numpy as np
import torch
import webdataset as wds

from .images import decode_uint8
from .samples import image_bytes
from .shards import iter_samples, tar_samples


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float [..., 3, H, W] in [-1, 1].

    A batch [B, H, W, 3] comes out channels_last in memory (the convolutions' fast layout) with
    no extra copy: the permute only relabels the strides.
    """
    return torch.from_numpy(arr).movedim(-1, -3).float().div(127.5).sub(1.0)


def fade_to_colour(x: torch.Tensor) -> torch.Tensor:
    """Blend an image [3, H, W] in [-1, 1] towards a random solid colour by a random amount.

    A convex blend, so the result stays in [-1, 1]: low-contrast images of every tint and
    brightness, the flat skies and walls a small photo collection rarely shows.
    """
    colour = torch.tensor([random.uniform(-1.0, 1.0) for _ in range(3)]).view(3, 1, 1)  # [3, 1, 1]
    alpha = random.random()
    return torch.lerp(x, colour, alpha)  # x * (1 - alpha) + colour * alpha, one pass


def train_stream(paths: list[str], seed: int, crop: int = 0, color_augment: bool = False,
                 fade_augment: float = 0.0, shuffle_buffer: int = 1000, cache_mb: int = 0) -> wds.DataPipeline:
    """An endless, shuffled stream of random-flipped training images [3, H, W].

    ``crop`` > 0 takes a random ``crop`` x ``crop`` window of each image instead (the autoencoder
    is convolutional, so it can train on windows and run on full images). ``color_augment``
    permutes the RGB channels at random (one of the 6 orders), so colours absent from a small
    collection are still seen. ``fade_augment`` is the probability of :func:`fade_to_colour`.

    Shards are resampled with a seed that webdataset mixes with the rank and the worker id, so
    each process and dataloader worker draws its own sequence: no node splitting is needed and
    no worker ever runs dry, whatever the number of shards.

    ``cache_mb``: decoded images are kept, up to this many MB per data process, so a small set is
    decoded once rather than every epoch (image decoding is most of this pipeline's cost; the
    demo's 1,170 images take 14 MB). Images past the budget are decoded every time.
    """
    cache: dict[str, np.ndarray] = {}
    budget = cache_mb * 2**20  # bytes left

    def pixels(sample) -> np.ndarray:
        nonlocal budget
        arr = cache.get(sample["__key__"])
        if arr is None:
            arr = decode_uint8(image_bytes(sample))
            if arr.nbytes <= budget:
                arr.flags.writeable = False  # shared by every later epoch: never modified in place
                cache[sample["__key__"]] = arr
                budget -= arr.nbytes
        return arr

    def to_item(sample):
        arr = pixels(sample)  # [H, W, 3] uint8
        # Crop and flip the uint8 pixels, before the float conversion (4x fewer values at 32 of 64 px).
        if crop and crop <= min(arr.shape[:2]):  # buckets: windows as large as a bucket's side too
            top, left = random.randint(0, arr.shape[0] - crop), random.randint(0, arr.shape[1] - crop)
            arr = arr[top : top + crop, left : left + crop]
        # Horizontal flips double the views of a small collection. Python's `random`, not numpy's:
        # torch reseeds it in every dataloader worker, numpy's state would be cloned by fork.
        if random.random() < 0.5:
            arr = arr[:, ::-1]
        x = to_tensor(np.array(arr, order="C"))  # [3, h, w] in [-1, 1], from a private copy
        if color_augment:
            x = x[random.sample(range(3), 3)]  # [3, H, W], channels in a random order
        if fade_augment and random.random() < fade_augment:
            x = fade_to_colour(x)
        return x

    return wds.DataPipeline(
        wds.ResampledShards(paths, seed=seed, deterministic=True),
        tar_samples,
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed),
        wds.map(to_item),
    )


def _centre_square(arr: np.ndarray, side: int) -> np.ndarray:
    """The centred side x side window of an image [H, W, 3]."""
    top, left = (arr.shape[0] - side) // 2, (arr.shape[1] - side) // 2
    return arr[top:top + side, left:left + side]


def load_images(paths: list[str], limit: int | None = None) -> tuple[list[str], torch.Tensor]:
    """The first ``limit`` images of ``paths`` in shard order: (keys, [N, 3, H, W] in [-1, 1]).
    Images of several shapes (buckets) are cut to the centred squares of their smallest side."""
    keys, tensors = [], []
    for sample in iter_samples(paths):
        if limit is not None and len(keys) >= limit:
            break
        keys.append(sample["__key__"])
        tensors.append(decode_uint8(image_bytes(sample)))
    if not tensors:
        raise RuntimeError(f"no images in {paths}")
    side = min(min(t.shape[:2]) for t in tensors)
    if any(t.shape[:2] != (side, side) for t in tensors):
        # Aspect-ratio buckets: the centred squares of the smallest side, so that they stack.
        tensors = [_centre_square(t, side) for t in tensors]
    return keys, to_tensor(np.stack(tensors)).contiguous()  # [N, 3, H, W]
