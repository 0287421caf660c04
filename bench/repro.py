"""What a CPU training run's weights depend on, and what pinning the kernels costs.

Trains the demo model (params.yaml's model/loss/train, ``--steps`` steps) on ``data/prepared`` in a
fresh process per setting, sides alternated over ``--rounds``, and prints per run: steps/s, the
validation PSNR of the exported VAE and the sha256 of its safetensors. Settings:

    native      the kernels torch picks for this CPU (AVX-512 where it has it), 2 threads
    native-1t   the same with 1 thread
    aten-avx2   ATEN_CPU_CAPABILITY=avx2 only (ATen's own kernels: norms, reductions, optimizers)
    onednn-avx2 ONEDNN_MAX_CPU_ISA=AVX2 only (oneDNN: the convolutions)
    mkl-avx2    MKL_CBWR=AVX2 only (MKL: matrix products, the attention's linear layers)
    pinned      what the train stage sets on a CPU (ldm_vae.reproducible): ATen, oneDNN and MKL
                held to AVX2, 2 threads

    python bench/repro.py --steps 300 --rounds 3 [--settings native,pinned]

Needs the demo's data/prepared (``dvc repro prepare``). Run nothing else on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PIN = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}
SETTINGS = {
    "native": ({}, 2),
    "native-1t": ({}, 1),
    "aten-avx2": ({"ATEN_CPU_CAPABILITY": "avx2"}, 2),
    "onednn-avx2": ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, 2),
    "mkl-avx2": ({"MKL_CBWR": "AVX2"}, 2),
    "pinned": (PIN, 2),
}


def worker(out: Path, steps: int, threads: int) -> None:
    import torch

    from ldm_vae.config import load_params
    from ldm_vae.shards import shard_paths
    from ldm_vae.train.training import train

    params = load_params(ROOT / "params.yaml")
    params = replace(params, train=replace(params.train, max_steps=steps, checkpoint_every=10 ** 9,
                                           val_every=steps, sample_every=steps, cpu_threads=threads))
    prepared = ROOT / "data" / "prepared"
    t = time.perf_counter()
    result = train(params, shard_paths(prepared / "train"), shard_paths(prepared / "val"), out / "vae",
                   out / "logs", out / "ckpt")
    seconds = time.perf_counter() - t
    weights = (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    print(json.dumps({"steps_per_s": steps / seconds, "val_psnr": result["val_psnr"],
                      "sha256": hashlib.sha256(weights).hexdigest()[:16],
                      "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}))


def run(setting: str, steps: int) -> dict:
    env_extra, threads = SETTINGS[setting]
    env = {k: v for k, v in os.environ.items() if k not in PIN}
    env.update(env_extra, OMP_NUM_THREADS=str(threads))
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, __file__, "--worker", tmp, "--steps", str(steps),
                               "--threads", str(threads)], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{setting}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--settings", default="native,pinned,native-1t,aten-avx2")
    ap.add_argument("--worker", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.steps, args.threads)
    settings = args.settings.split(",")
    results: dict[str, list[dict]] = {s: [] for s in settings}
    for r in range(args.rounds):
        for s in (settings if r % 2 == 0 else settings[::-1]):  # sides alternated round to round
            res = run(s, args.steps)
            results[s].append(res)
            print(f"round {r + 1} {s:10s} {res['steps_per_s']:6.2f} steps/s  val PSNR {res['val_psnr']:.3f} dB  "
                  f"weights {res['sha256']}  ({res['capability']}, {res['threads']} threads)", flush=True)
    base = settings[0]
    for s in settings:
        rates = [r["steps_per_s"] for r in results[s]]
        ratios = [a["steps_per_s"] / b["steps_per_s"] for a, b in zip(results[s], results[base])]
        hashes = sorted({r["sha256"] for r in results[s]})
        print(
            f"{s:10s} {min(rates):.2f}-{max(rates):.2f} steps/s, {min(ratios):.2f}-{max(ratios):.2f}x {base}; "
            f"PSNR {', '.join(format(r['val_psnr'], '.3f') for r in results[s])}; "
            f"distinct weights {len(hashes)}: {hashes}"
        )


if __name__ == "__main__":
    main()
