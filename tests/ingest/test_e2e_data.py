"""`dvc repro` of download and prepare killed mid-run (dvc and its stage, as one process group)
and run again: every finished unit is kept, only the rest is redone, every input once."""

import json
import os
import signal
import subprocess
import time

import pytest
import yaml

from helpers.common import ROOT, TINY, copy_repo, image_bytes, photo, run, stages_run
from helpers.httpserver import ImageServer, Route

pytestmark = pytest.mark.slow

IMAGES = 12


@pytest.fixture(scope="module")
def server():
    s = ImageServer()
    for i in range(IMAGES):
        s.routes[f"/{i}.png"] = Route(image_bytes(photo(256, 192, seed=i)), delay=0.15)
    yield s
    s.close()


@pytest.fixture(scope="module")
def repo(tmp_path_factory, server):
    dst, env = copy_repo(tmp_path_factory.mktemp("repo"))
    listing = dst / "urls.csv"
    listing.write_text("key,url\n" + "".join(f"k{i:02d},{server.url}/{i}.png\n" for i in range(IMAGES)))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    # Units of 2 images, one worker: a unit takes a few tenths of a second in each stage, so
    # the kill lands between units. Many crops make prepare's units slow enough to be caught.
    params["data"].update({"source": f"urls:{listing}", "unit_images": 2, "num_workers": 1, "download_workers": 1,
                           "crops_per_image": 150, "val_crops_per_image": 150, "resolution": 64})
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dst, env


def kill_when(cmd, dst, env, records: str, at_least: int = 1):
    """Start ``cmd``; SIGKILL its whole process group once ``records`` has ``at_least`` files."""
    proc = subprocess.Popen(cmd, cwd=dst, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((dst / records).glob("u*.json"))) < at_least:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return sorted(p.name for p in (dst / records).glob("u*.json"))


def test_killed_download_resumes_through_dvc(repo, server):
    dst, env = repo
    done = kill_when(["dvc", "repro", "download"], dst, env, "data/raw/.done")
    assert 1 <= len(done) < IMAGES // 2 and not (dst / "data/raw/manifest.jsonl").exists()
    stamps = {n: (dst / "data/raw/.done" / n).stat().st_mtime_ns for n in done}
    before = sum(server.hits.values())

    out = run(["dvc", "repro", "download"], dst, env)
    assert stages_run(out) == {"download"} and f"{len(done)} of {IMAGES // 2} units already done" in out
    assert sum(server.hits.values()) - before == IMAGES - 2 * len(done)  # only the unfinished units
    assert all((dst / "data/raw/.done" / n).stat().st_mtime_ns == t for n, t in stamps.items())
    rows = [json.loads(x) for x in (dst / "data/raw/manifest.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == [f"k{i:02d}" for i in range(IMAGES)]  # each once, in list order
    assert len(list((dst / "data/raw/shards").iterdir())) == IMAGES // 2
    assert "Data and pipelines are up to date" in run(["dvc", "status", "download"], dst, env)


def test_killed_prepare_resumes_through_dvc(repo):
    dst, env = repo
    run(["dvc", "repro", "download"], dst, env)
    done = kill_when(["dvc", "repro", "prepare"], dst, env, "data/prepared/.done")
    assert 1 <= len(done) < IMAGES // 2 and not (dst / "data/prepared/counts.json").exists()
    stamps = {n: (dst / "data/prepared/.done" / n).stat().st_mtime_ns for n in done}

    out = run(["dvc", "repro", "prepare"], dst, env)
    assert stages_run(out) == {"prepare"}
    assert all((dst / "data/prepared/.done" / n).stat().st_mtime_ns == t for n, t in stamps.items())
    counts = json.loads((dst / "data/prepared/counts.json").read_text())
    assert counts["train"]["images"] + counts["val"]["images"] == IMAGES
    assert counts["train"]["samples"] + counts["val"]["samples"] == IMAGES * 150

    # The resumed output equals a clean run's, file for file and byte for byte.
    fresh = dst / "fresh"
    run(["python", "stages/prepare.py", "--raw", "data/raw", "--out", str(fresh)], dst, env)
    resumed = dst / "data/prepared"
    names = sorted(p.relative_to(resumed).as_posix() for p in resumed.rglob("*.tar"))
    assert names == sorted(p.relative_to(fresh).as_posix() for p in fresh.rglob("*.tar")) and names
    assert all((resumed / n).read_bytes() == (fresh / n).read_bytes() for n in names)
