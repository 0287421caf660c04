import json
import time
from pathlib import Path

import pytest
import torch

from ldm_vae.encode.encoding import run_encode
from ldm_vae.export import load_vae
from ldm_vae.loader import latent_dataset, latent_loader

from helpers.common import make_params


@pytest.fixture(scope="module")
def latents(pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents")
    stats = run_encode(load_vae(pipeline_dir / "vae"), pipeline_dir / "prepared", out, make_params().encode)
    return out, stats


def test_loader_with_workers_sees_every_sample_once_per_epoch(latents):
    out, stats = latents
    loader = latent_loader(str(out / "train" / "*.tar"), batch_size=3, num_workers=2,
                           stats=out / "stats.json", shuffle=10)
    keys = [k for batch in loader for k in batch["key"]]
    assert len(keys) == stats["splits"]["train"]["count"] == len(set(keys))


def test_workers_hand_over_packs_that_become_the_same_batches(latents, monkeypatch):
    """A worker sends up to 16 batches at once (latent_batches.py); the trainer still gets the
    batches a DataLoader gives one at a time, in the same order (one from each worker in turn),
    with the latents a loader without workers gives."""
    from ldm_vae import latent_batches

    out, stats = latents
    kw = dict(batch_size=2, stats=out / "stats.json", shuffle=0, sample_posterior=False, flip=False)
    n = stats["splits"]["train"]["count"]
    runs = {}
    for pack in (1, 2):  # 1: every batch its own handover, as without packs; the workers fork: they see it
        monkeypatch.setattr(latent_batches, "PACK_BATCHES", pack)
        runs[pack] = list(latent_loader(str(out / "train" / "*.tar"), num_workers=2, **kw))
    assert n // 2 // 2 > 2  # each worker sends more than one pack
    two = runs[2]
    assert [b["key"] for b in two] == [b["key"] for b in runs[1]]
    assert sum(len(b["key"]) for b in two) == n and all(len(b["key"]) == 2 for b in two[:-2])
    assert all(b["latent"].shape[0] == len(b["key"]) == b["label"].shape[0] == b["time_ids"].shape[0] for b in two)
    z = {k: b["latent"][i] for b in latent_loader(str(out / "train" / "*.tar"), num_workers=0, **kw)
         for i, k in enumerate(b["key"])}
    assert all(torch.equal(b["latent"][i], z[k]) for b in two for i, k in enumerate(b["key"]))


def test_reused_worker_memory_never_changes_a_batch_the_trainer_still_holds(latents, monkeypatch, tmp_path):
    """Workers collate into shared-memory blocks they reuse once the trainer's process has dropped
    every tensor on one (latent_batches.py). Batches (and a numpy view of one) kept through the
    epoch keep their values; the blocks dropped are written again, not made anew."""
    import numpy as np

    from ldm_vae import latent_batches

    out, stats = latents
    made = tmp_path / "blocks"
    new_shared = torch.UntypedStorage._new_shared

    def counted(size, *args, **kw):  # the workers fork: they see this, and append to the file
        with open(made, "a") as f:
            f.write(f"{size}\n")
        return new_shared(size, *args, **kw)

    monkeypatch.setattr(torch.UntypedStorage, "_new_shared", counted)
    monkeypatch.setattr(latent_batches, "PACK_BATCHES", 1)  # a block a batch: many blocks
    loader = latent_loader(str(out / "train" / "*.tar"), batch_size=1, num_workers=2, stats=out / "stats.json",
                           shuffle=0)
    kept, seen = [], []
    for epoch in range(3):
        loader.set_epoch(epoch)
        for batch in loader:
            seen.append(batch["latent"].clone())
            if len(seen) <= 2:
                kept.append(batch["latent"])
            elif len(seen) == 3:
                kept.append(batch["latent"].numpy())  # the tensor itself dropped: the view must keep the block
    assert len(seen) == 3 * stats["splits"]["train"]["count"]
    assert all(np.array_equal(np.asarray(k), seen[i].numpy()) for i, k in enumerate(kept))
    fresh = [int(x) for x in made.read_text().split()].count(latent_batches.PACK_BYTES)
    assert fresh <= 2 * latent_batches.POOL_BLOCKS < len(seen)


def test_the_batch_draws_the_noise_each_item_would(latents):
    """Posterior sampling runs per batch; from one RNG state the numbers equal per-item draws (the
    denoising probe's figures did not move when the loader went batch-wise)."""
    import numpy as np

    from ldm_vae.latent_batches import Collate, ToRaw
    from ldm_vae.shards import iter_samples, shard_paths

    out, _ = latents
    raws = [ToRaw(True, False)(s) for s in iter_samples(shard_paths(out / "val"))]
    collate = Collate(True, lambda z: z * 2.0)
    torch.manual_seed(7)
    per_item = np.concatenate([collate([r])["latent"] for r in raws])
    torch.manual_seed(7)
    batched = collate(raws)["latent"]
    assert len(raws) > 1 and np.array_equal(per_item, batched)


def test_mean_and_channel_normalisation(latents):
    out, stats = latents
    ds = latent_dataset(str(out / "train" / "*.tar"), sample_posterior=False, normalize="channel",
                        stats=out / "stats.json", shuffle=0)
    z = torch.stack([item["latent"] for item in ds])  # [N, C, h, w]
    # Means only (no posterior noise): per-channel mean ~0; std <= 1 (the posterior variance is excluded).
    assert z.transpose(0, 1).flatten(1).mean(1).abs().max() < 1e-2
    assert z.transpose(0, 1).flatten(1).std(1).max() <= 1.01


def test_posterior_sampling_and_vae_normalisation(latents, pipeline_dir):
    out, _ = latents
    a = [i["latent"] for i in latent_dataset(str(out / "val" / "*.tar"), normalize="vae",
                                             vae_config=pipeline_dir / "vae", shuffle=0, seed=1)]
    b = [i["latent"] for i in latent_dataset(str(out / "val" / "*.tar"), normalize="none", shuffle=0)]
    cfg = json.loads((pipeline_dir / "vae" / "config.json").read_text())
    assert not torch.equal(a[0], (b[0] - cfg["shift_factor"]) * cfg["scaling_factor"])  # sampled twice
    assert a[0].shape == b[0].shape


def test_bad_normalisation_is_a_clear_error(latents):
    out, _ = latents
    with pytest.raises(ValueError, match="allowed: channel, vae, none"):
        latent_dataset(str(out / "val" / "*.tar"), normalize="minmax")
    with pytest.raises(ValueError, match="needs stats="):
        latent_dataset(str(out / "val" / "*.tar"), normalize="channel")


def regroup(latents_dir, dst, n_shards):
    """The same latent samples in exactly ``n_shards`` shards."""
    from ldm_vae.shards import ShardWriter, iter_samples, shard_paths

    samples = list(iter_samples(shard_paths(latents_dir)))
    per = -(-len(samples) // n_shards)
    with ShardWriter(dst, "x", per) as w:
        for s in samples:
            w.write({k: v for k, v in s.items() if k.startswith("__key__") or "." in k or k in ("json",)})
    return [s["__key__"] for s in samples]


@pytest.mark.parametrize("n_shards", [3, 7])
def test_two_ranks_two_workers_equal_batches_every_sample_at_most_once(latents, tmp_path, monkeypatch, n_shards):
    out, _ = latents
    keys = regroup(out / "train", tmp_path, n_shards)  # 3 shards < 2 ranks x 2 workers
    left_out = []
    for epoch in range(2):
        seen, batches = [], []
        for rank in range(2):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", "2")
            loader = latent_loader(str(tmp_path / "*.tar"), batch_size=4, num_workers=2, normalize="none", shuffle=20)
            loader.set_epoch(epoch)
            mine = [list(batch["key"]) for batch in loader]
            batches.append(len(mine))
            seen += [k for b in mine for k in b]
        assert batches[0] == batches[1]  # DDP: no rank waits at a step the other never reaches
        assert len(seen) == len(set(seen)) == len(keys) - len(keys) % 2  # each sample at most once
        left_out.append(set(keys) - set(seen))
    if len(keys) % 2:
        assert left_out[0] != left_out[1]  # the sample left out changes with the epoch


def test_epoch_order_changes_with_set_epoch_and_repeats_with_it(latents):
    out, _ = latents
    loader = latent_loader(str(out / "train" / "*.tar"), batch_size=8, num_workers=2, normalize="none", shuffle=50,
                           stats=out / "stats.json")
    orders = []
    for epoch in (0, 1, 0):
        loader.set_epoch(epoch)  # persistent workers see it
        orders.append([k for batch in loader for k in batch["key"]])
    assert orders[0] == orders[2] != orders[1]
    assert sorted(orders[0]) == sorted(orders[1])


def test_uneven_shards_in_real_ddp_finish(latents, tmp_path):
    """Two gloo processes, an all-reduce per batch (what DDP does), shards of 1 and up to 40 samples:
    the ranks must get the same number of batches, or one would wait for ever."""
    import subprocess
    import sys

    from ldm_vae.shards import ShardWriter, iter_samples, shard_paths

    samples = list(iter_samples(shard_paths(out_dir := latents[0] / "train")))[:41]
    for name, part in (("a", samples[:1]), ("b", samples[1:])):
        with ShardWriter(tmp_path / "shards", name, 1000) as w:
            for s in part:
                w.write({k: v for k, v in s.items() if k == "__key__" or "." in k})
    assert out_dir.exists()
    result = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "helpers" / "ddp_consumer.py"), str(tmp_path / "shards")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(reports) == 2 and reports[0]["batches"] == reports[1]["batches"] > 0
    total = len(samples)
    assert total >= 9 and reports[0]["seen"] + reports[1]["seen"] == total - total % 2  # an odd one sits out


def test_resampled_mode_is_endless(latents):
    import itertools

    out, stats = latents
    ds = latent_dataset(str(out / "val" / "*.tar"), normalize="none", resampled=True, shuffle=5)
    items = list(itertools.islice(iter(ds), 3 * stats["splits"]["val"]["count"]))
    assert len(items) == 3 * stats["splits"]["val"]["count"]


def test_random_flip_choice_and_decode_helper(pipeline_dir, tmp_path):
    from ldm_vae.config import EncodeConfig
    from ldm_vae.loader import decode_latents

    vae = load_vae(pipeline_dir / "vae")
    run_encode(vae, pipeline_dir / "prepared", tmp_path, EncodeConfig(flip=True))
    means = {}
    for seed in range(6):
        for item in latent_dataset(str(tmp_path / "val" / "*.tar"), sample_posterior=False, normalize="none",
                                   shuffle=0, seed=seed):
            means.setdefault(item["key"], set()).add(item["latent"].sum().item())
    assert sum(len(v) == 2 for v in means.values()) > len(means) // 2  # both views get picked

    batch = next(iter(latent_loader(str(tmp_path / "val" / "*.tar"), batch_size=4, num_workers=0,
                                    sample_posterior=False, flip=False, stats=tmp_path / "stats.json")))
    images = decode_latents(vae, batch["latent"], "channel", tmp_path / "stats.json")
    assert images.shape == (4, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    import numpy as np

    from ldm_vae.samples import npy_load
    from ldm_vae.shards import iter_samples, shard_paths

    raw = {s["__key__"]: npy_load(s["mean.npy"]) for s in iter_samples(shard_paths(tmp_path / "val"))}
    z = torch.from_numpy(raw[batch["key"][0]].astype(np.float32))[None]
    with torch.no_grad():
        direct = (vae.decode(z).sample.clamp(-1, 1) + 1) / 2
    assert torch.allclose(images[:1], direct, atol=1e-4)  # normalise -> decode_latents == decoding the raw latent


def test_a_stale_count_fails_naming_the_shard(latents):
    """A shard with fewer samples than its count would give one rank fewer batches (a DDP hang
    later): the loader stops at once, naming it."""
    out, stats = latents
    name = stats["splits"]["val"]["shards"][0].rsplit("/", 1)[-1]
    real = stats["splits"]["val"]["shard_counts"][stats["splits"]["val"]["shards"][0]]
    ds = latent_dataset(str(out / "val" / "*.tar"), normalize="none", shuffle=0, counts={name: real + 5})
    with pytest.raises(ValueError, match=f"{name}.*fewer samples than its count"):
        list(ds)


def test_loader_streams_from_s3_as_from_local_files(latents, s3_env, monkeypatch):
    """The shards and stats.json uploaded to a real S3 server (a prefix, no local copy): under 2
    ranks x 2 workers every rank gets the same batches, in the same order, as from local files."""
    from ldm_vae.s3 import publish

    out, _ = latents
    s3_env.make_bucket("latents")
    published = publish(out, "s3://latents/run1")  # what the README's publish command runs
    assert "s3://latents/run1/stats.json" in published and not [u for u in published if "/.done/" in u]
    local = dict(shards=str(out / "train" / "*.tar"), stats=out / "stats.json")
    remote = dict(shards="s3://latents/run1/train/", stats="s3://latents/run1/stats.json")
    orders, took = {}, {}
    for where, args in (("local", local), ("s3", remote)):
        start = time.monotonic()
        for epoch in (0, 1):
            for rank in range(2):
                monkeypatch.setenv("RANK", str(rank))
                monkeypatch.setenv("WORLD_SIZE", "2")
                loader = latent_loader(args["shards"], stats=args["stats"], batch_size=4, num_workers=2,
                                       sample_posterior=False, flip=False, shuffle=20)
                loader.set_epoch(epoch)
                orders[where, epoch, rank] = [(k, b["latent"][i].sum().item()) for b in loader
                                              for i, k in enumerate(b["key"])]
        took[where] = round(time.monotonic() - start, 1)
    print(f"4 epochs x ranks of the loader: {took} s")
    for key, got in orders.items():
        if key[0] == "s3":
            assert got == orders[("local",) + key[1:]] and got  # same samples, order and values
    for epoch in (0, 1):
        a, b = ([k for k, _ in orders["s3", epoch, r]] for r in (0, 1))
        assert len(a) == len(b) and not set(a) & set(b)  # equal shares, no sample twice
    assert orders["s3", 0, 0] != orders["s3", 1, 0]  # set_epoch reshuffles
