"""The encode stage: every prepared sample encoded exactly once, by one or many processes.

Several processes are one launcher group (the stage starts ``accelerate launch`` itself for the
GPUs of one machine); several machines are a Ray cluster (``engine.kind: ray``: a task per input
shard, a GPU each where there are GPUs, on a shared output folder). Work is planned per input
shard by the stage runner (:mod:`ldm_vae.runner`): rank
r of W takes units r, r+W, ... of what is left and writes ``<split>-r<rank>-s<input>-<n>.tar`` (its
own names: no two processes ever write one file). Each finished input shard leaves a done-record
(``.done/<split>-s<input>.json``: output shards, count, exact moments, and the ident that must
still match: the VAE's fingerprint, the input's size and mtime, flip, the code), written after its
outputs are renamed into place. The outputs persist between runs, so a killed encode run again
keeps every recorded input and redoes only the rest; anything unrecorded (a half-written shard,
a shard of another VAE or of other prepared data) is deleted first. At the end a coverage check
compares the keys of the latent shards with the prepared shards and fails on any gap or
duplicate, and stats.json is merged exactly from the records.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from ..config import EncodeConfig
from ..files import atomic_write
from ..model import LatentMoments, is_vq
from ..runner import (
    Placement,
    StageWork,
    Unit,
    check_launcher,
    code_hash,
    cpu_share,
    group,
    iter_records,
    run_units,
    stage_code,
    tick,
)
from ..samples import read_classes, write_classes
from ..shards import shard_keys, shard_paths
from ..vq import histogram_stats
from .latents import SPLITS, encode_shard, vae_fingerprint


class CoverageError(RuntimeError):
    pass


def run_encode(vae: AutoencoderKL, prepared: Path, out: Path, cfg: EncodeConfig, engine=None,
               vae_dir: Path | None = None) -> dict | None:
    """Encode what is not yet encoded, check coverage, write and return stats.json.

    Alone, the process does everything. Under a launcher (``accelerate launch`` on one machine's
    GPUs: WORLD_SIZE > 1) it is one rank of a group (:mod:`ldm_vae.runner`): rank 0 plans, each
    rank encodes its share, and after a barrier rank 0 alone checks coverage and writes
    stats.json; the other ranks return None. With ``engine.kind: ray`` each input shard is a Ray
    task (a GPU each where the cluster has them) that loads the VAE from ``vae_dir``; ``vae``
    here serves the fingerprint and the statistics; the dtype is checked where the VAE runs (in
    each task on Ray: the driver needs no GPU).
    """
    on_ray = engine is not None and engine.kind == "ray"
    if not on_ray:
        check_dtype(cfg, next(vae.parameters()).device.type)
    if vae.config.get("force_upcast") and cfg.dtype != "fp32":
        print(f"encode: the VAE's config says force_upcast: encoding in fp32, not {cfg.dtype}", flush=True)
    fingerprint = vae_fingerprint(vae)
    prepared, out = Path(prepared), Path(out)
    check_launcher("encode", engine, launcher_group=True)  # before a launcher's process group forms
    rank, _ = group()

    def plan() -> list[Unit]:
        code = code_hash(*stage_code("encode/encoding"))
        for split in SPLITS:  # the per-split records of earlier versions of this stage
            if (out / split / ".done").is_dir():
                shutil.rmtree(out / split / ".done")
        units = []
        for split in SPLITS:
            for i, path in enumerate(shard_paths(prepared / split)):
                st = os.stat(path)
                ident = {"input": Path(path).name, "input_id": [st.st_size, st.st_mtime_ns], "vae": fingerprint,
                         "flip": cfg.flip, "code": code}
                units.append(Unit(f"{split}-s{i:05d}", ident, EncodeInput(split, i, path), about=path))
        return units

    # Locally in this process: the VAE lives here (threads or the GPU give the parallelism).
    if on_ray and vae_dir is None:
        raise ValueError("encode on Ray: the tasks load the VAE from its folder; pass vae_dir")
    work = EncodeWork(vae_dir, out, cfg, fingerprint, rank, None if on_ray else vae)
    stage = StageWork("encode", out, plan, work, clean=list(SPLITS), agree=fingerprint)
    units = run_units(stage, Placement(engine, shared=[prepared] + ([vae_dir] if on_ray else []), gpu=True,
                                       launcher_group=True))
    if units is None:
        return None
    return _finish(vae, prepared, out, units, fingerprint)


@dataclass(frozen=True)
class EncodeInput:
    """An encode unit: prepared shard ``path``, the ``index``-th of its split."""
    split: str
    index: int
    path: str


def check_dtype(cfg: EncodeConfig, device_type: str, where: str = "") -> None:
    """Half precision only where the VAE runs on a GPU; ``where`` names a Ray task's node."""
    if cfg.dtype != "fp32" and device_type != "cuda":
        on = f" ({where} has no GPU that torch can use)" if where else ""
        raise ValueError(f"encode.dtype: {cfg.dtype!r}: needs a GPU (half-precision autocast){on}; use fp32 on a CPU")


class EncodeWork:
    """One input shard's work. Locally it holds the stage's VAE; pickled for a Ray task it drops
    it, and the task's process loads the VAE from ``vae_dir`` once (on its GPU, else its CPU) and
    checks that it is the driver's (same fingerprint)."""

    def __init__(self, vae_dir, out: Path, cfg: EncodeConfig, fingerprint: str, rank: int, vae=None):
        self.vae_dir, self.out, self.cfg, self.fingerprint, self.rank, self.vae = (
            vae_dir,
            out,
            cfg,
            fingerprint,
            rank,
            vae,
        )

    def __getstate__(self) -> dict:
        return {**self.__dict__, "vae": None}

    def __call__(self, unit: Unit) -> dict:
        if self.vae is not None:
            vae = self.vae
        else:  # a Ray task: the dtype is checked here, on the node the task landed on
            vae = _task_vae(self.vae_dir, self.fingerprint)
            check_dtype(self.cfg, next(vae.parameters()).device.type, where=f"Ray node {_node_name()}")
        # channels_last: the convolutions' fast path on CPU (oneDNN) and on GPU tensor cores; measured
        # 1.6x faster per image on the 2-core CPU. It changes the memory layout only, not the numbers.
        vae.to(memory_format=torch.channels_last)
        task: EncodeInput = unit.task
        split, i, path = task.split, task.index, task.path
        record = encode_shard(vae, path, self.out / split, split, i, self.cfg, self.rank, self.fingerprint, tick)
        record["outputs"] = [f"{split}/{n}" for n in record["outputs"]]
        record["split"] = split
        return record


_TASK_VAES: dict = {}  # (folder, fingerprint) -> the VAE, once per Ray worker process


def _node_name() -> str:
    import ray

    return f"{ray.util.get_node_ip_address()} ({ray.get_runtime_context().get_node_id()[:8]})"


def _task_vae(vae_dir, fingerprint: str) -> AutoencoderKL:
    key = (str(Path(vae_dir).resolve()), fingerprint)
    if key not in _TASK_VAES:
        from ..export import load_vae

        torch.set_num_threads(cpu_share())  # the task's CPUs (a Ray task: its num_cpus)
        vae = load_vae(vae_dir, "cuda" if torch.cuda.is_available() else "cpu")
        if vae_fingerprint(vae) != fingerprint:
            raise ValueError(f"the VAE in {vae_dir} on this node is not the driver's (fingerprint "
                             f"{vae_fingerprint(vae)} vs {fingerprint}): is {vae_dir} on a shared filesystem?")
        _TASK_VAES.clear()  # one VAE per process: a new run's replaces the last
        _TASK_VAES[key] = vae
    return _TASK_VAES[key]


def _finish(vae: AutoencoderKL, prepared: Path, out: Path, units: list[Unit], fingerprint: str) -> dict:
    vq = is_vq(vae)
    channels = vae.config.vq_embed_dim if vq else vae.config.latent_channels
    stats = {"channels": channels, "regularizer": "vq" if vq else "kl", "splits": {}, "vae_fingerprint": fingerprint}
    records = list(iter_records(out, units))
    every_shape: set = set()
    for split in SPLITS:
        mine = [r for r in records if r["split"] == split]
        outputs = [str(out / n) for r in mine for n in r["outputs"]]
        counts = check_coverage(shard_paths(prepared / split), outputs, split)
        shards = sorted(r_ for r in mine for r_ in r["outputs"])
        shapes = {n: r["shape"] for r in mine for n in r["outputs"]}
        # shard_counts and shard_shapes: what the loader needs to give every DDP rank the same
        # number of samples and (with buckets) of batches; buckets: samples per image "WxH".
        stats["splits"][split] = {"count": sum(r["count"] for r in mine), "shards": shards,
                                  "shard_counts": {n: counts[str(out / n)] for n in shards},
                                  "shard_shapes": {n: shapes[n] for n in shards},
                                  "buckets": _bucket_counts({n: counts[str(out / n)] for n in shards}, shapes)}
        stats["splits"][split]["labels"] = _label_counts(mine)
        per_shape = Counter()
        for n in shards:
            per_shape[tuple(shapes[n])] += counts[str(out / n)]
        every_shape |= set(per_shape)
        if mine and (split == "train" or "latent_shapes" not in stats):  # the train split's
            # A trainer reads latent_shapes: each shape [C, h, w] with its latents, most first (one
            # for square crops; one per bucket). latent_shape: the shape, only where there is one.
            stats["latent_shapes"] = [{"shape": list(sh), "count": c} for sh, c in
                                      sorted(per_shape.items(), key=lambda kv: (-kv[1], kv[0]))]
        if split == "train":
            moments = LatentMoments(channels)
            for r in mine:
                moments.merge(LatentMoments.from_state(r["moments"]))
            summary = moments.summary()
            stats.update({k: summary[k] for k in ("channel_mean", "channel_std", "mean", "std",
                                                   "shift_factor", "scaling_factor")})
            if vq:  # the train split's code histogram (a token model's unigram prior) and its use
                k = vae.config.num_vq_embeddings
                counts = [sum(c) for c in zip(*(r["histogram"] for r in mine))] if mine else [0] * k
                stats.update({**histogram_stats(counts, k), "code_histogram": counts})
    # How full the encode batches were: each input shard (one bucket) ends in a partial batch.
    slots = sum(r["batches"] * r["batch_size"] for r in records if "batches" in r)
    stats["latent_shape"] = list(next(iter(every_shape))) if len(every_shape) == 1 else None
    classes = read_classes(prepared)  # the names the labels index ([]: none)
    write_classes(out, classes)
    stats["num_classes"] = len(classes)
    stats["batch_fill"] = round(sum(r["count"] for r in records if "batches" in r) / slots, 4) if slots else None
    stats["vae_scaling_factor"] = vae.config.scaling_factor
    stats["vae_shift_factor"] = vae.config.get("shift_factor")
    atomic_write(out / "stats.json", json.dumps(stats, indent=2) + "\n")
    return stats


def _label_counts(records: list[dict]) -> dict[str, int]:
    """Latents per label ("label": count, by label; {} without labels): per class with data.labels."""
    per: Counter = Counter()
    for r in records:
        for label, n in r.get("labels", []):
            per[label] += n
    return {str(k): per[k] for k in sorted(per, key=lambda k: (isinstance(k, str), k))}


def _bucket_counts(counts: dict[str, int], shapes: dict[str, list[int]]) -> dict[str, int]:
    """Samples per image shape "WxH" (a latent [C, h, w] is an 8w x 8h image), largest first."""
    per: Counter = Counter()
    for name, n in counts.items():
        _, h, w = shapes[name]
        per[f"{8 * w}x{8 * h}"] += n
    return dict(sorted(per.items(), key=lambda kv: (-kv[1], kv[0])))


def check_coverage(inputs: list[str], outputs: list[str], split: str) -> dict[str, int]:
    """Fail loudly unless the latent keys are exactly the prepared keys, each once; the number of
    samples in each output shard."""
    want = Counter(k for p in inputs for k in shard_keys(p))
    per_output = [(p, shard_keys(p)) for p in outputs]  # a list: a shard listed twice counts twice
    got = Counter(k for _, keys in per_output for k in keys)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    twice = sorted(k for k, n in got.items() if n > 1)
    if missing or extra or twice:
        raise CoverageError(
            f"encode coverage check failed for {split}: {len(missing)} prepared samples without a latent "
            f"{missing[:5]}, {len(twice)} encoded more than once {twice[:5]}, {len(extra)} unknown {extra[:5]}"
        )
    return {p: len(keys) for p, keys in per_output}
