"""The README's and the guides' code, run as written, and their links: what a new user pastes first
must work, and every relative link and anchor in README.md, BENCHMARKS.md and docs/ resolves."""

import os
import re
import subprocess
import sys

import pytest

from helpers.common import ROOT, published_vae


def _block_after(marker: str, doc: str = "README.md") -> str:
    text = (ROOT / doc).read_text()
    return re.search(re.escape(marker) + r".*?```python\n(.*?)```", text, re.S).group(1)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # a '#' in a code block is no heading
    return {_slug(h) for h in re.findall(r"^#+ (.*)$", text, re.M)}


def test_every_relative_link_and_anchor_resolves():
    docs = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for doc in docs:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_trainers_guide_shows_the_readmes_loader_snippet():
    """One snippet in two places (the front door and the guide): the test below runs it, this keeps
    the two from drifting."""
    assert _block_after("Its core, the loader part") == _block_after("Its core, the loader part", "docs/trainer.md")


@pytest.mark.slow
def test_the_loader_snippet_runs_as_written(tmp_path):
    """On latents as encode lays them out (enough for 4 workers' full batches of 64) and an
    exported VAE, in the folder a `dvc repro` leaves."""
    from helpers.common import write_latents

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
