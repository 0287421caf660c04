"""The prepared GPU check: everything a GPU must show, in one command, one table and one JSON file.

    python bench/gpu_check.py [--out gpu_check.json]       # under 10 minutes on one H100
    python bench/gpu_check.py --tiny                        # the same steps at tiny sizes (a CPU: forced)

Steps, each on the embedded demo's photographs (data.source: builtin), prepared here:

1. ``train_bf16_gan``: the SD preset's architecture (kl-f8, 4 channels) in bf16, the
   discriminator switched on half-way (LPIPS off: its weights are a download).
2. ``train_fp16_overflow``: the same in fp16 with two injected overflows: the run ends at its last
   step, the overflows skipped and counted, the loss scale lowered.
3. ``vq_bf16_tokens``: a VQ run (with the discriminator) in bf16; the trainer's lookup under bf16
   autocast against encode's on the same latents (``agree_lookup``: 1.0), beside what a bf16
   lookup gave and the whole path against the stored tokens (``Check.vq_tokens``).
4. ``encode_fp32`` / ``encode_bf16``: encode at 256 px, images/s, and the PSNR of the stored
   latents' reconstructions (the bf16 cost is the difference).
5. ``evaluate``: the evaluate stage on the fp32 latents.
6. ``ray_encode``: a 1-GPU Ray cluster on this machine encodes the same shards as Ray tasks: the
   same bytes as the local encode.

On a CPU (tests/train/test_gpu_check.py runs it there) the steps run at tiny sizes under the
imitations of tests/gpu_imitation.py: CPU bf16 autocast, a CPU GradScaler for fp16, and a Ray node
that declares a GPU torch cannot use (so the Ray step encodes fp32, and bf16 is refused in the
task, naming the node). What each figure means on a GPU is in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # gpu_imitation: the CPU's stand-ins

from ldm_vae.config import EngineConfig, params_from_dict  # noqa: E402
from ldm_vae.shards import iter_samples, shard_paths  # noqa: E402

GPU = torch.cuda.is_available()


def sizes(tiny: bool) -> dict:
    """Per-step sizes: a GPU's (a few hundred steps of the SD architecture at 256 px) or tiny."""
    if tiny:
        return {"resolution": 32, "crops": 2, "val_crops": 4, "steps": 6, "vq_steps": 4, "batch": 4,
                "model": {"block_out_channels": [8, 8, 16, 16], "norm_num_groups": 2, "layers_per_block": 1},
                "encode_repeats": 1, "encode_batch": 8}
    return {"resolution": 256, "crops": 4, "val_crops": 2, "steps": 300, "vq_steps": 200, "batch": 8,
            "model": {}, "encode_repeats": 8, "encode_batch": 64}


def check_params(size: dict, **overrides) -> dict:
    """The SD preset (kl-f8, 4 channels) at ``size``, LPIPS off, as a params dict."""
    raw = yaml.safe_load((ROOT / "presets" / "sd-kl-f8-256-c4.yaml").read_text())
    raw["data"].update({"source": "builtin", "resolution": size["resolution"], "crop": "multiscale",
                        "crops_per_image": size["crops"], "val_crops_per_image": size["val_crops"],
                        "samples_per_shard": 256, "num_workers": "auto"})
    raw["model"].update(size["model"])
    raw["loss"].update({"perceptual_weight": 0.0, "disc_start": size["steps"] // 2})
    raw["train"].update({"max_steps": size["steps"], "batch_size": size["batch"], "crop_size": 0,
                         "warmup_steps": 10, "log_every": 1, "val_every": size["steps"],
                         "sample_every": size["steps"], "checkpoint_every": 10**6, "scale_samples": 64,
                         "num_workers": 2 if GPU else 0, "num_processes": "1", "cpu_threads": 0})
    raw["encode"].update({"batch_size": size["encode_batch"], "num_processes": "1", "dtype": "bf16" if GPU else "fp32"})
    raw["evaluate"].update({"batch_size": 32, "lpips": False, "rfid": False, "references": []})
    for section, values in overrides.items():
        raw[section].update(values)
    return raw


class Check:
    def __init__(self, tiny: bool, work: Path):
        self.tiny, self.work, self.size = tiny, work, sizes(tiny)
        self.rows: list[dict] = []

    def row(self, step: str, seconds: float, **figures) -> None:
        self.rows.append({"step": step, "seconds": round(seconds, 1), **figures})
        print(f"  {step}: " + ", ".join(f"{k} {v}" for k, v in figures.items()) + f" ({seconds:.1f} s)", flush=True)

    def data(self) -> None:
        from ldm_vae.ingest.download import run_download
        from ldm_vae.ingest.prepare import run_prepare

        params = params_from_dict(check_params(self.size))
        t = time.perf_counter()
        run_download(params.data, self.work / "raw")
        run_prepare(params.data, self.work / "raw", self.work / "prepared")
        self.train_shards = shard_paths(self.work / "prepared" / "train")
        self.val_shards = shard_paths(self.work / "prepared" / "val")
        n = sum(1 for _ in iter_samples(self.train_shards + self.val_shards))
        self.row("data", time.perf_counter() - t, images=n)

    def train(self, name: str, raw: dict, fp16_overflows: set[int] | None = None) -> dict:
        from ldm_vae.train.training import train

        from helpers.gpu_imitation import fp16_on_cpu, fresh_precision, inject_overflows

        params = params_from_dict(raw)
        out = self.work / name
        with contextlib.ExitStack() as stack:
            patch = stack.enter_context(_monkeypatch())
            stack.enter_context(fresh_precision())
            scalers = stack.enter_context(fp16_on_cpu(patch, init_scale=2.0**16)) if (
                raw["train"]["mixed_precision"] == "fp16" and not GPU) else []
            if fp16_overflows:
                inject_overflows(patch, fp16_overflows)
            t = time.perf_counter()
            result = train(params, self.train_shards, self.val_shards, out / "vae", out / "logs", out / "ck")
            seconds = time.perf_counter() - t
        scale = _last(out / "logs" / "plots" / "metrics" / "train" / "loss_scale.tsv")
        info = json.loads((out / "logs" / "run_info.json").read_text())
        figures = {"steps": result["steps"], "skipped": result["skipped_steps"],
                   "overflows": result["overflow_steps"], "val_psnr": result["val_psnr"],
                   "images_per_s": round(info["images_per_s"], 1)}
        if scale is not None or scalers:
            figures["loss_scale"] = scale
        self.row(name, seconds, **figures)
        return result

    def vq_tokens(self) -> None:
        """Train a VQ in bf16, then compare tokens on the same images:

        - ``agree_lookup``: training's lookup (vq.py, under bf16 autocast) against encode's
          (diffusers' ``quantize``) on the same latents: must be 1.0;
        - ``agree_bf16_lookup``: what a lookup inside bf16 autocast gave (the defect fixed in issue
          36), on the same latents;
        - ``agree_end_to_end``: the trainer's whole forward against the tokens encode stored: below
          1.0 only where bf16 rounds the encoder's output differently (encode runs channels_last
          and other batch sizes, so other kernels) and a latent sits near the border of two codes.
        """
        from ldm_vae.data import load_images
        from ldm_vae.encode.latents import _pixels, encode_shard
        from ldm_vae.export import load_vae
        from ldm_vae.model import TrainedAutoencoder
        from ldm_vae.samples import LATENT, batched
        from ldm_vae.vq import build_quantizer, nearest

        raw = check_params(self.size, model={"regularizer": "vq", "codebook_size": 1024},
                           loss={"vq_beta": 0.25, "codebook_update": "ema", "disc_start": self.size["vq_steps"] // 2},
                           train={"mixed_precision": "bf16", "max_steps": self.size["vq_steps"]},
                           encode={"dtype": "bf16"})
        params = params_from_dict(raw)
        self.train("vq_bf16_train", raw)
        device = "cuda" if GPU else "cpu"
        vq = load_vae(self.work / "vq_bf16_train" / "vae", device)
        model = TrainedAutoencoder(vq, quantizer=build_quantizer(params)).to(device).eval()
        weight = vq.quantize.embedding.weight
        shards = self.train_shards + self.val_shards
        t = time.perf_counter()
        same = old = total = 0
        with torch.no_grad():
            for batch in batched(iter_samples(shards), 32):
                x = _pixels(batch).to(device).contiguous(memory_format=torch.channels_last)  # as encode feeds it
                with torch.autocast(device, dtype=torch.bfloat16):
                    h = vq.encode(x).latents  # [B, D, h, w]
                    training = model.quantizer(h, weight)[1].flatten()  # [B h w]
                    flat = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]).float()
                    in_bf16 = nearest(flat, weight.float())  # the matmul under autocast: bf16
                with torch.autocast(device, enabled=False):
                    encoding = vq.quantize(h.float())[2][2].flatten()  # diffusers' lookup, as encode stores
                same += int((training == encoding).sum())
                old += int((in_bf16 == encoding).sum())
                total += encoding.numel()
        out = self.work / "vq_tokens"
        stored = {}
        for i, shard in enumerate(shards):
            record = encode_shard(vq, shard, out, "all", i, params.encode, 0, "check")
            for name in record["outputs"]:
                stored.update({s["__key__"]: torch.from_numpy(LATENT.get(s, "tokens").astype("int64"))
                               for s in iter_samples([str(out / name)])})
        keys, images = load_images(shards)
        whole = 0
        for i in range(0, len(keys), 32):
            with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):  # the training forward
                tokens = model(images[i : i + 32].to(device))[2].tokens.cpu()  # [B, h, w]
            whole += sum(int((stored[k] == tok).sum()) for k, tok in zip(keys[i : i + 32], tokens))
        self.row("vq_bf16_tokens", time.perf_counter() - t, tokens=total, agree_lookup=round(same / total, 6),
                 agree_bf16_lookup=round(old / total, 4), agree_end_to_end=round(whole / total, 4))

    def encode(self) -> None:
        """fp32 and bf16 encodes of the SD-architecture VAE: speed and the stored latents' PSNR."""
        from ldm_vae.encode.latents import encode_shard
        from ldm_vae.export import load_vae

        vae = load_vae(self.work / "train_bf16_gan" / "vae", "cuda" if GPU else "cpu")
        base = params_from_dict(check_params(self.size)).encode
        self.psnr = {}
        for dtype in ("fp32", "bf16"):
            cfg = dataclasses.replace(base, dtype=dtype)
            shards = self.train_shards * self.size["encode_repeats"]  # enough images for a rate
            _sync()
            t = time.perf_counter()
            n = 0
            for i, shard in enumerate(shards):
                n += encode_shard(vae, shard, self.work / f"enc_{dtype}", "train", i, cfg, 0, "check")["count"]
            _sync()
            seconds = time.perf_counter() - t
            self.psnr[dtype] = _stored_psnr(vae, self.work / f"enc_{dtype}", self.train_shards)
            self.row(f"encode_{dtype}", seconds, images=n, images_per_s=round(n / seconds, 1),
                     psnr=round(self.psnr[dtype], 3))
        self.rows[-1]["psnr_cost_vs_fp32"] = round(self.psnr["fp32"] - self.psnr["bf16"], 4)

    def evaluate(self) -> None:
        from ldm_vae.encode.encoding import run_encode
        from ldm_vae.evaluate.evaluation import run_evaluate
        from ldm_vae.export import load_vae

        params = params_from_dict(check_params(self.size))
        vae = load_vae(self.work / "train_bf16_gan" / "vae", "cuda" if GPU else "cpu")
        t = time.perf_counter()
        self.stats = run_encode(vae, self.work / "prepared", self.work / "latents", params.encode)
        m = run_evaluate(vae, self.work / "latents" / "val", self.work / "prepared" / "val", self.work / "eval",
                         params.evaluate, self.stats)
        self.row("evaluate", time.perf_counter() - t, psnr=round(m["psnr"], 3), psnr_fp32=round(m["psnr_fp32"], 3))

    def ray_encode(self) -> None:
        """A one-node Ray cluster with one GPU (declared on a CPU) encodes what evaluate's encode did."""
        from ldm_vae.encode.encoding import run_encode
        from ldm_vae.export import load_vae
        from ldm_vae.units import UnitFailed

        params = params_from_dict(check_params(self.size))  # evaluate's encode dtype: its bytes are compared
        vae = load_vae(self.work / "train_bf16_gan" / "vae", "cpu")  # the driver needs no GPU
        # A head node started as the cluster guide (docs/scale.md) says (`ray start --head`), with one
        # GPU, on 127.0.0.1 (tests/raycluster.py). Not ray.init() of a local cluster: Ray 2.60 leaves
        # an auth token in ~/.ray that later clusters on the machine then refuse.
        from helpers.raycluster import RayCluster, patch_this_process

        root = Path(tempfile.mkdtemp(prefix="raygc", dir="/tmp"))  # Ray's socket paths must stay short
        cluster = RayCluster(root, cpus=(2,), gpus=(1,)).start()
        patch_this_process()
        engine = EngineConfig(kind="ray", ray_address=cluster.address)
        try:
            figures = {}
            if not GPU:  # the declared GPU is not one torch can use: half precision fails in the task
                try:
                    run_encode(
                        vae,
                        self.work / "prepared",
                        self.work / "ray_half",
                        dataclasses.replace(params.encode, dtype="bf16"),
                        engine,
                        self.work / "train_bf16_gan" / "vae",
                    )
                    figures["half_refused_in_task"] = False
                except UnitFailed as e:
                    figures["half_refused_in_task"] = "needs a GPU" in str(e) and "Ray node" in str(e)
            t = time.perf_counter()
            stats = run_encode(vae, self.work / "prepared", self.work / "ray_latents", params.encode, engine,
                               self.work / "train_bf16_gan" / "vae")
            seconds = time.perf_counter() - t
        finally:
            cluster.stop()
            shutil.rmtree(root, ignore_errors=True)
        local = self.work / "latents"
        figures["same_bytes_as_local"] = stats["splits"] == self.stats["splits"] and all(
                (local / n).read_bytes() == (self.work / "ray_latents" / n).read_bytes()
                for s in ("train", "val") for n in stats["splits"][s]["shards"])  # n: "<split>/<shard>"
        count = sum(v["count"] for v in stats["splits"].values())
        self.row("ray_encode", seconds, dtype=params.encode.dtype, images=count,
                 images_per_s=round(count / seconds, 1), **figures)


def _stored_psnr(vae, latents: Path, prepared: list[str]) -> float:
    """Mean PSNR of the stored float16 means decoded in float32 against the prepared images."""
    from ldm_vae.data import load_images
    from ldm_vae.metrics import psnr, to_unit
    from ldm_vae.samples import LATENT

    keys, images = load_images(prepared)
    means = {s["__key__"]: torch.from_numpy(LATENT.get(s, "mean").astype("float32"))
             for s in iter_samples(shard_paths(latents))}
    device = next(vae.parameters()).device
    scores = []
    with torch.no_grad():
        for i in range(0, len(keys), 32):
            z = torch.stack([means[k] for k in keys[i : i + 32]]).to(device)  # [B, C, h, w]
            rec = vae.decode(z).sample.float().cpu()
            scores.append(psnr(to_unit(rec.clamp(-1, 1)), to_unit(images[i : i + 32])))
    return float(torch.cat(scores).mean())


def _last(tsv: Path) -> float | None:
    if not tsv.exists():
        return None
    return float(tsv.read_text().splitlines()[-1].split("\t")[1])


def _sync() -> None:
    if GPU:
        torch.cuda.synchronize()


@contextlib.contextmanager
def _monkeypatch():
    import pytest

    with pytest.MonkeyPatch.context() as patch:
        yield patch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (always on a CPU)")
    ap.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed)")
    args = ap.parse_args(argv)
    tiny = args.tiny or not GPU
    device = torch.cuda.get_device_name() if GPU else "cpu (imitations: tests/gpu_imitation.py)"
    print(f"gpu_check on {device}, {'tiny' if tiny else 'full'} sizes", flush=True)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check")))
        check = Check(tiny, work)
        check.data()
        half = check.size["steps"] // 2
        check.train("train_bf16_gan", check_params(check.size, train={"mixed_precision": "bf16"}))
        check.train("train_fp16_overflow", check_params(check.size, train={"mixed_precision": "fp16"}),
                    fp16_overflows={3, half + 2})
        check.vq_tokens()
        check.encode()
        check.evaluate()
        check.ray_encode()
    result = {"device": device, "tiny": tiny, "torch": torch.__version__, "seconds": round(time.perf_counter() - t0, 1),
              "rows": check.rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(_table(check.rows))
    print(f"gpu_check: {result['seconds']} s; {args.out}")
    return 0


def _table(rows: list[dict]) -> str:
    lines = ["| step | seconds | figures |", "|---|---|---|"]
    for r in rows:
        figures = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("step", "seconds"))
        lines.append(f"| {r['step']} | {r['seconds']} | {figures} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
