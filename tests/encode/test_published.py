"""Published VAEs used as they are (model.use_as_is): small random VAEs with configs shaped like
SD's, SD3's and SDXL's, through the real `dvc repro` and the encode stage's checks."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKL

from ldm_vae.encode.encoding import run_encode
from ldm_vae.encode.latents import compute_dtype
from ldm_vae.images import decode_uint8
from ldm_vae.runner import UnitFailed
from ldm_vae.samples import LATENT, image_bytes
from ldm_vae.shards import iter_samples, shard_paths

from helpers.common import KINDS, ROOT, TINY, copy_repo, make_params, published_vae

WEIGHTS = "diffusion_pytorch_model.safetensors"
def test_factors_and_force_upcast_decide_the_encode_dtype():
    fp16 = make_params(encode={"dtype": "fp16"}).encode
    assert compute_dtype(fp16, {"force_upcast": True}) == torch.float32
    assert compute_dtype(fp16, {"force_upcast": False}) == torch.float16
    assert compute_dtype(make_params(encode={"dtype": "bf16"}).encode, {}) == torch.bfloat16


def test_a_latent_that_overflows_float16_fails_naming_the_sample_dtype_and_fix(pipeline_dir, tmp_path):
    vae = AutoencoderKL.from_pretrained(published_vae(tmp_path / "sd", "sd"))
    with torch.no_grad():
        vae.quant_conv.bias[:4] = 1e6  # the posterior mean beyond float16's 65504: inf when stored
    with pytest.raises(UnitFailed) as e:
        run_encode(vae, pipeline_dir / "prepared", tmp_path / "latents", make_params().encode)
    msg = str(e.value)
    assert "the latent is not finite after encoding in fp32 and storing as float16" in msg
    assert "encode.dtype: fp32" in msg and "sample '" in msg and ".tar" in msg
    assert not list((tmp_path / "latents").rglob("*.tar"))  # nothing half-written is kept


def _run(cmd, cwd, env):
    import subprocess

    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_published_vaes_through_dvc_repro_unchanged_and_switching_reruns_only_what_depends(tmp_path):
    """SD3-like, SD-like, then SDXL-like (force_upcast), used as they are: data/vae is the source
    byte for byte, its factors and keys survive, the latents are vae.encode of the prepared
    images, and a switch re-runs train (a copy), encode and evaluate only."""
    from helpers.common import stages_run

    dst, env = copy_repo(tmp_path / "repo")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    # The probe runs on the SD3-like latents (16 channels); for the other two, up to evaluate (time).
    for kind, target, expected in (("sd3", [], {"download", "prepare", "train", "encode", "evaluate", "probe"}),
                                   ("sd", ["evaluate"], {"train", "encode", "evaluate"}),
                                   ("sdxl", ["evaluate"], {"train", "encode", "evaluate"})):
        src = published_vae(tmp_path / kind, kind)
        params["model"].update({"init_from": str(src), "use_as_is": True})
        (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        out = _run(["dvc", "repro", *target], dst, env)
        assert stages_run(out) == expected, out[-2000:]
        assert "used as it is" in out
        for name in ("config.json", WEIGHTS):
            assert (dst / "data/vae" / name).read_bytes() == (src / name).read_bytes(), name
        config = json.loads((dst / "data/vae/config.json").read_text())
        assert {k: config[k] for k in KINDS[kind]} == KINDS[kind]
        stats = json.loads((dst / "data/latents/stats.json").read_text())
        assert stats["channels"] == KINDS[kind]["latent_channels"]
        assert stats["vae_scaling_factor"] == KINDS[kind]["scaling_factor"]
        _latents_are_its_encodings(dst, AutoencoderKL.from_pretrained(src).eval())
        metrics = json.loads((dst / "data/eval/details.json").read_text())
        assert metrics["latent_channels"] == KINDS[kind]["latent_channels"] and np.isfinite(metrics["psnr"])
        assert json.loads((dst / "data/train/metrics.json").read_text())["steps"] == 0


def _latents_are_its_encodings(repo, vae) -> None:
    prepared = {s["__key__"]: s for s in iter_samples(shard_paths(repo / "data/prepared/val"))}
    latents = list(iter_samples(shard_paths(repo / "data/latents/val")))
    assert {s["__key__"] for s in latents} == set(prepared)
    s = latents[0]
    x = torch.from_numpy(decode_uint8(image_bytes(prepared[s["__key__"]]))).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        post = vae.encode(x).latent_dist  # [1, C, h, w]
    assert np.allclose(LATENT.get(s, "mean").astype(np.float32), post.mean[0].numpy(), atol=2e-3, rtol=2e-3)
    assert np.allclose(LATENT.get(s, "std").astype(np.float32), post.std[0].numpy(), atol=2e-3, rtol=2e-3)


def test_use_as_is_without_a_vae_or_with_pickled_weights_is_refused(tmp_path):
    from ldm_vae.config import ParamError, params_from_dict
    from ldm_vae.train.as_is import _local_folder

    with pytest.raises(ParamError, match="model.use_as_is: true needs model.init_from"):
        params_from_dict({"model": {"use_as_is": True}})
    folder = published_vae(tmp_path / "sd", "sd")
    shutil.move(folder / WEIGHTS, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="would have to be unpickled"):
        _local_folder(str(folder))
