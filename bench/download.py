"""URL download throughput: data.download_workers 1 vs 16 against a local server with latency.

    python bench/download.py [--images 200] [--latency 0.05]

Serves small real PNGs from 127.0.0.1 (tests/httpserver.py) with a fixed delay per response,
standing in for a remote host's round trip, and runs the real download stage (fetch, sha256,
full decode, atomic write, manifest) on the same list with 1 and with 16 workers in one process.
"""

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from ldm_vae.config import DataConfig  # noqa: E402
from ldm_vae.ingest.download import run_download  # noqa: E402

from helpers.httpserver import ImageServer, Route  # noqa: E402


def png(seed: int, size: int = 128) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--latency", type=float, default=0.05, help="seconds the server waits per response")
    args = ap.parse_args()
    server = ImageServer(latency=args.latency)
    for i in range(args.images):
        server.routes[f"/{i}.png"] = Route(png(i), content_type="image/png")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "urls.txt"
        listing.write_text("".join(f"{server.url}/{i}.png\n" for i in range(args.images)))
        for workers in (1, 16):
            out = Path(tmp) / f"raw{workers}"
            t = time.perf_counter()
            summary = run_download(DataConfig(source=f"urls:{listing}", download_workers=workers), out)
            elapsed = time.perf_counter() - t
            assert summary["kept"] == args.images, summary
            results[workers] = args.images / elapsed
            print(f"workers={workers:2d}: {args.images} images in {elapsed:.2f} s = {results[workers]:.1f} images/s",
                  flush=True)
    server.close()
    print(f"speed-up 16 vs 1 workers: {results[16] / results[1]:.1f}x "
          f"({args.images} 128x128 PNGs, {args.latency * 1000:.0f} ms server latency)")


if __name__ == "__main__":
    main()
