"""VQ token shards: encode's tokens and code histogram, the token loader under DDP ranks and workers,
evaluate's codebook report, and a tiny MaskGIT-style model trained on the tokens (the example)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from ldm_vae.encode.encoding import run_encode
from ldm_vae.export import load_vae
from ldm_vae.shards import iter_samples, shard_paths
from ldm_vae.token_batches import token_loader
from ldm_vae.train.training import train

from helpers.common import ROOT, make_params

K = 64


@pytest.fixture(scope="module")
def tokens(pipeline_dir, tmp_path_factory):
    """A 6-step VQ run on the session's prepared photos, encoded (with flips) into token shards."""
    base = tmp_path_factory.mktemp("vq")
    params = make_params(model={"regularizer": "vq", "codebook_size": K}, encode={"flip": True, "prequant": True})
    train(params, shard_paths(pipeline_dir / "prepared" / "train"), shard_paths(pipeline_dir / "prepared" / "val"),
          base / "vae", base / "logs", base / "ckpt")
    stats = run_encode(load_vae(base / "vae"), pipeline_dir / "prepared", base / "latents", params.encode)
    return base, stats


def test_encode_writes_tokens_and_the_train_histogram(tokens):
    base, stats = tokens
    assert stats["regularizer"] == "vq" and stats["codebook_size"] == K and len(stats["code_histogram"]) == K
    n = stats["splits"]["train"]["count"]
    assert sum(stats["code_histogram"]) == n * 4 * 4  # 32 px images: 4 x 4 tokens each
    assert 0 < stats["usage"] <= 1 and 1 <= stats["perplexity"] <= K and stats["bits_per_token"] == 6
    s = next(iter_samples(shard_paths(base / "latents" / "train")))
    from ldm_vae.samples import LATENT

    t, flip, pre = LATENT.get(s, "tokens"), LATENT.get(s, "tokens_flip"), LATENT.get(s, "prequant")
    assert t.dtype == np.uint8 and t.shape == (4, 4) and flip.shape == (4, 4) and pre.shape == (4, 4, 4)
    assert "mean.npy" not in s and "prequant_flip.npy" not in s


def test_a_latent_sample_holds_one_kind_of_latent():
    from ldm_vae.samples import LATENT

    z = np.zeros((4, 2, 2), np.float16)
    with pytest.raises(ValueError, match="exactly one of mean\\+std or tokens"):
        LATENT.build("k", meta={}, mean=z, std=z, tokens=np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="tokens must be tokens"):
        LATENT.build("k", tokens=np.zeros((2, 2), np.int32), meta={})


def test_each_loader_refuses_the_other_kind_with_the_fix(tokens, latents_kl):
    from ldm_vae.loader import latent_loader

    base, _ = tokens
    with pytest.raises(Exception, match="VQ tokens: read them with token_loader"):
        next(iter(latent_loader(str(base / "latents" / "val" / "*.tar"), batch_size=2, num_workers=0,
                                normalize="none")))
    with pytest.raises(Exception, match="KL latents .*: read them with latent_loader"):
        next(iter(token_loader(str(latents_kl / "val" / "*.tar"), batch_size=2, num_workers=0)))


@pytest.fixture(scope="module")
def latents_kl(pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("kl")
    run_encode(load_vae(pipeline_dir / "vae"), pipeline_dir / "prepared", out, make_params().encode)
    return out


def test_two_ranks_two_workers_get_equal_token_batches_every_sample_at_most_once(tokens, monkeypatch):
    base, stats = tokens
    keys = [s["__key__"] for s in iter_samples(shard_paths(base / "latents" / "train"))]
    for epoch in range(2):
        seen, batches = [], []
        for rank in range(2):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", "2")
            loader = token_loader(str(base / "latents" / "train" / "*.tar"), batch_size=3, num_workers=2,
                                  shuffle=20, stats=base / "latents" / "stats.json")
            loader.set_epoch(epoch)
            mine = list(loader)
            assert all(b["tokens"].dtype == torch.long and b["tokens"].shape[1:] == (4, 4) for b in mine)
            assert all(int(b["tokens"].max()) < K and b["time_ids"].shape == (len(b["key"]), 6) for b in mine)
            batches.append(len(mine))
            seen += [k for b in mine for k in b["key"]]
        assert batches[0] == batches[1]  # DDP: no rank waits at a step the other never reaches
        assert len(seen) == len(set(seen)) >= len(keys) - 2 * 2  # each at most once, at most W - 1 left out a rank


def test_the_maskgit_example_lowers_its_loss_and_decodes_a_grid(tokens, tmp_path):
    """examples/maskgit_tokens.py: a tiny masked-token transformer on the token shards; its loss
    falls over a few dozen steps, and its sampled tokens decode through the exported VQModel."""
    base, _ = tokens
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "maskgit_tokens.py"), "--latents",
                          str(base / "latents"), "--vae", str(base / "vae"), "--steps", "40", "--out",
                          str(tmp_path / "grid.png")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["loss_last"] < report["loss_first"]
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size[0] >= 4 * 32


def test_token_buckets_give_one_shape_a_batch_and_equal_batches_on_two_ranks(tmp_path, monkeypatch):
    """Token shards of three shapes (aspect-ratio buckets, as encode writes them: one shape a shard)
    under 2 ranks x 2 workers: every batch one shape, the same number of batches on both ranks, each
    sample at most once."""
    from ldm_vae.samples import npy_bytes
    from ldm_vae.shards import ShardWriter

    shapes = {(4, 8): 19, (8, 4): 13, (4, 4): 7}
    rng = np.random.default_rng(0)
    for b, (shape, n) in enumerate(shapes.items()):
        with ShardWriter(tmp_path, f"train-b{b}", 4) as w:
            for i in range(n):
                meta = {"key": f"b{b}-{i}", "latent_shape": [4, *shape]}
                w.write({"__key__": f"b{b}-{i}", "tokens.npy": npy_bytes(rng.integers(0, K, shape, dtype=np.uint16)),
                         "json": json.dumps(meta).encode()})
    seen, counts = [], []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        batches = list(token_loader(str(tmp_path / "*.tar"), batch_size=3, num_workers=2, shuffle=5))
        assert all(tuple(b["tokens"].shape[1:]) in shapes for b in batches)
        counts.append(len(batches))
        seen += [k for b in batches for k in b["key"]]
    assert counts[0] == counts[1] and len(seen) == len(set(seen)) >= sum(shapes.values()) - 2 * 2 * len(shapes)


def test_the_token_loader_gives_folder_labels(tokens, tmp_path):
    """data.labels through download, prepare and a VQ encode: token batches carry each image's class."""
    from ldm_vae.ingest.download import read_manifest, run_download
    from ldm_vae.ingest.prepare import run_prepare
    from ldm_vae.samples import LATENT

    from helpers.common import imagenet_tree

    base, _ = tokens
    params = make_params(data={"source": f"folder:{imagenet_tree(tmp_path / 'train')}", "labels": "folder"})
    run_download(params.data, tmp_path / "raw")
    run_prepare(params.data, tmp_path / "raw", tmp_path / "prepared")
    run_encode(load_vae(base / "vae"), tmp_path / "prepared", tmp_path / "latents", params.encode)
    label_of = {r["key"]: r["label"] for r in read_manifest(tmp_path / "raw")}
    raw_key = {
        s["__key__"]: LATENT.get(s, "meta")["raw_key"]
        for s in iter_samples(shard_paths(tmp_path / "latents" / "train"))
    }
    loader = token_loader(str(tmp_path / "latents" / "train" / "*.tar"), batch_size=2, num_workers=0,
                          stats=tmp_path / "latents" / "stats.json")
    got = [(key, label) for batch in loader for key, label in zip(batch["key"], batch["label"].tolist())]
    assert got and all(label == label_of[raw_key[key]] for key, label in got)
