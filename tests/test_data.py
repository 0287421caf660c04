import itertools

import numpy as np
import torch
from PIL import Image

from ldm_vae.data import fade_to_colour, load_images, to_tensor, train_stream
from ldm_vae.shards import ShardWriter, shard_paths

from helpers.common import image_bytes, photo

COLOURS = [(10, 100, 200), (250, 30, 90), (0, 180, 60)]


def write_shards(root, images, per_shard=2):
    with ShardWriter(root, "train", per_shard=per_shard) as w:
        for i, img in enumerate(images):
            w.write({"__key__": f"k{i:02d}", "png": image_bytes(img)})
    return shard_paths(root)


def flat(colour, size=16):
    return Image.new("RGB", (size, size), colour)


def test_to_tensor_maps_uint8_to_minus_one_one():
    x = to_tensor(np.array([[[0, 255, 127]]], dtype=np.uint8))  # [1, 1, 3] -> [3, 1, 1]
    assert x.shape == (3, 1, 1)
    assert torch.allclose(x.flatten(), torch.tensor([-1.0, 1.0, 127 / 127.5 - 1]))


def test_train_stream_is_endless_and_crops_windows(tmp_path):
    paths = write_shards(tmp_path, [photo(32, 32, seed=i) for i in range(3)])
    xs = list(itertools.islice(iter(train_stream(paths, seed=0, crop=16)), 20))  # > 3 images
    assert all(x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1 for x in xs)
    # Windows at random places: not all the same crop of an image.
    assert len({x.sum().item() for x in xs}) > 3


def test_color_augment_permutes_channels_only(tmp_path):
    paths = write_shards(tmp_path, [flat(c) for c in COLOURS])
    expected = {tuple(sorted(c)) for c in COLOURS}

    def orders(augment):
        seen = set()
        for x in itertools.islice(iter(train_stream(paths, seed=0, color_augment=augment)), 60):
            rgb = tuple(round((v + 1) * 127.5) for v in x[:, 0, 0].tolist())  # a flat image: one colour
            assert tuple(sorted(rgb)) in expected  # the same values, only reordered
            seen.add(rgb)
        return seen

    assert orders(False) == set(COLOURS)
    assert len(orders(True)) > 6  # permuted orders of the three colours appear


def test_fade_lowers_contrast_towards_one_colour_and_stays_in_range():
    x = to_tensor(np.array(photo(32, 32, seed=1)))  # [3, 32, 32]
    faded = [fade_to_colour(x) for _ in range(50)]
    assert all(f.min() >= -1 and f.max() <= 1 for f in faded)
    # Contrast only ever shrinks (a blend with a constant), and by different amounts.
    stds = [f.std(dim=(1, 2)) for f in faded]
    assert all((s <= x.std(dim=(1, 2)) + 1e-6).all() for s in stds)
    assert len({round(s.mean().item(), 4) for s in stds}) > 40
    # The image's mean colour moves to many different tints.
    assert torch.stack([f.mean(dim=(1, 2)) for f in faded]).std(0).min() > 0.1


def test_fade_augment_probability(tmp_path):
    paths = write_shards(tmp_path, [photo(16, 16, seed=i) for i in range(3)])
    originals = {round(x.std().item(), 5) for x in load_images(paths)[1]} | {
        round(x.flip(-1).std().item(), 5) for x in load_images(paths)[1]}

    def faded_share(p):
        xs = itertools.islice(iter(train_stream(paths, seed=0, fade_augment=p)), 200)
        return sum(round(x.std().item(), 5) not in originals for x in xs) / 200

    assert faded_share(0.0) == 0.0
    assert 0.3 < faded_share(0.5) < 0.7
    assert faded_share(1.0) > 0.95


def test_load_images_keeps_shard_order_and_limit(tmp_path):
    paths = write_shards(tmp_path, [flat(c) for c in COLOURS])
    keys, x = load_images(paths)
    assert keys == ["k00", "k01", "k02"] and x.shape == (3, 3, 16, 16)
    keys, x = load_images(paths, limit=2)
    assert keys == ["k00", "k01"] and x.shape[0] == 2


def test_decoded_image_cache_changes_nothing_but_the_cost(tmp_path):
    """Cached or not (and with a budget that holds only some images), the stream is identical."""
    paths = write_shards(tmp_path, [photo(400, 400, seed=i) for i in range(5)])  # 480 KB each decoded
    runs = {}
    for mb in (0, 1, 1024):
        import ldm_vae.data as data

        decoded = []
        real = data.decode_uint8
        data.decode_uint8 = lambda b: decoded.append(1) or real(b)
        try:
            import random

            random.seed(0)  # crops, flips and fades draw from Python's random (train() seeds it)
            stream = train_stream(paths, seed=3, crop=16, fade_augment=0.5, cache_mb=mb)
            runs[mb] = list(itertools.islice(iter(stream), 60))  # about 12 passes over the 5 images
        finally:
            data.decode_uint8 = real
        runs[mb, "decodes"] = len(decoded)
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1024]))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert runs[0, "decodes"] == 60 and runs[1024, "decodes"] == 5  # each image decoded once
    assert 5 < runs[1, "decodes"] < 60  # 1 MB holds two of them: the others are decoded every time
