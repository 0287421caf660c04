"""The data stages at scale: real `dvc repro` of download, prepare and encode on 20,000 photo-like
JPEGs, with 1 and with 2 processes, and what DVC costs in time, files and bytes.

    python bench/scale.py [--images 20000] [--work /tmp/ldm-vae-scale] [--stages download prepare encode] [--keep]

1. Builds (once; reused while it exists) a folder of ``--images`` JPEGs of 500x375 or 375x500,
   cut from the builtin photographs at random places, scales and flips and saved at quality 90,
   so that they decode and compress like ImageNet's photos.
2. Copies the repository twice (one per process count), points ``data.source`` at the folder,
   at 256 px with the ADM crop, and runs `dvc repro -s download`, `prepare` and `encode` (the last
   with a small fresh VAE of ``--vae-channels``; training is not part of this benchmark). Sides
   alternate stage by stage (this VM's speed drifts). Each stage command runs under a timer
   (bench/_timed.py), so DVC's own time is the repro's wall time minus the command's.
3. Prints one JSON line per run and a table: images/s, the 2-process speed-up, DVC's share, files
   DVC tracks and bytes on disk per image, the DVC cache included (du counts a hard link once).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

STAGES = ("download", "prepare", "encode")


def make_photo(args: tuple[int, str]) -> None:
    i, folder = args
    from PIL import Image

    from ldm_vae.ingest.sources import builtin_files

    rng = random.Random(i)
    files = [f for f in builtin_files() if f.path]
    with Image.open(files[i % len(files)].path) as src:
        src = src.convert("RGB")
    w, h = (500, 375) if rng.random() < 0.8 else (375, 500)
    # The largest box of this aspect that fits, scaled down at random, at a random place.
    fit = min(src.width / w, src.height / h) * rng.uniform(0.55, 1.0)
    bw, bh = max(8, int(w * fit)), max(8, int(h * fit))
    x, y = rng.randint(0, src.width - bw), rng.randint(0, src.height - bh)
    img = src.crop((x, y, x + bw, y + bh)).resize((w, h), Image.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    sub = Path(folder) / f"{i // 1000:03d}"
    sub.mkdir(exist_ok=True)
    img.save(sub / f"{i:06d}.jpg", quality=90)


def photo_folder(folder: Path, n: int) -> Path:
    if folder.is_dir() and sum(1 for _ in folder.rglob("*.jpg")) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t = time.time()
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(make_photo, [(i, str(folder)) for i in range(n)], chunksize=200))
    size = sum(p.stat().st_size for p in folder.rglob("*.jpg"))
    print(f"built {n} JPEGs ({size / n / 1e3:.0f} kB each) in {time.time() - t:.0f} s", flush=True)
    return folder


def make_repo(dst: Path, folder: Path, processes: int, vae_channels: list[int]) -> dict:
    import yaml

    from ldm_vae.config import load_params
    from ldm_vae.model import build_vae

    from helpers.common import copy_repo

    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    _, env = copy_repo(dst)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update({"source": f"folder:{folder}", "resolution": 256, "crop": "adm", "crops_per_image": 1,
                           "val_crops_per_image": 1, "num_workers": str(processes)})
    params["model"].update({"block_out_channels": vae_channels, "norm_num_groups": 1})
    params["encode"].update({"num_processes": str(processes), "batch_size": 32})
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = yaml.safe_load((dst / "dvc.yaml").read_text())
    for name in STAGES:  # the same command under a timer that writes its wall time
        stages["stages"][name]["cmd"] = f"python bench/_timed.py .timing/{name} " + stages["stages"][name]["cmd"]
    (dst / "dvc.yaml").write_text(yaml.safe_dump(stages, sort_keys=False))
    p = load_params(dst / "params.yaml")
    build_vae(p.model, p.data.resolution).save_pretrained(dst / "data" / "vae")  # encode's input, untrained
    subprocess.run(["git", "add", "-A"], cwd=dst, check=True, capture_output=True)
    subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=b@b", "commit", "-qm", "bench"], cwd=dst,
                   check=True, capture_output=True)
    return env


def du(*paths: Path) -> int:
    """Bytes on disk of ``paths`` together (one du: a hard-linked file counts once)."""
    paths = [str(p) for p in paths if p.exists()]
    if not paths:
        return 0
    out = subprocess.run(["du", "-s", "-B1", "-c", *paths], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1].split()[0])


OUTS = {"download": "data/raw", "prepare": "data/prepared", "encode": "data/latents"}


def run_stage(repo: Path, env: dict, stage: str, images: int, processes: int, again: bool = False) -> dict:
    out = OUTS[stage]
    if again:  # a repeat: from nothing again (the output persists, so a plain re-run would keep it all)
        shutil.rmtree(repo / out)
    cache = repo / ".dvc" / "cache"
    before = du(repo / "data", cache)
    t = time.time()
    proc = subprocess.run(["dvc", "repro", "-s", *(["-f"] if again else []), stage], cwd=repo, env=env,
                          capture_output=True, text=True)
    wall = time.time() - t
    if proc.returncode:
        sys.exit(f"{stage} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    command = float((repo / ".timing" / stage).read_text())
    # What DVC tracks: the output's files, less the runner's records (.dvcignore leaves them out).
    files = sum(1 for p in (repo / out).rglob("*") if p.is_file() and ".done" not in p.parts)
    row = {"stage": stage, "processes": processes, "round": int(again), "images": images, "repro_s": round(wall, 1),
           "command_s": round(command, 1), "images_per_s": round(images / command, 1),
           "dvc_share": round((wall - command) / wall, 3), "files": files, "images_per_file": round(images / files),
           # the output alone, and what the stage added on disk with DVC's cache (a hard link: nothing more)
           "bytes_per_image": round(du(repo / out) / images),
           "bytes_per_image_with_cache": round((du(repo / "data", cache) - before) / images)}
    print(json.dumps(row), flush=True)
    return row


def _median(rows: list[dict], stage: str, processes: int) -> dict:
    mine = sorted((r for r in rows if r["stage"] == stage and r["processes"] == processes),
                  key=lambda r: r["images_per_s"])
    return {**mine[len(mine) // 2], "runs": [r["images_per_s"] for r in mine]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/ldm-vae-scale"))
    ap.add_argument("--vae-channels", type=int, nargs=4, default=[8, 16, 32, 32])
    ap.add_argument("--keep", action="store_true", help="keep the two repositories afterwards")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                    help="the first N stages to run (each needs the ones before it)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds per stage, sides alternated; the median is shown")
    args = ap.parse_args()
    folder = photo_folder(args.work / "photos", args.images)
    repos = {n: args.work / f"repo-{n}p" for n in (1, 2)}
    envs = {n: make_repo(repos[n], folder, n, args.vae_channels) for n in repos}
    rows = []
    for k, stage in enumerate(STAGES[: max(STAGES.index(x) for x in args.stages) + 1]):
        for r in range(args.repeat):
            for n in ((1, 2) if (k + r) % 2 == 0 else (2, 1)):  # alternate which side goes first
                rows.append(run_stage(repos[n], envs[n], stage, args.images, n, again=r > 0))
    rows = [_median(rows, stage, n) for stage in dict.fromkeys(r["stage"] for r in rows) for n in (1, 2)]
    print("\n| stage | processes | images/s (median) | 2p / 1p | DVC share | files | images per file | bytes/image "
          "| with cache |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        one = next(x for x in rows if x["stage"] == r["stage"] and x["processes"] == 1)
        print(
            f"| {r['stage']} | {r['processes']} | {r['images_per_s']} | {r['images_per_s'] / one['images_per_s']:.2f}x"
            f" | {r['dvc_share']:.1%} | {r['files']} | {r['images_per_file']} | {r['bytes_per_image']:,}"
            f" | {r['bytes_per_image_with_cache']:,} |"
        )
    for n, repo in repos.items():
        cache = repo / ".dvc" / "cache"
        print(
            f"{n}p: data/ {du(repo / 'data') / 1e6:.0f} MB, data/ + DVC cache {du(repo / 'data', cache) / 1e6:.0f} MB, "
            f"cache alone {du(cache) / 1e6:.0f} MB"
        )
    if not args.keep:
        for repo in repos.values():
            shutil.rmtree(repo, ignore_errors=True)


if __name__ == "__main__":
    main()
