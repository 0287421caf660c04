"""The Ray engine's overhead against the local pool, and DVC's hashing with `core.checksum_jobs`.

    python bench/engines.py [--images 2000] [--unit-images 250] [--rounds 3] [--work /tmp/ldm-vae-engines]

1. Builds (once) ``--images`` photo-like 500x375 JPEGs (bench/scale.py's), downloads them once
   into raw shards of ``--unit-images`` (so that prepare has units for every worker).
2. Runs the real prepare command (`stages/prepare.py`, 256 px, ADM crop, PNG) on the same raw
   shards, sides alternated each round: the local engine (`data.num_workers: 2`) and the Ray
   engine on a cluster started here with `ray start` (tests/raycluster.py, on 127.0.0.1): by
   default a head and a second node, the cores split between them; ``--nodes 1``: a head alone
   with every core (one set of Ray's daemons instead of two on the same cores). Each run writes a
   fresh folder; the wall time is the
   command's, interpreter start, `ray.init` and the shared-folder probe included. Both sides'
   outputs are compared byte for byte.
3. Times DVC's hashing of a large output (``--hash-mb`` of shard-sized files, `dvc add
   --no-commit` with DVC's hash cache cleared) at `core.checksum_jobs` 1 and the number of cores,
   alternated.
Prints one JSON line per run, then the medians and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]


def params(path: Path, folder: Path, unit_images: int, engine: dict) -> Path:
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"].update({"source": f"folder:{folder}", "unit_images": unit_images, "resolution": 256, "crop": "adm",
                        "num_workers": "2", "crops_per_image": 1, "val_crops_per_image": 1})
    raw["engine"] = engine
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run(cmd: list[str], env: dict) -> float:
    t = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return time.time() - t


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".done" not in p.parts}


def bench_prepare(work: Path, images: int, unit_images: int, rounds: int, nodes: int) -> dict:
    from scale import photo_folder

    from helpers.raycluster import RayCluster, ray_env

    folder = photo_folder(work / "photos", images)
    env = ray_env()
    local = params(work / "local.yaml", folder, unit_images, {"kind": "local"})
    raw = work / "raw"
    if not (raw / "manifest.jsonl").is_file():
        run([sys.executable, "stages/download.py", "--params", str(local), "--out", str(raw)], env)
    cores = len(os.sched_getaffinity(0))
    cluster = RayCluster(Path("/tmp/ldmvae-bench-ray"), (1, cores - 1) if nodes == 2 else (cores,)).start()
    try:
        on_ray = params(work / "ray.yaml", folder, unit_images, {"kind": "ray", "ray_address": cluster.address})
        rows = []
        for r in range(rounds):
            for side, p in (("local", local), ("ray", on_ray)) if r % 2 == 0 else (("ray", on_ray), ("local", local)):
                out = work / f"prepared-{side}"
                shutil.rmtree(out, ignore_errors=True)
                secs = run(
                    [sys.executable, "stages/prepare.py", "--params", str(p), "--raw", str(raw), "--out", str(out)], env
                )
                rows.append(
                    {"round": r, "engine": side, "seconds": round(secs, 2), "images_per_s": round(images / secs, 1)}
                )
                print(json.dumps(rows[-1]), flush=True)
            a, b = files_of(work / "prepared-local"), files_of(work / "prepared-ray")
            assert a == b, "the two engines wrote different prepared shards"
    finally:
        cluster.stop()
    med = {side: statistics.median(x["images_per_s"] for x in rows if x["engine"] == side) for side in ("local", "ray")}
    pairs = [
        next(x for x in rows if x["round"] == r and x["engine"] == "ray")["images_per_s"]
        / next(x for x in rows if x["round"] == r and x["engine"] == "local")["images_per_s"]
        for r in range(rounds)
    ]
    return {"ray_nodes": nodes, "prepare_images_per_s": med, "ray_over_local": round(med["ray"] / med["local"], 3),
            "paired_ratios": [round(x, 3) for x in pairs]}


def bench_hashing(work: Path, mb: int, rounds: int) -> dict:
    repo = work / "dvcrepo"
    if not (repo / ".dvc").is_dir():
        shutil.rmtree(repo, ignore_errors=True)
        (repo / "big").mkdir(parents=True)
        subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
        subprocess.run(["dvc", "init", "-q"], cwd=repo, check=True)
        chunk = 25  # MB per file: a raw shard of 5,000 small JPEGs is ~240 MB, a prepared one ~100 MB
        for i in range(mb // chunk):
            (repo / "big" / f"shard-{i:04d}.tar").write_bytes(os.urandom(chunk * 2**20))
    cores = len(os.sched_getaffinity(0))
    rows = []
    for r in range(rounds):
        for jobs in (1, cores) if r % 2 == 0 else (cores, 1):
            subprocess.run(["dvc", "config", "core.checksum_jobs", str(jobs)], cwd=repo, check=True)
            shutil.rmtree(repo / ".dvc" / "tmp", ignore_errors=True)  # DVC's cache of file hashes
            t = time.time()
            subprocess.run(["dvc", "add", "--no-commit", "-q", "big"], cwd=repo, check=True)
            rows.append({"round": r, "checksum_jobs": jobs, "seconds": round(time.time() - t, 2),
                         "MB_per_s": round(mb / (time.time() - t), 1)})
            print(json.dumps(rows[-1]), flush=True)
    med = {jobs: statistics.median(x["MB_per_s"] for x in rows if x["checksum_jobs"] == jobs) for jobs in (1, cores)}
    return {"hash_MB_per_s": med, "speedup": round(med[cores] / med[1], 3), "MB": mb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--unit-images", type=int, default=250)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hash-mb", type=int, default=2000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/ldm-vae-engines"))
    ap.add_argument("--only", choices=("prepare", "hashing"), default=None)
    ap.add_argument("--nodes", type=int, choices=(1, 2), default=2,
                    help="Ray nodes on this machine: 2 (a head and a second node, the cores split) or 1")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    result = {}
    if args.only in (None, "prepare"):
        result.update(bench_prepare(args.work, args.images, args.unit_images, args.rounds, args.nodes))
    if args.only in (None, "hashing"):
        result.update(bench_hashing(args.work, args.hash_mb, args.rounds))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
