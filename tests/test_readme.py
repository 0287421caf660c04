"""The README's code, run as written: what a new user pastes first must work."""

import os
import re
import subprocess
import sys

from conftest import ROOT, published_vae


def _block_after(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(re.escape(marker) + r".*?```python\n(.*?)```", text, re.S).group(1)


def test_the_loader_snippet_runs_as_written(tmp_path):
    """On latents as encode lays them out (enough for 4 workers' full batches of 64) and an
    exported VAE, in the folder a `dvc repro` leaves."""
    from test_probe import write_latents

    write_latents(tmp_path / "data" / "latents", "smooth", n_train=600, n_val=8)
    published_vae(tmp_path / "data" / "vae", "sd")
    code = _block_after("Its core, the loader part") + "\nprint(tuple(z0.shape), tuple(images.shape))\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[-2] == "(64, 4, 8, 8) (8, 3, 64, 64)"


def test_what_the_readme_commands_write_is_ignored_by_git():
    """The example's --out folder and compare.py's report are results of the moment, not sources."""
    paths = ["diffusion-run/samples.png", "data/eval/channels.md", "data/eval/channels.csv", "data/eval/channels.png",
             "data/eval/rate_distortion.png", "data/eval/denoise.png"]
    proc = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True)
    assert sorted(proc.stdout.split()) == sorted(paths)
