import csv
import json
import shutil

import pytest
from PIL import Image

from conftest import make_params
from ldm_vae.evaluation import run_evaluate
from ldm_vae.export import load_vae
from ldm_vae.latents import run_encode


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
    on_disk = json.loads((base / "eval" / "metrics.json").read_text())
    assert on_disk == metrics
    rows = list(csv.DictReader(open(base / "eval" / "per_image.csv")))
    assert len(rows) == metrics["num_images"] == stats["splits"]["val"]["count"]
    assert abs(sum(float(r["psnr"]) for r in rows) / len(rows) - metrics["psnr"]) < 1e-3
    assert {"psnr", "ssim", "psnr_bicubic", "ssim_bicubic", "num_images", "latent_std", "scaling_factor"} <= set(metrics)
    assert 0 < metrics["ssim"] <= 1 and metrics["compression_ratio"] == 48.0


def test_recon_grid_has_three_columns(evaluated):
    base, metrics, _ = evaluated
    img = Image.open(base / "eval" / "recon_grid.png")
    n = min(3, metrics["num_images"])
    assert img.size == (3 * 34 + 2, n * 34 + 2)  # 32 px tiles with 2 px gaps: original | recon | error


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
