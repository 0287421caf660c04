"""The real pipeline: `dvc repro` in a copy of the repository, with a tiny config."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from helpers.common import ROOT, TINY, copy_repo, run, stages_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """The repository as committed (plus uncommitted, not ignored files), in a fresh folder."""
    dst, env = copy_repo(tmp_path_factory.mktemp("repo"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    params["data"]["source"] = "builtin"  # the real default source
    params["data"]["val_fraction"] = 0.15
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dst, env


def test_repro_writes_every_contract(repo):
    dst, env = repo
    out = run(["dvc", "repro"], dst, env)
    assert stages_run(out) == {"download", "prepare", "train", "encode", "evaluate", "probe"}

    manifest = [json.loads(line) for line in (dst / "data/raw/manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 17 and (dst / "data/raw/rejected.jsonl").exists()
    assert {"key", "sha256", "width", "height", "source"} <= set(manifest[0])

    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(dst / "data/vae")
    assert vae.config.latent_channels == 4 and vae.config.scaling_factor != 0.18215

    stats = json.loads((dst / "data/latents/stats.json").read_text())
    prepared = json.loads((dst / "data/prepared/counts.json").read_text())
    for split in ("train", "val"):
        assert stats["splits"][split]["count"] == prepared[split]["samples"]
    assert stats["latent_shape"] == [4, 4, 4]

    import webdataset as wds

    sample = next(
        iter(wds.WebDataset(sorted(map(str, (dst / "data/latents/val").glob("*.tar")))[0], shardshuffle=False))
    )
    assert {"__key__", "mean.npy", "std.npy", "json"} <= set(sample)

    metrics = json.loads((dst / "data/eval/details.json").read_text())
    assert {"psnr", "ssim", "psnr_bicubic", "num_images"} <= set(metrics)
    assert metrics["num_images"] == prepared["val"]["samples"]
    # dvc metrics show: the headline of evaluate and the probe, one line each within 120 columns.
    table = run(["dvc", "metrics", "show"], dst, env).splitlines()
    assert [line.split()[0] for line in table] == ["Path", "data/eval/metrics.json", "data/probe/metrics.json"]
    assert max(map(len, table)) <= 120 and "psnr_bicubic" in table[0] and "denoise" in table[0]
    assert (dst / "data/eval/per_image.csv").exists() and (dst / "data/eval/recon_grid.png").exists()
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], dst, env))
    assert "psnr" in json.dumps(shown) and "denoise" in json.dumps(shown)
    probe = json.loads((dst / "data/probe/details.json").read_text())
    assert probe["probe_val_latents"] == prepared["val"]["samples"] and len(probe["denoise_levels"]) == 5


def test_second_repro_runs_nothing(repo):
    dst, env = repo
    out = run(["dvc", "repro"], dst, env)
    assert stages_run(out) == set()


def test_a_forced_rerun_leaves_the_tree_clean_and_plots_show_without_warnings(repo):
    """Times and the runner's records stay out of what git and DVC compare: after committing a
    run, `dvc repro -f` of every stage changes no tracked file, dvc.lock included."""
    dst, env = repo
    run(["git", "add", "-A"], dst, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first run"], dst, env)
    out = run(["dvc", "repro", "-f"], dst, env)
    assert stages_run(out) == {"download", "prepare", "train", "encode", "evaluate", "probe"}
    assert run(["git", "status", "--porcelain"], dst, env).strip() == ""
    shown = run(["dvc", "plots", "show"], dst, env)
    assert "failed" not in shown.lower() and "warning" not in shown.lower(), shown
    html = (dst / "dvc_plots" / "index.html").read_text()
    for picture in ("curves.png", "per_image_psnr.png", "recon_grid.png"):
        assert picture in html
    assert run(["git", "status", "--porcelain"], dst, env).strip() == ""  # dvc_plots/ is ignored


def test_dvc_remote_on_s3_round_trip(repo, s3_server, tmp_path):
    """The README's remote commands against a real S3 server: `dvc push`, then in a fresh clone
    `dvc pull` gets every output byte for byte and `dvc repro` runs no stage. The remote holds an
    object per output file (shards), not per image."""
    dst, env = repo
    env = {**env, **s3_server.env}
    s3_server.make_bucket("dvc-store")
    run(["dvc", "remote", "add", "-d", "-f", "store", "s3://dvc-store/ldm-vae"], dst, env)
    run(["git", "add", "-A"], dst, env)  # the run (dvc.lock) and the remote, as a user commits them
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--allow-empty", "-qm", "remote"], dst, env)
    run(["dvc", "push"], dst, env)
    outs = [p for p in (dst / "data").rglob("*") if p.is_file() and ".done" not in p.parts
            and not p.name.startswith(".") and "checkpoints" not in p.parts and p.name != "run_info.json"]
    pushed = s3_server.keys("s3://dvc-store/ldm-vae/")
    kept = len((dst / "data/raw/manifest.jsonl").read_text().splitlines())
    samples = sum(json.loads((dst / "data/prepared/counts.json").read_text())[s]["samples"] for s in ("train", "val"))
    assert len(pushed) <= len(outs) + 20  # each file once (identical ones shared), plus a .dir per folder
    assert len(pushed) < (kept + 2 * samples) / 2  # a file per image or sample would be more than twice this

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(dst), str(clone)], tmp_path, env)
    env_clone = {**env, "PYTHONPATH": str(clone)}
    run(["dvc", "pull"], clone, env_clone)
    for p in outs:
        copy = clone / p.relative_to(dst)
        assert copy.is_file() and copy.read_bytes() == p.read_bytes(), p
    assert stages_run(run(["dvc", "repro"], clone, env_clone)) == set()


def test_data_stages_redone_on_ray_give_the_same_bytes_and_rerun_nothing(repo, ray_cluster):
    """Every unit of download, prepare and encode done again (records removed, `dvc repro -f`)
    with `engine.kind: ray` on the two-node cluster: the local engine's bytes (dvc.lock
    unchanged), so nothing downstream re-runs, and the next `dvc repro` runs nothing. The engine
    is in no stage's params: switching it re-runs nothing either."""
    from helpers.raycluster import LOOPBACK

    dst, env = repo
    env = {**env, "PYTHONPATH": f"{LOOPBACK}{os.pathsep}{env['PYTHONPATH']}"}  # Ray on 127.0.0.1 (raycluster.py)
    params_file = dst / "params.yaml"
    local = params_file.read_text()
    params = yaml.safe_load(local)
    params["engine"] = {"kind": "ray", "ray_address": ray_cluster.address}
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    lock = (dst / "dvc.lock").read_text()
    try:
        records = [p for stage in ("raw", "prepared", "latents") for p in (dst / "data" / stage / ".done").iterdir()]
        for p in records:
            p.unlink()  # as if never run: every unit is done again, now on the cluster
        out = run(["dvc", "repro", "-f", "-s", "download", "prepare", "encode"], dst, env)
        assert stages_run(out) == {"download", "prepare", "encode"}
        assert out.count("on the Ray cluster: 2 nodes") == 3 and "already done" not in out
        assert all(p.is_file() for p in records)  # every unit recorded again
        assert (dst / "dvc.lock").read_text() == lock  # the same bytes as the local engine's
        assert stages_run(run(["dvc", "repro"], dst, env)) == set()  # and the engine is no stage's param
    finally:
        params_file.write_text(local)


def test_channel_change_reruns_only_model_stages(repo):
    dst, env = repo
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["model"]["latent_channels"] = 8
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro"], dst, env)
    assert stages_run(out) == {"train", "encode", "evaluate", "probe"}

    import webdataset as wds

    from ldm_vae.samples import npy_load

    sample = next(
        iter(wds.WebDataset(sorted(map(str, (dst / "data/latents/train").glob("*.tar")))[0], shardshuffle=False))
    )
    assert npy_load(sample["mean.npy"]).shape == (8, 4, 4)
    assert json.loads((dst / "data/eval/details.json").read_text())["latent_channels"] == 8
    assert np.isfinite(json.loads((dst / "data/eval/metrics.json").read_text())["psnr"])


def test_channel_comparison_over_dvc_experiments(repo):
    """Workspace at 8 channels (previous test), one experiment at 16: the report has both."""
    dst, env = repo
    env = dict(env, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    run(["git", "add", "-A"], dst, env)
    run(["git", "commit", "-qm", "tiny run at 8 channels"], dst, env)
    out = run(["dvc", "exp", "run", "-S", "model.latent_channels=16"], dst, env)
    assert stages_run(out) == {"train", "encode", "evaluate", "probe"}
    printed = run([sys.executable, "stages/compare.py", "--out", "data/eval"], dst, env)

    import csv

    rows = list(csv.DictReader(open(dst / "data/eval/channels.csv")))
    assert sorted(int(r["latent_channels"]) for r in rows) == [8, 16]
    by_c = {int(r["latent_channels"]): r for r in rows}
    assert float(by_c[8]["compression_ratio"]) == 24.0 and float(by_c[16]["compression_ratio"]) == 12.0
    assert all(np.isfinite(float(r["psnr"])) and 0 < float(r["ssim"]) <= 1 for r in rows)
    assert printed.startswith(
        "| run | latent_channels | kl_weight | compression_ratio | psnr | ssim | mse | rate_bpp |"
    )
    assert all(float(r["kl_weight"]) == 1e-6 and float(r["rate_bpp"]) > 0 for r in rows)  # TINY's beta, not 0.0
    assert (dst / "data/eval/channels.png").stat().st_size > 1000
    assert (dst / "data/eval/rate_distortion.png").stat().st_size > 1000
    assert all(0 < float(r["denoise_loss"]) < 2 for r in rows)  # the probe stage's, one a run
    assert (dst / "data/eval/denoise.png").stat().st_size > 1000


def test_killed_repro_resumes_training_with_whole_curves(repo):
    """`dvc repro` SIGKILLed (dvc and the stage) after training's first checkpoint, then run again:
    training resumes and its curves, samples and metrics cover the whole run, each step once;
    forced once more, it finds the final checkpoint and only re-exports and reports."""
    import signal
    import time

    from helpers.common import curve

    dst, env = repo
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["train"].update({"max_steps": 120, "checkpoint_every": 10, "log_every": 5, "val_every": 40,
                            "sample_every": 40})
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ckpts = dst / "data/checkpoints"
    proc = subprocess.Popen(["dvc", "repro", "train"], cwd=dst, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not any(json.loads(p.read_text())["step"] >= 10
                                             for p in ckpts.glob("step-*/run.json")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (dst / "data/train/metrics.json").exists() or json.loads(
        (dst / "data/train/metrics.json").read_text()).get("steps") != 120  # it died mid-run

    run(["dvc", "repro", "train"], dst, env)
    logs = dst / "data/train"
    metrics = json.loads((logs / "metrics.json").read_text())
    assert json.loads((logs / "run_info.json").read_text())["resumed"] is True and metrics["steps"] == 120
    assert [s for s, _ in curve(logs, "train/loss")] == list(range(5, 121, 5))  # from step 5, each once
    assert [s for s, _ in curve(logs, "val/psnr")] == [40, 80, 120]
    assert sorted(p.name for p in (logs / "samples").iterdir()) == [f"step-{s:08d}.png" for s in (40, 80, 120)]

    vae_before = (dst / "data/vae/diffusion_pytorch_model.safetensors").read_bytes()
    out = run(["dvc", "repro", "-s", "-f", "train"], dst, env)
    assert "resumed from" in out and stages_run(out) == {"train"}
    again = json.loads((logs / "metrics.json").read_text())
    assert again["val_psnr"] == metrics["val_psnr"] and "train_seconds" not in again
    assert json.loads((logs / "run_info.json").read_text())["train_seconds"] > 0
    assert (dst / "data/vae/diffusion_pytorch_model.safetensors").read_bytes() == vae_before
    assert [s for s, _ in curve(logs, "train/loss")] == list(range(5, 121, 5))


def _damage(path, how: str) -> None:
    """Damage an output in place, through its hard link into the DVC cache, as a stray write does
    (root ignores the read-only bit DVC sets)."""
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        if how == "truncate":
            f.truncate(os.path.getsize(path) // 2)
        else:  # flip one bit in the middle
            f.seek(os.path.getsize(path) // 2)
            byte = f.read(1)[0]
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte ^ 1]))


def _follow(advice: str, dst, env) -> None:
    """Run the lines verify printed under "To get them back", as a person would paste them."""
    lines = advice.split("To get them back (from the repository root):\n", 1)[1].splitlines()
    for line in lines:
        if not line.startswith("  "):
            break
        subprocess.run(line.split("#")[0], shell=True, cwd=dst, env=env, check=True, capture_output=True)


def test_verify_finds_damage_and_its_advice_brings_it_back(repo, tmp_path):
    """A truncated shard, a flipped bit and a missing file, written through the hard links (so the
    cache objects are damaged too): verify names each one, the loader's first line names the shard
    and verify; the commands verify prints (no remote: re-run the stage; a remote: pull) make every
    output match dvc.lock again."""
    from ldm_vae import latent_loader
    from ldm_vae.shards import ShardError

    dst, env = repo
    verify = [sys.executable, "-m", "ldm_vae.verify"]
    subprocess.run(["dvc", "remote", "remove", "store"], cwd=dst, env=env, capture_output=True)  # no remote
    assert "0 damaged" in run(verify, dst, env)
    latent = sorted((dst / "data/latents/train").glob("*.tar"))[0]
    prepared = sorted((dst / "data/prepared/train").glob("*.tar"))[0]
    _damage(latent, "truncate")
    _damage(prepared, "flip")
    (dst / "data/raw/manifest.jsonl").unlink()

    found = subprocess.run(verify, cwd=dst, env=env, capture_output=True, text=True)
    assert found.returncode == 1 and "3 damaged" in found.stdout
    rel = lambda p: str(p.relative_to(dst))  # noqa: E731
    assert f"DAMAGED {rel(latent)} (encode): content differs" in found.stdout and "truncated tar" in found.stdout
    assert f"DAMAGED {rel(prepared)} (prepare): content differs" in found.stdout
    assert "DAMAGED data/raw/manifest.jsonl (download): missing" in found.stdout
    with pytest.raises(ShardError) as err:
        for _ in latent_loader(str(latent), stats=str(dst / "data/latents/stats.json"), batch_size=4, num_workers=1):
            pass
    first = str(err.value).splitlines()[0]
    assert first.startswith(f"damaged shard {latent}: truncated tar") and "python -m ldm_vae.verify" in first

    _follow(found.stdout, dst, env)
    assert "0 damaged" in run(verify, dst, env)
    assert stages_run(run(["dvc", "repro"], dst, env)) <= {"train", "encode", "evaluate", "probe"}

    # With a remote: the damaged cache object goes, `dvc pull` brings the bytes back.
    run(["dvc", "remote", "add", "-d", "-f", "here", str(tmp_path / "remote")], dst, env)
    run(["dvc", "push"], dst, env)
    _damage(latent, "truncate")
    found = subprocess.run(verify, cwd=dst, env=env, capture_output=True, text=True)
    assert found.returncode == 1 and "dvc pull -f data/latents" in found.stdout
    _follow(found.stdout, dst, env)
    assert "0 damaged" in run(verify, dst, env)
    assert stages_run(run(["dvc", "repro"], dst, env)) == set()


def test_local_inputs_are_tracked_by_content(repo, tmp_path):
    """A local model.init_from and evaluate.references folder: weights overwritten in place re-run
    what reads them and nothing else; an unchanged folder re-runs nothing (the inputs stage runs
    every time and rewrites the same bytes)."""
    import shutil

    import torch
    from diffusers import AutoencoderKL

    dst, env = repo
    init, ref = tmp_path / "init-vae", tmp_path / "ref-vae"
    shutil.copytree(dst / "data/vae", init)
    shutil.copytree(dst / "data/vae", ref)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["model"]["init_from"] = str(init)
    params["evaluate"]["references"] = [str(ref)]
    params["train"]["max_steps"] = 6
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro", "evaluate"], dst, env)  # (not the probe: it adds only time here)
    assert "Running stage 'inputs'" in out and stages_run(out) == {"train", "encode", "evaluate"}
    recorded = json.loads((dst / "data/inputs/references.json").read_text())["ref-vae"]
    assert set(recorded["files"]) == {"config.json", "diffusion_pytorch_model.safetensors", "latent_stats.json"}
    before = {p.name: p.read_bytes() for p in (dst / "data/inputs").iterdir()}
    out = run(["dvc", "repro", "evaluate"], dst, env)
    assert "Running stage 'inputs'" in out and stages_run(out) == set()
    assert {p.name: p.read_bytes() for p in (dst / "data/inputs").iterdir()} == before  # git stays clean

    def overwrite(folder):  # the same folder, other weights, as a person's fine-tune would leave it
        vae = AutoencoderKL.from_pretrained(folder)
        with torch.no_grad():
            vae.decoder.conv_out.bias.add_(0.01)
        vae.save_pretrained(folder)

    overwrite(ref)
    assert stages_run(run(["dvc", "repro", "evaluate"], dst, env)) == {"evaluate"}
    overwrite(init)
    assert stages_run(run(["dvc", "repro", "evaluate"], dst, env)) == {"train", "encode", "evaluate"}


def test_a_vq_run_through_dvc_repro(repo):
    """model.regularizer: vq: train, encode (tokens, with prequant), evaluate and the probe re-run;
    the tokens are in range, each sample once; decoding the stored tokens with diffusers' VQModel
    alone gives the evaluate stage's PSNR; the probe says it does not apply; the token loader
    gives every sample once."""
    import torch
    import webdataset as wds
    from diffusers import VQModel
    from PIL import Image

    from ldm_vae.metrics import psnr

    dst, env = repo
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["model"].update(init_from="", regularizer="vq", codebook_size=64, latent_channels=4)  # (earlier tests: 8)
    params["evaluate"]["references"] = []
    params["encode"]["prequant"] = True
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro"], dst, env)
    assert stages_run(out) == {"train", "encode", "evaluate", "probe"}
    assert "tokens:" in out and "codes used" in out and "not applicable" in out

    stats = json.loads((dst / "data/latents/stats.json").read_text())
    assert stats["regularizer"] == "vq" and stats["codebook_size"] == 64 and sum(stats["code_histogram"]) > 0
    keys, decoded = {}, {}
    vq = VQModel.from_pretrained(dst / "data/vae").eval()  # diffusers alone
    for split in ("train", "val"):
        urls = sorted(map(str, (dst / f"data/latents/{split}").glob("*.tar")))
        for s in wds.WebDataset(urls, shardshuffle=False):
            tokens = np.load(__import__("io").BytesIO(s["tokens.npy"]))
            assert tokens.dtype == np.uint8 and tokens.shape == (4, 4) and int(tokens.max()) < 64
            assert np.load(__import__("io").BytesIO(s["prequant.npy"])).shape == (4, 4, 4)
            keys.setdefault(split, []).append(s["__key__"])
            if split == "val":
                idx = torch.from_numpy(tokens.astype(np.int64)).flatten()
                codes = vq.quantize.embedding.weight[idx].view(1, 4, 4, -1).permute(0, 3, 1, 2)
                with torch.no_grad():
                    decoded[s["__key__"]] = ((vq.decode(codes, force_not_quantize=True).sample.clamp(-1, 1) + 1) / 2)[0]
        assert len(keys[split]) == len(set(keys[split])) == stats["splits"][split]["count"]
    scores = []
    for s in wds.WebDataset(sorted(map(str, (dst / "data/prepared/val").glob("*.tar"))), shardshuffle=False):
        ref = torch.from_numpy(np.asarray(Image.open(__import__("io").BytesIO(s["png"])).convert("RGB")).copy())
        scores.append(float(psnr(decoded[s["__key__"]][None], ref.permute(2, 0, 1)[None].float() / 255)[0]))
    details = json.loads((dst / "data/eval/details.json").read_text())
    assert abs(np.mean(scores) - details["psnr"]) < 1e-3
    assert details["codebook_size"] == 64 and 0 < details["codebook_usage"] <= 1 and details["rate_bpp"] == 6 / 64
    assert "not applicable" in details["denoise_probe"]
    assert json.loads((dst / "data/probe/metrics.json").read_text()) == {"denoise": None}
    assert "usage" in run(["dvc", "metrics", "show"], dst, env)

    from ldm_vae.token_batches import token_loader

    loader = token_loader(str(dst / "data/latents/train/*.tar"), batch_size=4, num_workers=2,
                          stats=dst / "data/latents/stats.json")
    got = [k for b in loader for k in b["key"]]
    assert sorted(got) == sorted(keys["train"])
    batch = next(iter(loader))
    assert batch["tokens"].dtype == torch.long and batch["tokens"].shape[1:] == (4, 4)
