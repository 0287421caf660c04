"""The peers' side of bench/peers.py: each job runs in a peer's own venv (litdata, mosaicml-streaming),
or in the project's for the plain pool and the fast-DiT-style encode, and prints one JSON line.

    <venv>/bin/python bench/peer_jobs.py <job> [args]

It imports nothing from ldm_vae (the peers' venvs do not have it): what a user of that tool would
write, with the tool's own reader and writer and its best settings for the job.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path

RES = 256
# Items per LitData chunk / MDS shard: 24 of each for 24,000 latents, so that both loader workers
# always have chunks to read (one 64 MB chunk held the whole demo set: one worker did everything).
CHUNK_ITEMS = 1000


def center_crop_arr(img, size: int = RES):
    """ADM's center_crop_arr (guided-diffusion, as DiT and fast-DiT use it): BOX halvings, BICUBIC, centre."""
    from PIL import Image

    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def crop_png(path: str) -> bytes:
    from PIL import Image

    with Image.open(path) as img:
        out = io.BytesIO()
        center_crop_arr(img.convert("RGB")).save(out, format="PNG", compress_level=1)
        return out.getvalue()


def images(folder: str) -> list[str]:
    return sorted(str(p) for p in Path(folder).rglob("*.jpg"))


# -- folder -> 256 px PNG shards ---------------------------------------------------------------

def _litdata_item(path: str) -> dict:
    return {"key": Path(path).stem, "png": crop_png(path)}


def litdata_optimize(folder: str, out: str, workers: str) -> dict:
    from litdata import optimize

    t = time.time()
    optimize(fn=_litdata_item, inputs=images(folder), output_dir=out, num_workers=int(workers), chunk_bytes="64MB",
             mode="overwrite")
    return {"seconds": time.time() - t}


def _pool_shard(job: tuple[int, list[str], str]) -> int:
    n, paths, out = job
    with tarfile.open(Path(out) / f"shard-{n:05d}.tar", "w") as tar:
        for p in paths:
            data = crop_png(p)
            info = tarfile.TarInfo(f"{Path(p).stem}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return len(paths)


def pool(folder: str, out: str, workers: str) -> dict:
    """A plain multiprocessing pool: decode, crop, PNG, one tar per 1,000 images."""
    from multiprocessing import Pool

    t = time.time()
    files = images(folder)
    Path(out).mkdir(parents=True, exist_ok=True)
    jobs = [(i // 1000, files[i: i + 1000], out) for i in range(0, len(files), 1000)]
    with Pool(int(workers)) as p:
        done = sum(p.imap_unordered(_pool_shard, jobs))
    assert done == len(files)
    return {"seconds": time.time() - t}


# -- latents: converted once, then read back ---------------------------------------------------

def _latent_samples(shards: str, full: bool = False):
    """(key, fields) of every sample of the project's latent shards, read with tarfile: ``mean``
    (float16 [C, h, w]), and with ``full`` everything a trainer uses: ``std``, ``time_ids`` (int64
    [6], SDXL's size conditioning from the json) and ``caption``."""
    import numpy as np

    for shard in sorted(Path(shards).glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar}
            for name in members:
                if not name.endswith(".mean.npy"):
                    continue
                key = name[: -len(".mean.npy")]

                def member(ext):
                    return tar.extractfile(members[f"{key}.{ext}"]).read()

                fields = {"mean": np.load(io.BytesIO(member("mean.npy")))}
                if full:
                    meta = json.loads(member("json"))
                    fields.update(std=np.load(io.BytesIO(member("std.npy"))), caption=member("txt").decode(),
                                  time_ids=np.array(meta["original_size"] + meta["crop_top_left"] + meta["target_size"],
                                                    np.int64))
                yield key, fields


def litdata_convert(shards: str, out: str, full: str = "") -> dict:
    from litdata.streaming.writer import BinaryWriter

    writer = BinaryWriter(out, chunk_size=CHUNK_ITEMS)
    n = 0
    for n, (key, fields) in enumerate(_latent_samples(shards, bool(full))):
        writer.add_item(n, {"key": key, **fields})
    writer.done()
    writer.merge()
    return {"items": n + 1}


def _streaming():
    """mosaicml-streaming's base package. Its top-level __init__ imports its vision datasets, which
    import torchvision; PyPI's torchvision does not load beside the CPU torch and none of it is used
    here, so the package's __init__ is skipped."""
    import importlib.util
    import types

    spec = importlib.util.find_spec("streaming")
    pkg = types.ModuleType("streaming")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["streaming"] = pkg
    import streaming.base as base

    return base


def mds_convert(shards: str, out: str, full: str = "") -> dict:
    base = _streaming()
    samples = _latent_samples(shards, bool(full))
    key, fields = next(samples)
    columns = {"key": "str", "mean": "ndarray"}
    if full:
        columns.update(std="ndarray", time_ids="ndarray", caption="str")
    n = 1
    # MDS cuts shards by bytes: about CHUNK_ITEMS samples each, as for LitData
    item_bytes = sum(v.nbytes for v in fields.values() if hasattr(v, "nbytes")) + 64
    with base.MDSWriter(out=out, columns=columns, size_limit=CHUNK_ITEMS * item_bytes) as w:
        w.write({"key": key, **fields})
        for n, (key, fields) in enumerate(samples, 2):
            w.write({"key": key, **fields})
    return {"items": n}


class _Latent:
    """An item -> (latent float32 tensor, key), the work a trainer needs of each tool's item."""

    def __call__(self, item):
        import torch

        return {"latent": torch.from_numpy(item["mean"]).float(), "key": item["key"]}


class _Trainer:
    """An item with every field -> what a latent-diffusion trainer needs of it, as a user of the
    tool would write it: a sample of the posterior (mean + std * noise), normalised per channel
    (the stats.json of the set), the caption and the size conditioning."""

    def __init__(self, stats: str):
        st = json.loads(Path(stats).read_text())
        self.shift, self.scale = st["channel_mean"], [1.0 / s for s in st["channel_std"]]

    def __call__(self, item):
        import torch

        if not isinstance(self.shift, torch.Tensor):  # tensors made in the worker that uses them
            self.shift = torch.tensor(self.shift)[:, None, None]  # [C, 1, 1]
            self.scale = torch.tensor(self.scale)[:, None, None]
        mean = torch.from_numpy(item["mean"]).float()  # [C, h, w]
        z = mean + torch.from_numpy(item["std"]).float() * torch.randn_like(mean)
        return {"latent": (z - self.shift) * self.scale, "key": item["key"], "caption": item["caption"],
                "time_ids": torch.from_numpy(item["time_ids"])}


def _read(dataset, batch: int, workers: int, epochs: int, expected: int) -> dict:
    import torch

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers,
                                         persistent_workers=workers > 0)
    rates = []
    for _ in range(epochs):
        t, n = time.perf_counter(), 0
        for b in loader:
            n += len(b["key"])
        assert n == expected, (n, expected)
        rates.append(n / (time.perf_counter() - t))
    return {"rates": rates}


def _transform(stats: str):
    """The per-item work: the mean alone (like for like), or a trainer's (``stats``: the set's stats.json)."""
    return _Trainer(stats) if stats else _Latent()


def litdata_read(folder: str, batch: str, workers: str, epochs: str, expected: str, stats: str = "") -> dict:
    from litdata import StreamingDataset

    ds = StreamingDataset(folder, shuffle=True, transform=_transform(stats))
    return _read(ds, int(batch), int(workers), int(epochs), int(expected))


def mds_read(folder: str, batch: str, workers: str, epochs: str, expected: str, stats: str = "") -> dict:
    base = _streaming()
    transform = _transform(stats)

    class Latents(base.StreamingDataset):  # the loader's workers fork: a local class is fine
        def get_item(self, sample_id: int, retry: int = 7):
            return transform(super().get_item(sample_id, retry))

    ds = Latents(local=folder, shuffle=True, batch_size=int(batch))
    return _read(ds, int(batch), int(workers), int(epochs), int(expected))


def wds_read(folder: str, batch: str, workers: str, epochs: str, expected: str) -> dict:
    """Plain webdataset (the same tars the project writes): its reader, decoder and batching."""
    import webdataset as wds

    urls = sorted(str(p) for p in Path(folder).glob("*.tar"))
    ds = (wds.WebDataset(urls, shardshuffle=False, workersplitter=wds.split_by_worker, empty_check=False)
          .shuffle(1000).decode().map(lambda s: _Latent()({"mean": s["mean.npy"], "key": s["__key__"]})))
    return _read(ds, int(batch), int(workers), int(epochs), int(expected))


def project_read(shards: str, batch: str, workers: str, epochs: str, expected: str, mode: str = "trainer") -> dict:
    """``latent_loader`` (project venv only): as a trainer uses it (posterior sample, channel
    normalisation, stats.json) or ``mean``: like for like with the peers (the mean, as stored)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ldm_vae.loader import latent_loader

    kw = ({"stats": f"{shards}/stats.json"} if mode == "trainer"
          else {"normalize": "none", "sample_posterior": False, "flip": False})
    loader = latent_loader(f"{shards}/*.tar", batch_size=int(batch), num_workers=int(workers), **kw)
    rates = []
    for epoch in range(int(epochs)):
        loader.set_epoch(epoch)
        t, n = time.perf_counter(), 0
        for b in loader:
            n += len(b["key"])
        assert n == int(expected), (n, expected)
        rates.append(n / (time.perf_counter() - t))
    return {"rates": rates}


# -- encode the fast-DiT / LightningDiT way -----------------------------------------------------

def fastdit_encode(folder: str, vae_dir: str, out: str, batch: str, workers: str) -> dict:
    """fast-DiT's extract_features.py without torchvision: an image-folder dataset with ADM's
    crop, a DataLoader with workers, ``vae.encode(x).latent_dist.sample()`` per batch, one .npy
    per sample."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    class Folder(torch.utils.data.Dataset):
        def __init__(self, files):
            self.files = files

        def __len__(self):
            return len(self.files)

        def __getitem__(self, i):
            from PIL import Image

            with Image.open(self.files[i]) as img:
                arr = np.asarray(center_crop_arr(img.convert("RGB")), dtype=np.float32)
            return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0  # [3, H, W] in [-1, 1]

    t = time.time()
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    loader = torch.utils.data.DataLoader(Folder(images(folder)), batch_size=int(batch), num_workers=int(workers))
    Path(out).mkdir(parents=True, exist_ok=True)
    n = 0
    with torch.inference_mode():
        for x in loader:
            z = vae.encode(x).latent_dist.sample().numpy()  # [B, C, h, w]
            for zi in z:
                np.save(os.path.join(out, f"{n}.npy"), zi)
                n += 1
    return {"seconds": time.time() - t, "images": n}


if __name__ == "__main__":
    job, *args = sys.argv[1:]
    print(json.dumps(globals()[job.replace("-", "_")](*args)), flush=True)
