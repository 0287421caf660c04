"""The denoising probe (ldm_vae/probe.py): a latent space with structure scores well below the
no-structure line, white noise scores on it, a re-run gives the same bytes, and latents the UNet
cannot halve are refused naming the key."""

import json

import pytest

from ldm_vae.probe import run_probe

from helpers.common import make_params, write_latents

FAST = {"steps": 150, "batch_size": 16, "widths": [16, 32], "val_draws": 2, "lr": 5e-3}


def probe(latents, out, **over):
    return run_probe(latents, out, make_params(probe={**FAST, **over}).probe)


@pytest.mark.slow
def test_structure_scores_below_the_no_structure_line_and_noise_on_it(tmp_path):
    smooth = probe(write_latents(tmp_path / "smooth", "smooth"), tmp_path / "out_s")
    noise = probe(write_latents(tmp_path / "noise", "noise"), tmp_path / "out_n")
    for lvl in noise["denoise_levels"].values():  # white noise: nothing to find at any level
        assert 0.9 < lvl["relative"] < 1.1, noise
    mid = smooth["denoise_levels"]["lsnr+0"]  # half signal, half noise: smooth maps are guessable
    assert mid["relative"] < 0.85 and mid["relative"] == pytest.approx(mid["v_mse"] / mid["baseline_v_mse"])
    assert smooth["denoise_loss"] < noise["denoise_loss"] - 0.05, (smooth, noise)
    assert smooth["probe_val_latents"] == 24 and smooth["probe_steps"] == 150
    rows = (tmp_path / "out_s" / "denoise.csv").read_text().splitlines()
    assert rows[0] == "log_snr,relative,v_mse,baseline_v_mse" and len(rows) == 1 + 5
    assert (tmp_path / "out_s" / "denoise.png").stat().st_size > 5000


def test_a_rerun_writes_the_same_bytes(tmp_path):
    latents = write_latents(tmp_path / "smooth", "smooth", n_train=32, n_val=8)
    probe(latents, tmp_path / "a", steps=20)
    probe(latents, tmp_path / "b", steps=20)
    for name in ("metrics.json", "details.json", "denoise.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_latents_the_unet_cannot_halve_are_refused_naming_the_key(tmp_path):
    latents = write_latents(tmp_path / "odd", "noise", n_train=8, n_val=2, side=9)
    with pytest.raises(ValueError, match=r"probe.widths: 2 levels .* multiples of 2; these latents are 9x9"):
        probe(latents, tmp_path / "out")



@pytest.mark.slow
def test_fewer_latents_than_a_batch_train_on_partial_batches_and_say_so(tmp_path, capsys):
    m = probe(write_latents(tmp_path / "few", "noise", n_train=8, n_val=2), tmp_path / "out")  # batch_size 16
    assert m["probe_partial_batches"] is True and m["probe_steps"] == FAST["steps"]
    assert "no bucket gives a loader worker a full batch of probe.batch_size 16" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "details.json").read_text())["probe_partial_batches"] is True


def test_probe_widths_the_latents_cannot_take_fail_with_the_params(tmp_path):
    from ldm_vae.config import ParamError

    make_params(data={"resolution": 64}, probe={"widths": [8, 16, 32, 64]})  # 8 latents: halved 3 times
    with pytest.raises(ParamError, match="probe.widths: .* multiple of 8; a side of 32 px is 4 latents"):
        make_params(data={"resolution": 32}, probe={"widths": [8, 16, 32, 64]})
    bucket = {"crop": "bucket", "crops_per_image": 1, "val_crops_per_image": 1, "bucket_step": 32}
    with pytest.raises(ParamError, match="data.bucket_step or data.buckets"):  # buckets of 4 x 32 px sides
        make_params(data={**bucket, "resolution": 128}, probe={"widths": [32, 64, 128, 256]}, train={"crop_size": 32})
    make_params(data={**bucket, "resolution": 128}, probe={"widths": [32, 64, 128]}, train={"crop_size": 32})
