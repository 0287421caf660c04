"""What many tests share: tiny params, made photographs and ImageNet-like trees, small random
VAEs shaped like the published ones, made latent shards, and a copy of the repository to run dvc in."""

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm_vae.samples import npy_bytes
from ldm_vae.shards import ShardWriter

ROOT = Path(__file__).resolve().parents[2]


# Keep unit tests on two threads whatever the machine; CI machines are small.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def photo(w=96, h=80, seed=0, mode="RGB") -> Image.Image:
    """A smooth random 'photograph': low-frequency colour fields plus a little texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    chans = []
    for c in range(3):
        a, b, p = rng.uniform(0.5, 2, 3)
        chans.append(0.5 + 0.35 * np.sin(a * xx * 6 + p) * np.cos(b * yy * 6) + rng.normal(0, 0.03, (h, w)))
    arr = (np.clip(np.stack(chans, -1), 0, 1) * 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    return img.convert(mode) if mode != "RGB" else img


def rejections(out) -> dict:
    """{key: reason} of a download output's rejected.jsonl."""
    return {r["key"]: r["reason"] for r in map(json.loads, (Path(out) / "rejected.jsonl").read_text().splitlines())}


def curve(log_dir, name: str) -> list[tuple[int, float]]:
    """[(step, value)] of a dvclive curve of the train stage, e.g. curve(logs, "train/loss")."""
    rows = (Path(log_dir) / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()[1:]
    return [(int(a), float(b)) for a, b in (r.split("\t") for r in rows)]


def image_bytes(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


TINY = {
        "data": {"resolution": 32, "crops_per_image": 3, "val_crops_per_image": 2, "val_fraction": 0.3,
                 "samples_per_shard": 5, "min_crop_scale": 0.15},
        "model": {"latent_channels": 4, "block_out_channels": [8, 8, 16, 16], "norm_num_groups": 2,
                  "logvar_init": -6.0},
        "loss": {"rec_loss": "l1", "kl_weight": 1e-6},
        "train": {"max_steps": 6, "batch_size": 4, "warmup_steps": 2, "log_every": 2, "val_every": 3,
                  "sample_every": 3, "checkpoint_every": 2, "scale_samples": 8, "crop_size": 0,
                  "fade_augment": 0.0, "lr": 1e-3},
        "encode": {"batch_size": 4, "samples_per_shard": 4},
        "evaluate": {"batch_size": 4, "grid_images": 3},
        "probe": {"steps": 4, "batch_size": 4, "widths": [8, 16], "val_draws": 1},
}


def tiny_raw(**overrides) -> dict:
    """TINY as a params.yaml dict, with section overrides."""
    raw = {k: dict(v) for k, v in TINY.items()}
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    return raw


def make_params(**overrides):
    """TINY params with section overrides, e.g. make_params(model={"latent_channels": 8})."""
    from ldm_vae.config import params_from_dict

    return params_from_dict(tiny_raw(**overrides))


def write_params(path: Path, **overrides) -> Path:
    """TINY params with section overrides written as a params.yaml file for a stage command."""
    import yaml

    path.write_text(yaml.safe_dump(tiny_raw(**overrides)))
    return path


def make_photo_folder(root: Path) -> Path:
    """A folder of 8 distinct small photographs (PNG and JPEG), one level of sub-folder."""
    (root / "sub").mkdir(parents=True)
    for i in range(8):
        img = photo(96 + 8 * i, 80, seed=i)
        target = root / ("sub" if i % 2 else "") / f"img{i}.{'jpg' if i % 3 == 0 else 'png'}"
        img.save(target, quality=95) if target.suffix == ".jpg" else img.save(target)
    return root


# Class folders whose sorted order is not their creation order; synset-like names, as ImageNet's.
CLASSES = ["n02085620", "n01440764", "n04592741", "n01530575"]


def imagenet_tree(root: Path, classes=CLASSES, per_class: int = 3, seed: int = 0) -> Path:
    """An ImageNet-like train folder: <wnid>/<wnid>_<n>.JPEG, small distinct photographs."""
    for c, wnid in enumerate(classes):
        (root / wnid).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / wnid / f"{wnid}_{i}.JPEG").write_bytes(
                image_bytes(photo(48 + 4 * i, 40, seed=seed + 10 * c + i), "JPEG")
            )
    return root


# Random weights, the published configs' shapes and factors (read back from the files, never
# assumed by the project): SD 1.x/2.x, SD3 (16 channels, a shift, no quant convs), SDXL (upcast).
KINDS = {
    "sd": dict(latent_channels=4, scaling_factor=0.18215),
    "sd3": dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                use_post_quant_conv=False),
    "sdxl": dict(latent_channels=4, scaling_factor=0.13025, force_upcast=True),
}


def published_vae(folder, kind: str, seed: int = 0):
    """A small random AutoencoderKL with a published VAE's config shape, saved as safetensors."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=32, **KINDS[kind])
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


def copy_repo(dst: Path) -> tuple[Path, dict]:
    """The repository as committed (plus uncommitted, not ignored files) in ``dst``, a git repo of
    its own, and the environment to run dvc there with the copy's library."""

    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            (dst / rel).write_bytes(src.read_bytes())
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(dst)  # the copy's library, not the installed checkout's
    return dst, env


def run(cmd, cwd, env):
    """A command (dvc, a stage) that must succeed; its output."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def stages_run(output: str) -> set[str]:
    """The stages a dvc command ran, less the inputs stage: that one runs on every `dvc repro` (it
    is how DVC sees a changed local VAE folder, ldm_vae/inputs.py; test_local_inputs_...)."""
    return set(re.findall(r"Running stage '([a-z]+)'", output)) - {"inputs"}


CHANNELS, SIDE = 4, 8  # write_latents' default latents: 4 x 8 x 8


def write_latents(root, kind: str, n_train: int = 96, n_val: int = 24, side: int = SIDE):
    """train/ and val/ latent shards (as encode writes them) and a stats.json: ``smooth`` latents are
    a random level plus a random ramp per channel, ``noise`` ones white N(0, 1)."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(-1.5, 1.5, side)[None, :] + np.zeros((side, 1))  # [h, w]
    for split, n in (("train", n_train), ("val", n_val)):
        with ShardWriter(root / split, split, 1000) as w:
            for i in range(n):
                if kind == "smooth":
                    a, b = rng.standard_normal((2, CHANNELS, 1, 1))
                    z = a + b * (ramp if i % 2 else ramp.T)  # [C, h, w]
                else:
                    z = rng.standard_normal((CHANNELS, side, side))
                w.write({"__key__": f"{split}{i:04d}", "mean.npy": npy_bytes(z.astype(np.float16)),
                         "std.npy": npy_bytes(np.full(z.shape, 0.01, np.float16))})
    stats = {"channels": CHANNELS, "latent_shape": [CHANNELS, side, side],
             "latent_shapes": [{"shape": [CHANNELS, side, side], "count": n_train}], "channel_mean": [0.0] * CHANNELS,
             "channel_std": [1.0] * CHANNELS}
    (root / "stats.json").write_text(json.dumps(stats))
    return root
