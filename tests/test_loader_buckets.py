"""The loader on latents of several shapes (aspect-ratio buckets): one shape a batch, the same
number of batches on every rank, each sample at most once an epoch within the documented drop,
buckets mixed through the epoch in proportion to their samples, and both batch-size policies."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from ldm_vae.loader import bucket_batch_sizes, latent_loader
from ldm_vae.samples import npy_bytes
from ldm_vae.shards import ShardWriter

# latent shape -> samples: unequal, odd counts; areas 32, 32, 16 (for the pixels policy)
SHAPES = {(4, 4, 8): 37, (4, 8, 4): 23, (4, 4, 4): 11}


def write_buckets(folder: Path, per_shard: int = 5) -> dict[str, tuple]:
    """Latent shards of SHAPES, one shape a shard (as encode writes them); key -> shape."""
    rng = np.random.default_rng(0)
    keys = {}
    for b, (shape, n) in enumerate(SHAPES.items()):
        with ShardWriter(folder, f"train-b{b}", per_shard) as w:
            for i in range(n):
                key = f"b{b}-{i:03d}"
                c, h, wd = shape
                meta = {"key": key, "original_size": [8 * h + 3, 8 * wd + 5], "crop_top_left": [1, 2],
                        "target_size": [8 * h, 8 * wd]}
                w.write({"__key__": key, "mean.npy": npy_bytes(rng.standard_normal(shape).astype(np.float16)),
                         "std.npy": npy_bytes(np.full(shape, 0.1, np.float16)), "json": json.dumps(meta).encode(),
                         "txt": f"caption {key}".encode()})
                keys[key] = shape
    return keys


@pytest.fixture(scope="module")
def buckets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("buckets")
    return folder, write_buckets(folder)


def _epoch(folder, rank, epoch, monkeypatch, world=2, **kw):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    loader = latent_loader(str(folder / "*.tar"), num_workers=2, normalize="none", shuffle=8, **kw)
    loader.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("drop_last", [False, True])
def test_two_ranks_two_workers_one_shape_a_batch_equal_batches_each_sample_at_most_once(buckets, monkeypatch,
                                                                                        drop_last):
    folder, keys = buckets
    for epoch in range(2):
        seen, per_rank = [], []
        for rank in range(2):
            batches = _epoch(folder, rank, epoch, monkeypatch, batch_size=4, drop_last=drop_last)
            per_rank.append(len(batches))
            for b in batches:
                shape = tuple(b["latent"].shape[1:])
                assert {keys[k] for k in b["key"]} == {shape}  # one bucket a batch
                assert not drop_last or len(b["key"]) == 4
                h, w = shape[1:]
                # SDXL's add_time_ids: original_size, crop_top_left, target_size
                assert b["time_ids"].tolist() == [[8 * h + 3, 8 * w + 5, 1, 2, 8 * h, 8 * w]] * len(b["key"])
                assert b["caption"] == [f"caption {k}" for k in b["key"]]
                seen += list(b["key"])
        assert per_rank[0] == per_rank[1] > 0  # DDP: no rank waits at a step the other never reaches
        assert len(seen) == len(set(seen))  # each sample at most once an epoch
        # The documented drop: n mod W of each bucket; with drop_last also each worker's partial batch.
        kept = sum(n - n % 2 for n in SHAPES.values())
        if drop_last:
            assert kept - 2 * 2 * len(SHAPES) * 3 <= len(seen) <= kept
        else:
            assert len(seen) == kept


def test_each_buckets_share_of_batches_follows_its_share_and_buckets_mix(buckets, monkeypatch):
    folder, keys = buckets
    batches = _epoch(folder, 0, 0, monkeypatch, batch_size=2)
    counts = Counter(tuple(b["latent"].shape[1:]) for b in batches)
    for shape, n in SHAPES.items():  # rank 0 holds n // 2 of each bucket, in batches of 2
        assert counts[shape] == sum(-(-part // 2) for part in (n // 2 // 2 + (n // 2) % 2, n // 2 // 2))
    first_half = {tuple(b["latent"].shape[1:]) for b in batches[: len(batches) // 2]}
    assert len(first_half) == 3  # not one bucket after another: mixed through the epoch


def test_epoch_order_changes_with_set_epoch_and_repeats(buckets, monkeypatch):
    folder, _ = buckets
    orders = [
        [k for b in _epoch(folder, 0, e, monkeypatch, world=1, batch_size=4) for k in b["key"]] for e in (0, 1, 0)
    ]
    assert orders[0] == orders[2] != orders[1]
    assert sorted(orders[0]) == sorted(orders[1])


def test_pixels_policy_gives_smaller_buckets_larger_batches(buckets, monkeypatch):
    folder, keys = buckets
    assert bucket_batch_sizes(SHAPES, 4, "pixels") == {(4, 4, 8): 4, (4, 8, 4): 4, (4, 4, 4): 8}
    assert bucket_batch_sizes(SHAPES, 4, "samples") == {s: 4 for s in SHAPES}
    with pytest.raises(ValueError, match="bucket_batch='area': allowed: samples, pixels"):
        bucket_batch_sizes(SHAPES, 4, "area")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    batches = list(latent_loader(str(folder / "*.tar"), batch_size=4, num_workers=0, normalize="none",
                                 bucket_batch="pixels", drop_last=True))
    sizes = {tuple(b["latent"].shape[1:]): len(b["key"]) for b in batches}
    assert sizes == {(4, 4, 8): 4, (4, 8, 4): 4, (4, 4, 4): 8}  # the same latent pixels a batch


def test_resampled_buckets_are_endless_and_one_shape_a_batch(buckets):
    import itertools

    folder, keys = buckets
    loader = latent_loader(str(folder / "*.tar"), batch_size=3, num_workers=0, normalize="none", resampled=True,
                           shuffle=5)
    for b in itertools.islice(iter(loader), 40):
        assert len({keys[k] for k in b["key"]}) == 1 and len(b["key"]) == 3


@pytest.mark.slow
def test_bucketed_shards_in_real_two_process_ddp_finish(tmp_path):
    """Two gloo processes all-reduce once a batch over bucketed shards: a rank with more batches
    would wait for ever."""
    write_buckets(tmp_path / "shards", per_shard=7)
    result = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "helpers" / "ddp_consumer.py"), str(tmp_path / "shards")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert reports[0]["batches"] == reports[1]["batches"] > 0
    assert reports[0]["seen"] + reports[1]["seen"] == sum(n - n % 2 for n in SHAPES.values())


def test_bucketed_shards_from_s3_give_the_local_batches(buckets, s3_env, monkeypatch, tmp_path):
    """The bucket plan comes from stats.json by shard name, so published shards read from a real
    S3 server give every rank the same batches (shapes, keys, order) as the local files."""
    from ldm_vae.s3 import publish
    from ldm_vae.shards import shard_keys

    folder, _ = buckets
    shards = sorted(folder.glob("*.tar"))
    stats = {"splits": {"train": {"shard_counts": {p.name: len(shard_keys(str(p))) for p in shards},
                                  "shard_shapes": {p.name: _shape_of(p) for p in shards}}}}
    pub = tmp_path / "pub"
    (pub / "train").mkdir(parents=True)
    for p in shards:
        (pub / "train" / p.name).write_bytes(p.read_bytes())
    (pub / "stats.json").write_text(json.dumps(stats))
    s3_env.make_bucket("latents")
    publish(pub, "s3://latents/buckets")
    for rank in range(2):
        here = _epoch(folder, rank, 1, monkeypatch, batch_size=4, stats=stats)
        monkeypatch.setenv("RANK", str(rank))
        loader = latent_loader("s3://latents/buckets/train/*.tar", num_workers=2, normalize="none", shuffle=8,
                               batch_size=4, stats="s3://latents/buckets/stats.json")
        loader.set_epoch(1)
        there = list(loader)
        assert [(tuple(b["latent"].shape), b["key"]) for b in there] == [
            (tuple(b["latent"].shape), b["key"]) for b in here
        ] and len({tuple(b["latent"].shape[1:]) for b in there}) == 3


def _shape_of(path) -> list[int]:
    """The latent shape of a shard's first sample."""
    from ldm_vae.samples import LATENT
    from ldm_vae.shards import iter_samples

    return list(LATENT.get(next(iter_samples([str(path)])), "mean").shape)
