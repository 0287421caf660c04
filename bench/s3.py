"""Object storage at the 2,000-image scale: a real S3-compatible server (SeaweedFS on 127.0.0.1),
the download stage from a bucket against the same folder, and a DVC remote's push and pull.

    python bench/s3.py [--images 2000] [--work /tmp/ldm-vae-s3] [--repeat 2] [--listing 10000 100000]

1. The photo-like JPEG folder of bench/scale.py (500x375, ~47 kB), uploaded to s3://bench/photos.
2. ``run_download`` from ``folder:`` and from ``s3://`` in this process, sides alternated
   ``--repeat`` times: images/s and their ratio (the server is on loopback: this measures the
   source's own overhead, listing, GETs and checks, not a network).
3. A copy of the repository on the folder (256 px, ADM crop), `dvc repro -s download / prepare /
   encode` (encode with a fresh small VAE, as bench/scale.py), then `dvc push` to an S3 remote,
   a fresh `git clone` and `dvc pull` there, timed; objects in the remote against output files,
   shards and images; and `dvc repro` in the clone (must run nothing).
4. ``--listing N ...``: buckets of N 1-byte ``.jpg`` keys, planned as an ``s3://`` source: the
   planner's peak Python memory (tracemalloc) and keys/s, which should not grow with N.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("download", "prepare", "encode")
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{cmd} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t


def download_rates(folder: Path, work: Path, server, n: int, repeat: int) -> list[dict]:
    from ldm_vae.ingest.download import run_download

    from helpers.common import make_params

    rows = []
    for r in range(repeat):
        for side in (("folder", "s3") if r % 2 == 0 else ("s3", "folder")):
            source = f"folder:{folder}" if side == "folder" else "s3://bench/photos"
            out = work / f"raw-{side}"
            shutil.rmtree(out, ignore_errors=True)
            cfg = make_params(data={"source": source, "unit_images": 500}).data
            t = time.perf_counter()
            summary = run_download(cfg, out)
            sec = time.perf_counter() - t
            assert summary["kept"] == n, summary
            rows.append({"round": r, "source": side, "seconds": round(sec, 2), "images_per_s": round(n / sec, 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def remote_round_trip(folder: Path, work: Path, server) -> dict:
    from scale import make_repo

    repo = work / "repo"
    env = {**make_repo(repo, folder, 2, [8, 16, 32, 32]), **server.env}
    stage_s = {s: round(timed(["dvc", "repro", "-s", s], repo, env), 1) for s in STAGES}
    server.make_bucket("bench-dvc")
    timed(["dvc", "remote", "add", "-d", "-f", "store", "s3://bench-dvc/ldm-vae"], repo, env)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, capture_output=True)
    subprocess.run(["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "run"], cwd=repo,
                   check=True, capture_output=True)
    push = timed(["dvc", "push", *STAGES], repo, env)
    objects = server.keys("s3://bench-dvc/ldm-vae/")
    clone = work / "clone"
    shutil.rmtree(clone, ignore_errors=True)
    timed(["git", "clone", "-q", str(repo), str(clone)], work, env)
    # The stages run here (train's VAE was made by make_repo, not by its stage: encode's input
    # is not in the cache, so `dvc repro` in the clone checks download and prepare).
    pull = timed(["dvc", "pull", *STAGES], clone, {**env, "PYTHONPATH": str(clone)})
    ran = set()
    for stage in ("download", "prepare"):
        out = subprocess.run(["dvc", "repro", "-s", stage], cwd=clone, env={**env, "PYTHONPATH": str(clone)},
                             capture_output=True, text=True)
        ran |= set(re.findall(r"Running stage '([a-z]+)'", out.stdout + out.stderr))
    same = all((clone / p.relative_to(repo)).read_bytes() == p.read_bytes()
               for p in (repo / "data").rglob("*") if p.is_file() and ".done" not in p.parts and
               p.relative_to(repo / "data").parts[0] in ("raw", "prepared", "latents"))
    files = [p for p in (repo / "data").rglob("*") if p.is_file() and ".done" not in p.parts
             and p.relative_to(repo / "data").parts[0] in ("raw", "prepared", "latents")]
    return {"stage_seconds": stage_s, "push_s": round(push, 1), "pull_s": round(pull, 1),
            "objects_pushed": len(objects), "output_files": len(files),
            "shards": sum(p.suffix == ".tar" for p in files),
            "bytes": sum(p.stat().st_size for p in files), "repro_in_clone_ran": sorted(ran),
            "pulled_byte_for_byte": same}


def planner_memory(server, sizes: list[int]) -> list[dict]:
    """Peak Python memory (tracemalloc) and time of planning an s3:// source of n keys: flat in n
    is the claim (the listing streams; units keep summaries; collisions go to SQLite on disk)."""
    import tracemalloc
    from concurrent.futures import ThreadPoolExecutor

    from ldm_vae.ingest.s3_source import plan_s3

    from helpers.common import make_params

    rows, have = [], 0
    server.make_bucket("listing")
    c = server.client()
    for n in sorted(sizes):
        with ThreadPoolExecutor(16) as pool:  # keys only matter to a plan: 1-byte objects
            list(pool.map(lambda i: c.put_object(Bucket="listing", Key=f"keys/{i // 1000:04d}/{i:08d}.jpg", Body=b"x"),
                          range(have, n)))
        have = n
        cfg = make_params(data={"source": "s3://listing/keys", "unit_images": 5000}).data
        tracemalloc.start()
        t = time.perf_counter()
        units = plan_s3(cfg)
        sec = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        rows.append({"keys": n, "units": len(units), "plan_s": round(sec, 2), "peak_mib": round(peak / 2**20, 2),
                     "keys_per_s": round(n / sec)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/ldm-vae-s3"))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--listing", type=int, nargs="*", default=[],
                    help="also plan listings of these many keys and report the planner's peak memory")
    ap.add_argument("--no-remote", action="store_true", help="skip the DVC push/pull round trip")
    args = ap.parse_args()
    from scale import photo_folder

    from helpers.s3server import SeaweedS3

    folder = photo_folder(args.work / f"photos-{args.images}", args.images)
    server = SeaweedS3(args.work / "seaweedfs")
    shutil.rmtree(server.root / "data", ignore_errors=True)
    server.start()
    try:
        os.environ.update(server.env)
        t = time.perf_counter()
        server.upload(folder, "s3://bench/photos")
        print(f"uploaded {args.images} objects in {time.perf_counter() - t:.1f} s (one thread)", flush=True)
        rows = download_rates(folder, args.work, server, args.images, args.repeat)
        if rows:
            rate = {s: sorted(r["images_per_s"] for r in rows if r["source"] == s) for s in ("folder", "s3")}
            print(json.dumps({"download_images_per_s": rate,
                              "s3_over_folder": round(sum(rate["s3"]) / sum(rate["folder"]), 3)}), flush=True)
        if not args.no_remote:
            print(json.dumps(remote_round_trip(folder, args.work, server)), flush=True)
        if args.listing:
            planner_memory(server, args.listing)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
