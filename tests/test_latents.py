import json

import numpy as np
import pytest
import torch

from conftest import make_params
from ldm_vae.data import image_bytes, to_tensor
from ldm_vae.export import load_vae
from ldm_vae.images import decode_uint8
from ldm_vae.latents import npy_load, run_encode
from ldm_vae.shards import iter_samples, shard_paths


@pytest.fixture(scope="module")
def encoded(pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents")
    vae = load_vae(pipeline_dir / "vae")
    stats = run_encode(vae, pipeline_dir / "prepared", out, make_params().encode)
    return vae, out, stats


def test_every_prepared_sample_encoded_exactly_once(pipeline_dir, encoded):
    _, out, stats = encoded
    for split in ("train", "val"):
        prepared = [s["__key__"] for s in iter_samples(shard_paths(pipeline_dir / "prepared" / split))]
        latent = [s["__key__"] for s in iter_samples(shard_paths(out / split))]
        assert sorted(latent) == sorted(prepared) and len(set(latent)) == len(latent)
        assert stats["splits"][split]["count"] == len(prepared)
        assert all(n.startswith(f"{split}/{split}-r000-") for n in stats["splits"][split]["shards"])


def test_latent_sample_contract(pipeline_dir, encoded):
    vae, out, stats = encoded
    sample = next(iter(iter_samples(shard_paths(out / "val"))))
    mean, std = npy_load(sample["mean.npy"]), npy_load(sample["std.npy"])
    assert mean.dtype == np.float16 and std.dtype == np.float16
    assert mean.shape == std.shape == (4, 4, 4) and (std > 0).all()
    meta = json.loads(sample["json"])
    assert meta["key"] == sample["__key__"] and meta["resolution"] == 32 and "crop_box" in meta
    # The stored mean is the raw posterior mean of the prepared image with the same key.
    ref = next(s for s in iter_samples(shard_paths(pipeline_dir / "prepared" / "val"))
               if s["__key__"] == sample["__key__"])
    with torch.inference_mode():
        fresh = vae.encode(to_tensor(decode_uint8(image_bytes(ref)))[None]).latent_dist.mean[0]
    assert np.allclose(mean.astype(np.float32), fresh.numpy(), atol=2e-3, rtol=2e-3)


def test_stats_are_exact_over_train_split(encoded):
    _, out, stats = encoded
    means, stds = [], []
    for s in iter_samples(shard_paths(out / "train")):
        means.append(npy_load(s["mean.npy"]).astype(np.float64))
        stds.append(npy_load(s["std.npy"]).astype(np.float64))
    m, sd = np.stack(means), np.stack(stds)  # [N, C, h, w]
    channel_var = (sd**2).mean(axis=(0, 2, 3)) + m.var(axis=(0, 2, 3))
    assert np.allclose(stats["channel_mean"], m.mean(axis=(0, 2, 3)), atol=1e-9)
    assert np.allclose(stats["channel_std"], np.sqrt(channel_var), atol=1e-9)
    global_var = (sd**2).mean() + m.var()
    assert abs(stats["std"] - np.sqrt(global_var)) < 1e-9
    assert abs(stats["scaling_factor"] - 1 / np.sqrt(global_var)) < 1e-6
    assert stats["channels"] == 4 and stats["latent_shape"] == [4, 4, 4]
