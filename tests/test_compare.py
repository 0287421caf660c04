"""The comparison report over DVC experiments (ldm_vae/compare.py): one row a run and a row per
reference VAE, the rate-distortion plane and the denoising probe's curves."""

from ldm_vae.compare import runs_from_exp_show, write_report


def test_the_comparison_report_has_a_row_per_reference_at_its_own_channel_count(tmp_path):
    metrics = {"psnr": 21.5, "ssim": 0.57, "latent_channels": 4, "compression_ratio": 48.0, "psnr_bicubic": 21.3,
               "psnr_sd3": 27.0, "ssim_sd3": 0.8, "latent_channels_sd3": 16, "compression_ratio_sd3": 12.0,
               "rate_bpp": 0.21}
    params = {"params.yaml": {"data": {"loss": {"kl_weight": 0.003}}}}
    probe = {"denoise_loss": 0.87, "denoise_levels": {"lsnr-3": {"relative": 0.95}, "lsnr+0": {"relative": 0.7},
                                                      "lsnr+3": {"relative": 0.96}}}
    # dvc exp show has the headline (short names); the rest comes from the run's details.json.
    shown = [{"rev": "workspace", "name": "mine", "data": {"params": params, "metrics": {
        "data/eval/metrics.json": {"data": {"psnr": 21.5, "ssim": 0.57, "rate_bpp": 0.21}},
        "data/probe/metrics.json": {"data": {"denoise": 0.87}}}}}]
    details = {"data/eval/details.json": metrics, "data/probe/details.json": probe}
    rows = runs_from_exp_show(shown, lambda rev, path: details[path] if rev == "workspace" else {})
    assert [(r["run"], r["latent_channels"], r["psnr"]) for r in rows] == [("mine", 4, 21.5), ("ref:sd3", 16, 27.0)]
    assert rows[1]["compression_ratio"] == 12.0 and rows[0]["kl_weight"] == 0.003
    write_report(rows, tmp_path)
    table = (tmp_path / "channels.md").read_text()
    assert "ref:sd3 | 16 |  | 12.0 | 27.0" in table and "mine | 4 | 0.003 | 48.0 | 21.5 | 0.57 | 0.21 | 0.87" in table
    assert (tmp_path / "rate_distortion.png").stat().st_size > 1000  # the run's rate against its PSNR
    assert (tmp_path / "denoise.png").stat().st_size > 1000  # the probe's curve, one line a probed run
