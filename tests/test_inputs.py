"""The inputs DVC cannot see (ldm_vae/inputs.py): local VAE folders by content, hub ids by commit,
and the stages loading a hub id at the commit recorded, not at a branch that moved since."""

import json
import os
import subprocess
import sys

import pytest
import torch

from ldm_vae.config import ParamError
from ldm_vae.inputs import Location, fingerprint, pinned, pretrained_location

from helpers.common import ROOT, make_params, write_params


def test_locations_parse_hub_ids_with_subfolders_and_revisions(tmp_path):
    assert pretrained_location("org/name") == Location("org/name")
    assert pretrained_location("org/name/vae@v1.0") == Location("org/name", "vae", "v1.0")
    with pytest.raises(ParamError, match=r"model.init_from: 'org/name@'.*org/name\[/subfolder\]\[@revision\]"):
        pretrained_location("org/name@")
    with pytest.raises(ParamError, match="evaluate.references: 'nothing'"):
        pretrained_location("nothing", "evaluate.references")
    assert pinned("org/name/vae", {"location": "org/name/vae", "revision": "a" * 40}) == f"org/name/vae@{'a' * 40}"
    assert pinned("org/name", {"location": "other/repo", "revision": "a" * 40}) == "org/name"  # another input's


def test_a_local_folder_is_its_files_content(tmp_path):
    from ldm_vae.model import build_vae

    folder = tmp_path / "vae"
    build_vae(make_params().model, sample_size=32).save_pretrained(folder)
    first = fingerprint(str(folder), "model.init_from")
    assert set(first["files"]) == {"config.json", "diffusion_pytorch_model.safetensors"}
    assert fingerprint(str(folder), "model.init_from") == first  # the same bytes, the same record
    weights = folder / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))  # overwritten in place: same path, same size
    changed = fingerprint(str(folder), "model.init_from")["files"]
    assert changed["config.json"] == first["files"]["config.json"]
    assert changed["diffusion_pytorch_model.safetensors"] != first["files"]["diffusion_pytorch_model.safetensors"]


def _hub_cache(root, repo: str, commits: dict[str, float]) -> None:
    """A Hugging Face hub cache as huggingface_hub lays it out, holding ``repo`` at each commit with
    a TINY VAE whose decoder bias is the given value; refs/main at the last."""
    from ldm_vae.model import build_vae

    base = root / f"models--{repo.replace('/', '--')}"
    for sha, bias in commits.items():
        vae = build_vae(make_params().model, sample_size=32)
        with torch.no_grad():
            vae.decoder.conv_out.bias.fill_(bias)
        vae.save_pretrained(base / "snapshots" / sha)
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(sha)


def _stage(args, env, cwd):
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
def test_a_hub_id_is_recorded_by_commit_and_loaded_at_it(tmp_path):
    """Offline, from the hub cache: the inputs stage records the commit main points at; when main
    moves, the record changes (DVC re-runs train); train loads the recorded commit, not main."""
    old, new = "1" * 40, "2" * 40
    cache = tmp_path / "hub"
    _hub_cache(cache, "org/tiny-vae", {old: 0.25})
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    params = write_params(tmp_path / "params.yaml", model={"init_from": "org/tiny-vae"})
    run = [str(ROOT / "stages/inputs.py"), "--params", str(params), "--out", str(tmp_path / "inputs")]
    assert f"org/tiny-vae: commit {old}" in _stage(run, env, tmp_path)
    record = (tmp_path / "inputs" / "init_from.json").read_bytes()
    _stage(run, env, tmp_path)
    assert (tmp_path / "inputs" / "init_from.json").read_bytes() == record  # nothing moved: same bytes

    _hub_cache(cache, "org/tiny-vae", {new: 0.75})  # main moves to a new commit
    (tmp_path / "pinned").mkdir()
    (tmp_path / "pinned" / "init_from.json").write_bytes(record)  # the record a run was made with
    assert f"commit {new}" in _stage(run, env, tmp_path)
    assert json.loads((tmp_path / "inputs" / "init_from.json").read_text())["init_from"]["revision"] == new

    load = ("import sys; from ldm_vae.config import load_params; from ldm_vae.inputs import pinned_init_from; "
            "from ldm_vae.model import build_vae; from pathlib import Path; "
            "p = pinned_init_from(load_params(sys.argv[1]), Path(sys.argv[2])); "
            "print(p.model.init_from, float(build_vae(p.model, 32).decoder.conv_out.bias[0]))")
    assert _stage(["-c", load, str(params), str(tmp_path / "pinned")], env, tmp_path).split() == [
        f"org/tiny-vae@{old}", "0.25"]
    assert _stage(["-c", load, str(params), str(tmp_path / "inputs")], env, tmp_path).split() == [
        f"org/tiny-vae@{new}", "0.75"]
