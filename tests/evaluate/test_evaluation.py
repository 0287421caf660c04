import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_vae.encode.encoding import run_encode
from ldm_vae.evaluate.evaluation import _Kept, run_evaluate
from ldm_vae.export import load_vae
from ldm_vae.samples import PREPARED
from ldm_vae.shards import iter_samples, shard_paths

from helpers.common import make_params


@pytest.fixture(scope="module")
def evaluated(pipeline_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("eval")
    vae = load_vae(pipeline_dir / "vae")
    stats = run_encode(vae, pipeline_dir / "prepared", base / "latents", make_params().encode)
    metrics = run_evaluate(vae, base / "latents" / "val", pipeline_dir / "prepared" / "val", base / "eval",
                           make_params().evaluate, stats)
    return base, metrics, stats


def test_metrics_json_and_per_image_csv_agree(evaluated):
    base, metrics, stats = evaluated
    assert json.loads((base / "eval" / "details.json").read_text()) == metrics
    # metrics.json (what `dvc metrics show` prints): the headline, short names, rounded.
    headline = json.loads((base / "eval" / "metrics.json").read_text())
    assert set(headline) == {"psnr", "ssim", "psnr_bicubic", "fp16_db", "rate_bpp", "hf_share", "collapsed"}
    assert headline["psnr"] == round(metrics["psnr"], 3) and headline["collapsed"] == metrics["collapsed_channels"]
    rows = list(csv.DictReader(open(base / "eval" / "per_image.csv")))
    assert len(rows) == metrics["num_images"] == stats["splits"]["val"]["count"]
    assert abs(sum(float(r["psnr"]) for r in rows) / len(rows) - metrics["psnr"]) < 1e-3
    assert {"psnr", "ssim", "psnr_bicubic", "ssim_bicubic", "num_images", "latent_std", "exact_scaling_factor"} <= set(
        metrics
    )
    assert 0 < metrics["ssim"] <= 1 and metrics["compression_ratio"] == 48.0
    # The rate beside the distortion: bits per image pixel, the sum of the channels' rates.
    assert metrics["rate_bpp"] == pytest.approx(sum(metrics[f"latent_c{c:02d}_rate_bpp"] for c in range(4)))
    assert metrics["rate_bpp"] > 0 and 10 * np.log10(1 / metrics["mse"]) <= metrics["psnr"] + 1e-6  # mean of PSNRs
    assert 0 < metrics["latent_hf_share"] < 1 and 0 < metrics["image_hf_share"] < 1
    assert (base / "eval" / "spectrum.png").stat().st_size > 1000


def test_recon_grids_are_enlarged_labelled_and_captioned(evaluated, pipeline_dir):
    base, metrics, _ = evaluated
    photos = {PREPARED.get(s, "meta")["raw_key"] for s in iter_samples(shard_paths(pipeline_dir / "prepared" / "val"))}
    grid = make_params().evaluate.grid_images
    # recon_worst.png: one row per photograph (its worst crop), so no more rows than photographs.
    for name, n in (("recon_grid.png", min(grid, metrics["num_images"])), ("recon_worst.png", min(grid, len(photos)))):
        img = np.asarray(Image.open(base / "eval" / name).convert("L"))
        # 32 px tiles enlarged 6x to 192 (nearest: 6x6 blocks of one value), 4 px gaps, a title
        # band of 20 px over the columns and a caption line of 20 px under each tile.
        assert img.shape == (20 + n * (192 + 20 + 4) + 4, 3 * (192 + 4) + 4), name
        tile = img[24:24 + 192, 4:4 + 192]
        assert (tile[::6, ::6].repeat(6, 0).repeat(6, 1) == tile).all()
        assert (img[:20] < 128).any()  # the column titles
        for i in range(n):  # the original's key and the reconstruction's PSNR under each row
            y = 24 + i * 216 + 192
            assert (img[y:y + 20, 4:196] < 128).any() and (img[y:y + 20, 200:392] < 128).any()
            assert not (img[y:y + 20, 396:588] < 128).any()  # the error column has no caption


def test_the_worst_grid_shows_the_worst_crop_of_each_of_the_worst_photographs():
    kept = _Kept(2)
    t = torch.zeros(3, 3, 8, 8)
    scores = {"psnr": torch.tensor([20.0, 18.0, 17.0])}
    kept.add(["a-c0", "a-c1", "b-c0"], ["a", "a", "b"], t, t, scores)  # a: 18, b: 17
    kept.add(["c-c0"], ["c"], t[:1], t[:1], {"psnr": torch.tensor([19.0])})  # c: 19, not among the 2
    assert [x.key for x in kept.worst_tiles()] == ["b-c0", "a-c1"]
    kept.add(["c-c1"], ["c"], t[:1], t[:1], {"psnr": torch.tensor([16.0])})  # c comes back, worse
    assert [x.key for x in kept.worst_tiles()] == ["c-c1", "b-c0"]
    assert len(kept.rows) == 5 and [x.key for x in kept.first] == ["a-c0", "a-c1"]


def test_missing_latent_fails_loudly(evaluated, pipeline_dir, tmp_path):
    base, _, stats = evaluated
    shards = sorted((base / "latents" / "val").glob("*.tar"))
    shutil.copytree(base / "latents" / "val", tmp_path / "val")
    if len(shards) > 1:
        (tmp_path / "val" / shards[-1].name).unlink()
    else:
        pytest.skip("one validation shard only")
    with pytest.raises(RuntimeError, match="have no latent"):
        run_evaluate(load_vae(pipeline_dir / "vae"), tmp_path / "val", pipeline_dir / "prepared" / "val",
                     tmp_path / "eval", make_params().evaluate, stats)


def test_fp32_reencode_and_what_fp16_storage_costs(evaluated):
    _, metrics, _ = evaluated
    assert {"psnr_fp32", "ssim_fp32", "psnr_fp16_cost"} <= set(metrics)
    assert metrics["psnr_fp16_cost"] == pytest.approx(metrics["psnr_fp32"] - metrics["psnr"])
    assert abs(metrics["psnr_fp16_cost"]) < 0.1  # float16 latents lose almost nothing


def test_worst_grid_shows_the_worst_crop_of_the_lowest_psnr_photographs_first(evaluated, pipeline_dir):
    from ldm_vae.images import decode_uint8
    from ldm_vae.samples import image_bytes

    base, metrics, _ = evaluated
    prepared = list(iter_samples(shard_paths(pipeline_dir / "prepared/val")))
    refs = {s["__key__"]: decode_uint8(image_bytes(s)) for s in prepared}
    photo_of = {s["__key__"]: PREPARED.get(s, "meta")["raw_key"] for s in prepared}
    worst: dict[str, tuple[float, str]] = {}  # photograph -> (psnr, key) of its worst crop
    for r in csv.DictReader(open(base / "eval" / "per_image.csv")):
        worst[photo_of[r["key"]]] = min(worst.get(photo_of[r["key"]], (1e9, "")), (float(r["psnr"]), r["key"]))
    expected = [key for _, key in sorted(worst.values())][: make_params().evaluate.grid_images]
    grid = np.asarray(Image.open(base / "eval" / "recon_worst.png").convert("RGB"))
    assert grid.shape[0] == 24 + len(expected) * 216
    for i, key in enumerate(expected):
        tile = grid[24 + i * 216: 24 + i * 216 + 192, 4:196]  # row i, column 0: the original, 6x
        assert np.array_equal(tile, refs[key].repeat(6, 0).repeat(6, 1)), (i, key)


def test_latent_health_flags_a_channel_forced_to_the_prior(pipeline_dir, tmp_path):
    import torch

    vae = load_vae(pipeline_dir / "vae")
    c = vae.config.latent_channels
    with torch.no_grad():  # quant_conv's outputs are [means (C), log-variances (C)]: zero channel 1's
        for row in (1, c + 1):
            vae.quant_conv.weight[row].zero_()
            vae.quant_conv.bias[row].zero_()
    stats = run_encode(vae, pipeline_dir / "prepared", tmp_path / "latents", make_params().encode)
    metrics = run_evaluate(vae, tmp_path / "latents" / "val", pipeline_dir / "prepared" / "val", tmp_path / "eval",
                           make_params().evaluate, stats)
    health = list(csv.DictReader(open(tmp_path / "eval" / "latent_health.csv")))
    assert [r["collapsed"] for r in health] == ["False", "True"] + ["False"] * (c - 2)
    assert metrics["collapsed_channels"] == 1 and metrics["latent_c01_kl"] < 1e-3
    assert metrics["latent_c00_kl"] > 1.0 and (tmp_path / "eval" / "latent_health.png").stat().st_size > 1000


@pytest.mark.slow
def test_asking_for_unavailable_lpips_fails_at_once_saying_how(tmp_path):
    import subprocess
    import sys
    import time

    import yaml

    from helpers.common import ROOT, TINY

    params = {k: dict(v) for k, v in TINY.items()}
    params["evaluate"]["lpips"] = True
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    t = time.time()
    env = {**__import__("os").environ, "TORCH_HOME": str(tmp_path / "torch"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "stages/evaluate.py"), "--params", str(tmp_path / "params.yaml"),
                           "--vae", "x", "--latents", "x", "--prepared", "x", "--out", str(tmp_path / "eval")],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode != 0 and time.time() - t < 20
    assert "evaluate.lpips" in proc.stderr and "vgg16-397923af.pth" in proc.stderr
    params["evaluate"].update({"lpips": False, "rfid": True})  # torch-fidelity is not installed here
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, str(ROOT / "stages/evaluate.py"), "--params", str(tmp_path / "params.yaml"),
                           "--vae", "x", "--latents", "x", "--prepared", "x", "--out", str(tmp_path / "eval")],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode != 0 and "evaluate.rfid" in proc.stderr and "pip install -e '.[metrics]'" in proc.stderr


def test_reference_vaes_are_scored_side_by_side_on_the_same_images(evaluated, pipeline_dir, tmp_path):
    """A 16-channel SD3-shaped reference beside the trained 4-channel VAE: its PSNR and SSIM per
    image and on average, its own compression ratio, and a column of its own in the grids."""
    from ldm_vae.evaluate.evaluation import load_references

    from helpers.common import published_vae

    base, ours, stats = evaluated
    params = make_params(evaluate={"references": [str(published_vae(tmp_path / "sd3", "sd3"))]})
    refs = load_references(params.evaluate.references, "cpu")
    assert list(refs) == ["sd3"]
    metrics = run_evaluate(load_vae(pipeline_dir / "vae"), base / "latents" / "val", pipeline_dir / "prepared" / "val",
                           tmp_path / "eval", params.evaluate, stats, refs)
    assert metrics["psnr"] == pytest.approx(ours["psnr"])  # the trained VAE's numbers do not move
    assert metrics["latent_channels_sd3"] == 16 and metrics["compression_ratio_sd3"] == 12.0
    rows = list(csv.DictReader(open(tmp_path / "eval" / "per_image.csv")))
    assert {"psnr_sd3", "ssim_sd3"} <= set(rows[0])
    assert metrics["psnr_sd3"] == pytest.approx(np.mean([float(r["psnr_sd3"]) for r in rows]), abs=1e-4)
    assert metrics["psnr_sd3"] != pytest.approx(metrics["psnr"])  # a different VAE, a different score
    grid = Image.open(tmp_path / "eval" / "recon_grid.png")
    assert grid.size[0] == 4 * (192 + 4) + 4  # original | reconstruction | error | sd3


@pytest.mark.parametrize("references, what", [
    (["a/sd/vae", "b/sd"], "two share the name 'sd'"),
    ([""], "non-empty strings"),
    ("stabilityai/sd-vae-ft-ema", "expected a list"),
])
def test_bad_references_are_refused_in_the_first_second(references, what):
    from ldm_vae.config import ParamError, params_from_dict

    with pytest.raises(ParamError, match="evaluate.references") as e:
        params_from_dict({"evaluate": {"references": references}})
    assert what in str(e.value)
