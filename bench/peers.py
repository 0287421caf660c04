"""The project against the tools a user would pick instead: the same inputs, the same machine, one
run, sides alternated round by round, every round printed.

    python bench/peers.py [--only urls folder loader encode] [--images 2000] [--rounds 3]
                          [--latents 24000] [--work /tmp/ldm-vae-peers]

1. ``urls``: 2,000 photo-like 500x375 JPEGs (bench/scale.py's) served from 127.0.0.1 with 20 ms per
   response, to 256 px centre crops in PNG shards: the project's download and prepare commands on
   default params (ADM crop, PNG) against img2dataset (2 processes x 16 threads, center_crop, PNG
   level 1, webdataset of 1,000 per shard).
2. ``folder``: the same JPEGs as a folder, to 256 px PNG shards: download + prepare against
   litdata's ``optimize`` (2 workers) and a plain multiprocessing pool that decodes, crops and
   writes tars (bench/peer_jobs.py), both with ADM's crop and Pillow's PNG at level 1.
3. ``loader``: ``--latents`` 4x32x32 latents (SD's at 256 px; ``--latent-side 8``: the demo's) in
   the project's shards, converted
   once to LitData's and MosaicML's formats; each read with batch 64 and 2 workers: plain
   webdataset, litdata's StreamingDataset and mosaicml-streaming's StreamingDataset under torch's
   DataLoader (each item made a float32 tensor), against ``latent_loader`` as a trainer uses it
   (posterior sample, channel normalisation), like for like (the mean, no normalisation), and
   with 0 workers (2 workers must give 1.6x). Rates: the median of the epochs after the first.
4. ``encode``: the fast-DiT / LightningDiT way (a DataLoader with 2 workers over the JPEG folder,
   ADM's crop, ``vae.encode`` per batch of 32, one .npy per sample) against the encode stage on
   the prepared shards of the same images (and against prepare + encode), the same fresh VAE of the
   demo's architecture.

The peers install themselves into venvs under ``<work>/venvs`` (never the project's): img2dataset
pins webdataset below 0.3; litdata and mosaicml-streaming want torchvision, which pulls a CUDA torch
(and PyPI's torchvision does not load beside the CPU torch), so that venv gets torch 2.13.0 (the
local CPU wheel) first and the two packages without their torchvision requirement (bench/peer_jobs.py).
Prints one JSON line per run and, at the end, the medians and ratios.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

JOBS = str(ROOT / "bench" / "peer_jobs.py")
PEERS = {
    "img2dataset": [["img2dataset==1.47.0"]],
    "litdata": [["torch==2.13.0"],
                ["--no-deps", "litdata==0.2.76", "mosaicml-streaming==0.13.0"],
                # their requirements, less torchvision (see the docstring)
                ["lightning-utilities", "filelock", "numpy<2.2", "boto3", "requests", "urllib3>=1.26", "tifffile",
                 "obstore", "xxhash<4", "zstd", "python-snappy", "Brotli", "tqdm", "catalogue", "pillow",
                 "transformers<5", "webdataset"]],
}
ROWS: list[dict] = []


def peer_python(work: Path, name: str) -> str:
    """The peer's venv (made once), its python."""
    venv = work / "venvs" / name
    if not (venv / ".ready").is_file():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        for args in PEERS[name]:
            subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *args], check=True)
        (venv / ".ready").write_text("")
    return str(venv / "bin" / "python")


def timed(cmd: list[str], **kw) -> tuple[float, str]:
    t = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode:
        raise SystemExit(f"{cmd[:4]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return time.time() - t, proc.stdout


def record(section: str, side: str, rnd: int, rate: float, unit: str, **extra) -> None:
    ROWS.append({"section": section, "side": side, "round": rnd, "rate": round(rate, 1), "unit": unit, **extra})
    print(json.dumps(ROWS[-1]), flush=True)


def project_params(path: Path, source: str) -> Path:
    """Default params, but the source and the job's crop: 256 px, ADM's centre crop, one per image."""
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"].update({"source": source, "resolution": 256, "crop": "adm", "crops_per_image": 1,
                        "val_crops_per_image": 1})
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def project_data(params: Path, work: Path) -> float:
    """download + prepare, from nothing: their commands' wall time."""
    for d in ("raw", "prepared"):
        shutil.rmtree(work / d, ignore_errors=True)
    a, _ = timed([sys.executable, "stages/download.py", "--params", str(params), "--out", str(work / "raw")], cwd=ROOT)
    b, _ = timed([sys.executable, "stages/prepare.py", "--params", str(params), "--raw", str(work / "raw"),
                  "--out", str(work / "prepared")], cwd=ROOT)
    return a + b


def alternate(rnd: int, sides: list) -> list:
    return sides if rnd % 2 == 0 else sides[::-1]


def bench_urls(work: Path, folder: Path, images: int, rounds: int) -> None:
    from helpers.httpserver import ImageServer, Route

    i2d = str(Path(peer_python(work, "img2dataset")).parent / "img2dataset")
    files = sorted(folder.rglob("*.jpg"))
    server = ImageServer(latency=0.02)
    for i, f in enumerate(files):
        server.routes[f"/{i}.jpg"] = Route(f.read_bytes(), content_type="image/jpeg")
    listing = work / "urls.txt"
    listing.write_text("".join(f"{server.url}/{i}.jpg\n" for i in range(len(files))))
    params = project_params(work / "urls.yaml", f"urls:{listing}")

    def project() -> float:
        secs = project_data(params, work / "urls-project")
        kept = sum(1 for _ in open(work / "urls-project" / "raw" / "manifest.jsonl"))
        assert kept == images, kept
        return secs

    def img2dataset() -> float:
        out = work / "urls-i2d"
        shutil.rmtree(out, ignore_errors=True)
        secs, _ = timed([i2d, "--url_list", str(listing), "--input_format", "txt", "--output_folder", str(out),
                         "--output_format", "webdataset", "--processes_count", "2", "--thread_count", "16",
                         "--image_size", "256", "--resize_mode", "center_crop", "--encode_format", "png",
                         "--encode_quality", "1", "--number_sample_per_shard", "1000", "--timeout", "10",
                         "--retries", "0", "--enable_wandb", "False", "--distributor", "multiprocessing"])
        ok = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
        assert ok == images, ok
        return secs

    try:
        for r in range(rounds):
            for side, fn in alternate(r, [("project", project), ("img2dataset", img2dataset)]):
                secs = fn()
                record("urls", side, r, images / secs, "images/s", seconds=round(secs, 1))
    finally:
        server.close()


def bench_folder(work: Path, folder: Path, images: int, rounds: int) -> None:
    litdata = peer_python(work, "litdata")
    params = project_params(work / "folder.yaml", f"folder:{folder}")
    sides = [("project", lambda: project_data(params, work / "folder-project")),
             ("litdata", lambda: timed([litdata, JOBS, "litdata-optimize", str(folder), str(work / "folder-litdata"),
                                        "2"])[0]),
             ("pool", lambda: timed([sys.executable, JOBS, "pool", str(folder), str(work / "folder-pool"), "2"])[0])]
    for r in range(rounds):
        for side, fn in alternate(r, sides):
            if side == "pool":
                shutil.rmtree(work / "folder-pool", ignore_errors=True)
            secs = fn()
            record("folder", side, r, images / secs, "images/s", seconds=round(secs, 1))


def latent_set(work: Path, n: int, side: int) -> Path:
    import numpy as np
    from loader import write_set

    folder = work / f"latents-{n}-{side}"
    if not (folder / "stats.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        write_set(folder, [(4, side, side)], n, np.random.default_rng(0))
        (folder / "stats.json").write_text(json.dumps({"channel_mean": [0.0] * 4, "channel_std": [1.0] * 4}))
    return folder


def bench_loader(work: Path, n: int, side: int, rounds: int, epochs: int = 4) -> None:
    """The latent loader against each peer's reader, twice: like for like (the mean as stored, the
    peers' sets hold nothing else) and doing a trainer's work (the peers' sets hold every field the
    project's do, and a per-item transform samples the posterior and normalises, as a user writes)."""
    litdata = peer_python(work, "litdata")
    shards = latent_set(work, n, side)
    converted = {}
    for name, job in (("litdata", "litdata-convert"), ("mds", "mds-convert")):
        for full in ("", "full"):
            folder = converted[name + full] = Path(f"{shards}-{name}{'-full' if full else ''}")
            if not (folder / ".done").is_file():
                shutil.rmtree(folder, ignore_errors=True)
                timed([litdata, JOBS, job, str(shards), str(folder), full])
                (folder / ".done").write_text("")
    args = ["64", "2", str(epochs), str(n)]
    stats = str(shards / "stats.json")
    sides = [
        ("latent_loader", [sys.executable, JOBS, "project-read", str(shards), *args]),
        (
            "latent_loader, 0 workers",
            [sys.executable, JOBS, "project-read", str(shards), "64", "0", str(epochs), str(n)],
        ),
        ("litdata, trainer work", [litdata, JOBS, "litdata-read", str(converted["litdatafull"]), *args, stats]),
        ("mosaicml-streaming, trainer work", [litdata, JOBS, "mds-read", str(converted["mdsfull"]), *args, stats]),
        ("latent_loader, mean only", [sys.executable, JOBS, "project-read", str(shards), *args, "mean"]),
        ("webdataset", [sys.executable, JOBS, "wds-read", str(shards), *args]),
        ("litdata", [litdata, JOBS, "litdata-read", str(converted["litdata"]), *args]),
        ("mosaicml-streaming", [litdata, JOBS, "mds-read", str(converted["mds"]), *args]),
    ]
    for r in range(rounds):
        for side, cmd in alternate(r, sides):
            rates = json.loads(timed(cmd, cwd=ROOT)[1].strip().splitlines()[-1])["rates"]
            record("loader", side, r, statistics.median(rates[1:]), "latents/s", epochs=[round(x) for x in rates])


def bench_encode(work: Path, folder: Path, images: int, rounds: int) -> None:
    from ldm_vae.config import load_params
    from ldm_vae.model import build_vae

    params = project_params(work / "encode.yaml", f"folder:{folder}")
    vae = work / "vae"
    if not (vae / "config.json").is_file():
        build_vae(load_params(params).model, 256).save_pretrained(vae)
    prepared = work / "folder-project" / "prepared"
    if not (prepared / "counts.json").is_file():
        project_data(params, work / "folder-project")

    def stage() -> float:
        shutil.rmtree(work / "encoded", ignore_errors=True)
        return timed([sys.executable, "stages/encode.py", "--params", str(params), "--vae", str(vae), "--prepared",
                      str(prepared), "--out", str(work / "encoded")], cwd=ROOT)[0]

    def fastdit() -> float:
        shutil.rmtree(work / "fastdit", ignore_errors=True)
        out = json.loads(timed([sys.executable, JOBS, "fastdit-encode", str(folder), str(vae), str(work / "fastdit"),
                                "32", "2"])[1].strip().splitlines()[-1])
        assert out["images"] == images
        return out["seconds"]

    for r in range(rounds):
        for side, fn in alternate(r, [("encode stage", stage), ("fast-DiT", fastdit)]):
            secs = fn()
            record("encode", side, r, images / secs, "images/s", seconds=round(secs, 1))


# The loader's peers that read the mean alone are paired with the project's loader doing the same.
LIKE_FOR_LIKE = {peer: "latent_loader, mean only" for peer in ("webdataset", "litdata", "mosaicml-streaming")}


def summary() -> None:
    print("\n| job | side | median | rounds |\n|---|---|---|---|")
    groups: dict[tuple, list[float]] = {}
    for row in ROWS:
        groups.setdefault((row["section"], row["side"], row["unit"]), []).append(row["rate"])
    for (section, side, unit), rates in groups.items():
        print(
            f"| {section} | {side} | {statistics.median(rates):,.0f} {unit} | {', '.join(f'{x:,.0f}' for x in rates)} |"
        )
    for section in dict.fromkeys(r["section"] for r in ROWS):
        mine = [r for r in ROWS if r["section"] == section]
        bases = {"loader": "latent_loader", "encode": "encode stage"}.get(section, "project")
        for side in dict.fromkeys(r["side"] for r in mine if r["side"] != bases):
            base = LIKE_FOR_LIKE.get(side, bases)
            pairs = [next(x["rate"] for x in mine if x["round"] == r["round"] and x["side"] == base) / r["rate"]
                     for r in mine if r["side"] == side]
            print(f"{section}: {base} / {side}: median {statistics.median(pairs):.2f}x "
                  f"(rounds: {', '.join(f'{p:.2f}' for p in pairs)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=("urls", "folder", "loader", "encode"),
                    default=["urls", "folder", "loader", "encode"])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--latents", type=int, default=24000)
    ap.add_argument(
        "--latent-side", type=int, default=32, help="latents are 4 x side x side (32: SD at 256 px; 8: the demo)"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/ldm-vae-peers"))
    args = ap.parse_args()
    from scale import photo_folder

    args.work.mkdir(parents=True, exist_ok=True)
    folder = photo_folder(args.work / "photos", args.images)
    if "urls" in args.only:
        bench_urls(args.work, folder, args.images, args.rounds)
    if "folder" in args.only:
        bench_folder(args.work, folder, args.images, args.rounds)
    if "loader" in args.only:
        bench_loader(args.work, args.latents, args.latent_side, args.rounds)
    if "encode" in args.only:
        bench_encode(args.work, folder, args.images, args.rounds)
    summary()


if __name__ == "__main__":
    main()
