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


def test_vq_runs_sit_on_the_same_rate_distortion_plane_beside_an_earlier_sweep(tmp_path):
    """A VQ run (its rate log2 K per token, no KL weight, the probe not applicable) and the rows of
    an earlier report's channels.csv (`stages/compare.py --with`) in one report."""
    from ldm_vae.compare import rows_from_csv

    vq = {"psnr": 19.0, "ssim": 0.45, "latent_channels": 4, "compression_ratio": 192.0, "codebook_size": 1024,
          "codebook_usage": 0.6, "codebook_perplexity": 300.0, "rate_bpp": 10 / 64, "rate_entropy_bpp": 8 / 64}
    shown = [{"rev": "abc1234", "name": "vq-1024", "data": {"params": {}, "metrics": {
        "data/eval/metrics.json": {"data": {"psnr": 19.0, "ssim": 0.45, "usage": 0.6}},
        "data/probe/metrics.json": {"data": {"denoise": None}}}}}]
    details = {"data/eval/details.json": vq, "data/probe/details.json": {"denoise_loss": None}}
    rows = runs_from_exp_show(shown, lambda rev, path: details[path])
    assert rows[0]["kl_weight"] is None and "denoise_loss" not in rows[0] and rows[0]["codebook_size"] == 1024
    earlier = tmp_path / "earlier.csv"
    earlier.write_text("run,latent_channels,kl_weight,psnr,ssim,rate_bpp,denoise_loss\nch8,8,0.003,21.73,0.582,0.618,0.84\n")
    rows += rows_from_csv(earlier)
    assert rows[1] == {"run": "ch8", "latent_channels": 8, "kl_weight": 0.003, "psnr": 21.73, "ssim": 0.582,
                       "rate_bpp": 0.618, "denoise_loss": 0.84}
    write_report(rows, tmp_path / "out")
    table = (tmp_path / "out" / "channels.md").read_text()
    assert (
        "| codebook_size |" in table and "vq-1024 | 4 |  | 1024 | 192.0 | 19.0 | 0.45 | 0.1562 | 0.125 | 0.6 |" in table
    )
    assert (tmp_path / "out" / "rate_distortion.png").stat().st_size > 1000
