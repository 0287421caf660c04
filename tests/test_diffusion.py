"""The latent shards feed a real diffusion model: examples/train_diffusion.py (a diffusers UNet and
scheduler on the project's loader) learns to denoise them, samples a decoded grid (a row per class
when class-conditional on data.labels), and runs under real 2-process DDP without a rank waiting
for another. Its text-conditional mode runs on captioned buckets in test_e2e_buckets.py."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from ldm_vae.encode.encoding import run_encode
from ldm_vae.export import load_vae
from ldm_vae.ingest.download import run_download
from ldm_vae.ingest.prepare import run_prepare
from ldm_vae.launch import _free_port

from helpers.common import ROOT, imagenet_tree, make_params

EXAMPLE = str(ROOT / "examples" / "train_diffusion.py")


def _latents(pipeline_dir, tmp_path):
    run_encode(load_vae(pipeline_dir / "vae"), pipeline_dir / "prepared", tmp_path / "latents", make_params().encode)
    return tmp_path / "latents"


def _args(latents, vae, out, **kw):
    args = {"--latents": latents, "--vae": vae, "--out": out, "--widths": "32 64", "--sample-steps": 5,
            "--samples": 4, **kw}
    return [x for k, v in args.items() for x in (k, *str(v).split())]


def test_the_example_trainer_lowers_its_loss_and_decodes_a_sample_grid(pipeline_dir, tmp_path):
    latents, out = _latents(pipeline_dir, tmp_path), tmp_path / "run"
    proc = subprocess.run([sys.executable, EXAMPLE, *_args(latents, pipeline_dir / "vae", out, **{
        "--steps": 100, "--batch-size": 5, "--lr": 1e-3, "--num-workers": 1})],  # 15 latents: 3 batches an epoch
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    loss = json.loads((out / "loss.json").read_text())["loss"]
    assert len(loss) == 100 and np.all(np.isfinite(loss))
    assert np.mean(loss[-20:]) < 0.75 * np.mean(loss[:20]), (loss[:20], loss[-20:])
    stats = json.loads((latents / "stats.json").read_text())
    side = 8 * stats["latent_shape"][1]
    with Image.open(out / "samples.png") as grid:  # 4 samples: one row of decoded images
        assert grid.size == (4 * side, side)
        assert np.asarray(grid).std() > 1  # decoded pictures, not a blank
    assert (out / "unet" / "config.json").is_file()


def test_the_example_trainer_runs_under_two_process_ddp(pipeline_dir, tmp_path):
    latents, out = _latents(pipeline_dir, tmp_path), tmp_path / "run"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        EXAMPLE,
        *_args(latents, pipeline_dir / "vae", out, **{"--steps": 6, "--batch-size": 4, "--num-workers": 1}),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert len(json.loads((out / "loss.json").read_text())["loss"]) == 6
    assert "step 6: loss" in proc.stdout


def test_the_example_trainer_is_class_conditional_on_folder_labels(pipeline_dir, tmp_path):
    tree = imagenet_tree(tmp_path / "train", per_class=4)
    params = make_params(data={"source": f"folder:{tree}", "labels": "folder"})
    run_download(params.data, tmp_path / "raw")
    run_prepare(params.data, tmp_path / "raw", tmp_path / "prepared")
    run_encode(load_vae(pipeline_dir / "vae"), tmp_path / "prepared", tmp_path / "latents", params.encode)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, EXAMPLE, *_args(tmp_path / "latents", pipeline_dir / "vae", out, **{
        "--steps": 60, "--batch-size": 6, "--lr": 1e-3, "--num-workers": 1, "--samples": 3}), "--class-cond"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    loss = json.loads((out / "loss.json").read_text())["loss"]
    assert len(loss) == 60 and np.mean(loss[-15:]) < 0.75 * np.mean(loss[:15]), (loss[:15], loss[-15:])
    names = json.loads((tmp_path / "latents" / "classes.json").read_text())
    grid, = json.loads((out / "samples.json").read_text())["grids"]
    assert grid["rows"] == names == sorted(names) and len(names) == 4  # a row per class, by its name
    _, h, w = grid["latent_shape"]
    with Image.open(out / grid["file"]) as img:
        assert img.size == (3 * 8 * w, 4 * 8 * h) and np.asarray(img).std() > 1
    config = json.loads((out / "unet" / "config.json").read_text())
    assert config["class_embed_type"] == "identity" and (out / "conditioning.safetensors").is_file()
