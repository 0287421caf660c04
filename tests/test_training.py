import json
import shutil

import torch
from diffusers import AutoencoderKL

from conftest import curve, make_params
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
    logs = pipeline_dir / "train"
    assert [s for s, _ in curve(logs, "train/loss")] == [2, 4, 6]
    for name in ("rec_l1", "nll", "kl", "lr", "grad_norm", "images_per_s", "skipped_steps", "posterior_std"):
        assert len(curve(logs, f"train/{name}")) == 3, name
    val = curve(logs, "val/psnr")
    assert [s for s, _ in val] == [3, 6] and val[-1][1] > 0 and len(curve(logs, "val/rec_l1")) == 2
    assert sorted(p.name for p in (logs / "samples").iterdir()) == ["step-00000003.png", "step-00000006.png"]
    metrics = json.loads((logs / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["train"]["loss"] == curve(logs, "train/loss")[-1][1]


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
    shutil.copytree(pipeline_dir / "train", tmp_path / "logs")  # its curves went on past step 4
    result = train(params, tr, va, tmp_path / "vae", tmp_path / "logs", ckpt)
    assert result["resumed"] is True and result["steps"] == 6
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000004", "step-00000006"]
    # The curves hold every step once: rows after the checkpoint were dropped, then re-logged.
    assert [s for s, _ in curve(tmp_path / "logs", "train/loss")] == [2, 4, 6]
    assert [s for s, _ in curve(tmp_path / "logs", "val/psnr")] == [3, 6]


def test_checkpoint_from_other_params_is_never_resumed(pipeline_dir, tmp_path):
    params = make_params(train={"lr": 5e-4})  # differs from the run that wrote the checkpoint
    tr, va = shard_paths(pipeline_dir / "prepared" / "train"), shard_paths(pipeline_dir / "prepared" / "val")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(pipeline_dir / "checkpoints", ckpt)
    result = train(params, tr, va, tmp_path / "vae", tmp_path / "logs", ckpt)
    assert result["resumed"] is False and result["steps"] == 6
    assert [s for s, _ in curve(tmp_path / "logs", "train/loss")] == [2, 4, 6]  # trained from step 0


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
    psnrs = [v for _, v in curve(tmp_path / "logs", "val/psnr")]
    print(psnrs)
    assert max(psnrs[-3:]) > psnrs[0] + 4.0  # measured: about +7 dB
    assert torch.isfinite(torch.tensor([v for _, v in curve(tmp_path / "logs", "train/loss")])).all()
