"""Aspect-ratio buckets through the real `dvc repro`, as a text-to-image user runs it: photographs of
mixed aspect ratios served over HTTP, listed with captions (and two bad rows), become bucketed
shards and latents with no sample lost, each latent the shape of its bucket / 8, scored per bucket
and probed with the default probe params; the loader gives one shape a batch with SDXL's size
conditioning and the captions, and the example trains a text- and size-conditioned UNet on them."""

import csv
import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import yaml
from PIL import Image

from ldm_vae.ingest.sources import builtin_files
from ldm_vae.loader import latent_loader
from ldm_vae.samples import LATENT, PREPARED
from ldm_vae.shards import iter_samples, shard_paths

from helpers.common import ROOT, TINY, copy_repo
from helpers.httpserver import ImageServer, Route

ASPECTS = [(2, 1), (1, 2), (4, 3), (3, 4), (1, 1), (3, 1), (16, 9)]  # width : height
BUCKETS = {"data": {"crop": "bucket", "crops_per_image": 1, "val_crops_per_image": 1, "resolution": 64,
                    "bucket_step": 16, "bucket_max_ratio": 2.0, "val_fraction": 0.3},
           "train": {"crop_size": 32}}


def mixed_aspect_folder(root):
    """The builtin photographs, each cut to one of ASPECTS (centred, the largest such box) and
    shrunk to at most 160 px: real pictures, every aspect ratio several times."""
    root.mkdir(parents=True)
    for i, f in enumerate(builtin_files()):
        key = f.key
        with Image.open(f.path) as img:
            img = img.convert("RGB")
        aw, ah = ASPECTS[i % len(ASPECTS)]
        scale = min(img.width / aw, img.height / ah)
        w, h = int(aw * scale), int(ah * scale)
        img = img.crop(
            ((img.width - w) // 2, (img.height - h) // 2, (img.width - w) // 2 + w, (img.height - h) // 2 + h)
        )
        img.thumbnail((160, 160), Image.LANCZOS)
        img.save(root / f"{key}.{'jpg' if i % 2 else 'png'}", quality=95)
    return root


def caption(name: str) -> str:
    """'skimage-coffee.png' -> 'a photograph of coffee': words the example's text encoder can learn."""
    return "a photograph of " + name.split("-", 1)[1].rsplit(".", 1)[0].replace("_", " ")


@pytest.fixture(scope="module")
def bucket_repo(tmp_path_factory):
    dst, env = copy_repo(tmp_path_factory.mktemp("repo"))
    folder = mixed_aspect_folder(tmp_path_factory.mktemp("photos") / "mixed")
    server = ImageServer()
    rows = []
    for path in sorted(folder.iterdir()):
        server.routes[f"/{path.name}"] = Route(path.read_bytes(), content_type=f"image/{path.suffix[1:]}")
        # A key column: without one a URL's key hashes the URL, whose port changes run to run,
        # and with it the train/val split.
        rows.append({"key": path.stem, "url": f"{server.url}/{path.name}", "caption": caption(path.name)})
    server.routes["/broken.jpg"] = Route(b"not an image", content_type="image/jpeg")
    rows += [{"key": "gone", "url": f"{server.url}/gone.jpg", "caption": "a 404"},
             {"key": "broken", "url": f"{server.url}/broken.jpg", "caption": "x"}]
    with open(dst / "captions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["key", "url", "caption"])
        w.writeheader()
        w.writerows(rows)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        if section != "probe":  # the probe as a user gets it: its default params must finish on buckets
            params[section].update(values)
    for section, values in BUCKETS.items():
        params[section].update(values)
    params["data"]["source"] = "urls:captions.csv"
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.run(["dvc", "repro"], cwd=dst, env=env, capture_output=True, text=True)
    server.close()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return dst, proc.stdout


def test_no_sample_lost_and_every_latent_is_its_bucket_over_8(bucket_repo):
    repo, out = bucket_repo
    raw = [json.loads(line) for line in (repo / "data/raw/manifest.jsonl").read_text().splitlines()]
    raw_keys = [r["key"] for r in raw]
    assert len(raw_keys) == len(builtin_files())
    reasons = Counter(
        json.loads(line)["reason"] for line in (repo / "data/raw/rejected.jsonl").read_text().splitlines()
    )
    assert reasons == {"http_404": 1, "not_an_image": 1}, reasons
    prepared, latents, buckets = [], [], Counter()
    for split in ("train", "val"):
        for path in shard_paths(repo / "data/prepared" / split):
            metas = [PREPARED.get(s, "meta") for s in iter_samples([path])]
            shapes = {tuple(m["target_size"]) for m in metas}
            assert len(shapes) == 1, path  # one bucket a shard, named by it
            (h, w), = shapes
            assert f"-{w}x{h}-" in path
            prepared += [m["key"] for m in metas]
        for s in iter_samples(shard_paths(repo / "data/latents" / split)):
            meta = LATENT.get(s, "meta")
            h, w = meta["target_size"]
            assert LATENT.get(s, "mean").shape == LATENT.get(s, "std").shape == (4, h // 8, w // 8)
            latents.append(s["__key__"])
            if split == "train":
                buckets[f"{w}x{h}"] += 1
    assert sorted(prepared) == sorted(latents) == sorted(raw_keys)  # every image once, in its bucket
    stats = json.loads((repo / "data/latents/stats.json").read_text())
    assert stats["splits"]["train"]["buckets"] == dict(buckets) and len(buckets) == 3
    # No single shape where there are several: latent_shapes gives each with its train latents.
    assert stats["latent_shape"] is None
    assert {f"{8 * s['shape'][2]}x{8 * s['shape'][1]}": s["count"] for s in stats["latent_shapes"]} == dict(buckets)
    assert [s["count"] for s in stats["latent_shapes"]] == sorted(buckets.values(), reverse=True)
    assert "latents in 3 shapes (latent_shapes)" in out
    counts = json.loads((repo / "data/prepared/counts.json").read_text())
    assert counts["train"]["buckets"] == dict(sorted(buckets.items()))
    assert "buckets (WxH: samples)" in out and "train buckets (WxH: latents)" in out
    # Each of the small per-bucket shards ends in a partial batch: the stage says how full they were.
    assert 0 < stats["batch_fill"] < 1 and "encode batches" in out and "% full on average" in out


def test_evaluate_reports_each_bucket_and_shows_images_whole(bucket_repo):
    repo, _ = bucket_repo
    metrics = json.loads((repo / "data/eval/details.json").read_text())
    per_bucket = metrics["buckets"]
    assert sum(b["count"] for b in per_bucket.values()) == metrics["num_images"]
    with open(repo / "data/eval/per_image.csv") as f:
        rows = list(csv.DictReader(f))
    for name, b in per_bucket.items():
        mine = [float(r["psnr"]) for r in rows if r["bucket"] == name]
        assert len(mine) == b["count"] and np.isclose(np.mean(mine), b["psnr"], atol=1e-3)
    assert np.isclose(np.mean([float(r["psnr"]) for r in rows]), metrics["psnr"], atol=1e-3)
    with Image.open(repo / "data/eval/recon_grid.png") as grid:
        assert grid.size[0] > grid.size[1] / 4  # a grid of whole images, not a failure placeholder


def test_the_probe_finishes_on_buckets_with_its_default_params(bucket_repo):
    repo, out = bucket_repo
    params = yaml.safe_load((repo / "params.yaml").read_text())["probe"]
    assert params == yaml.safe_load((ROOT / "params.yaml").read_text())["probe"]  # the defaults
    details = json.loads((repo / "data/probe/details.json").read_text())
    # Fewer train latents per bucket than a batch of 64: the probe trains on each bucket's partial batches.
    assert details["probe_steps"] == params["steps"] and details["probe_partial_batches"] is True
    assert 0 < details["denoise_loss"] < 1.5 and "partial batches" in out


def test_the_loader_gives_one_bucket_a_batch_with_size_conditioning(bucket_repo):
    repo, _ = bucket_repo
    metas = {s["__key__"]: LATENT.get(s, "meta") for s in iter_samples(shard_paths(repo / "data/latents/train"))}
    captions = {s["__key__"]: LATENT.get(s, "caption") for s in iter_samples(shard_paths(repo / "data/latents/train"))}
    loader = latent_loader(str(repo / "data/latents/train/*.tar"), stats=repo / "data/latents/stats.json",
                           batch_size=3, num_workers=2)
    seen = []
    for batch in loader:
        for i, key in enumerate(batch["key"]):
            m = metas[key]
            assert batch["latent"].shape[2:] == (m["target_size"][0] // 8, m["target_size"][1] // 8)
            assert batch["time_ids"][i].tolist() == m["original_size"] + m["crop_top_left"] + m["target_size"]
            assert batch["caption"][i] == captions[key] and captions[key].startswith("a photograph of ")
        seen += batch["key"]
    assert sorted(seen) == sorted(metas)


def test_a_text_and_size_conditioned_unet_learns_and_samples_each_bucket_and_caption(bucket_repo, tmp_path):
    repo, _ = bucket_repo
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "train_diffusion.py"), "--latents",
                           str(repo / "data/latents"), "--vae", str(repo / "data/vae"), "--out", str(out),
                           "--steps", "60", "--batch-size", "3", "--lr", "1e-3", "--num-workers", "1", "--widths",
                           "32", "64", "--sample-steps", "3", "--samples", "2", "--sample-captions", "3",
                           "--text-dim", "32", "--text-cond", "--size-cond"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    loss = json.loads((out / "loss.json").read_text())["loss"]
    assert len(loss) == 60 and np.all(np.isfinite(loss))
    assert np.mean(loss[-15:]) < 0.75 * np.mean(loss[:15]), (loss[:15], loss[-15:])
    stats = json.loads((repo / "data/latents/stats.json").read_text())
    grids = json.loads((out / "samples.json").read_text())["grids"]
    assert [g["latent_shape"] for g in grids] == [s["shape"] for s in stats["latent_shapes"]]  # every bucket
    for g in grids:
        _, h, w = g["latent_shape"]
        assert len(g["rows"]) == 3 and all(r.startswith("a photograph of ") for r in g["rows"])  # a row a caption
        with Image.open(out / g["file"]) as grid:
            assert grid.size == (2 * 8 * w, 3 * 8 * h)
    assert (out / "unet" / "config.json").is_file() and (out / "conditioning.safetensors").is_file()
    config = json.loads((out / "unet" / "config.json").read_text())
    assert config["_class_name"] == "UNet2DConditionModel" and config["addition_embed_type"] == "text_time"
