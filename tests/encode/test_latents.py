import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from ldm_vae.config import EncodeConfig
from ldm_vae.data import to_tensor
from ldm_vae.encode.encoding import run_encode
from ldm_vae.export import load_vae
from ldm_vae.images import decode_uint8
from ldm_vae.samples import image_bytes, npy_load
from ldm_vae.shards import iter_samples, shard_paths

from helpers.common import ROOT, make_params, write_params


@pytest.fixture(scope="module")
def encoded(pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents")
    vae = load_vae(pipeline_dir / "vae")
    stats = run_encode(vae, pipeline_dir / "prepared", out, make_params().encode)
    return vae, out, stats


def test_every_prepared_sample_encoded_exactly_once(pipeline_dir, encoded):
    _, out, stats = encoded
    for split in ("train", "val"):
        prepared = [s["__key__"] for s in iter_samples(shard_paths(pipeline_dir / "prepared" / split))]
        latent = [s["__key__"] for s in iter_samples(shard_paths(out / split))]
        assert sorted(latent) == sorted(prepared) and len(set(latent)) == len(latent)
        assert stats["splits"][split]["count"] == len(prepared)
        assert all(n.startswith(f"{split}/{split}-r000-") for n in stats["splits"][split]["shards"])
        counts = stats["splits"][split]["shard_counts"]  # the loader's per-shard sample counts
        assert set(counts) == set(stats["splits"][split]["shards"])
        assert counts == {n: len(list(iter_samples([str(out / n)]))) for n in counts}


def test_latent_sample_contract(pipeline_dir, encoded):
    vae, out, stats = encoded
    sample = next(iter(iter_samples(shard_paths(out / "val"))))
    mean, std = npy_load(sample["mean.npy"]), npy_load(sample["std.npy"])
    assert mean.dtype == np.float16 and std.dtype == np.float16
    assert mean.shape == std.shape == (4, 4, 4) and (std > 0).all()
    meta = json.loads(sample["json"])
    assert meta["key"] == sample["__key__"] and meta["resolution"] == 32 and "crop_box" in meta
    # The stored mean is the raw posterior mean of the prepared image with the same key.
    ref = next(s for s in iter_samples(shard_paths(pipeline_dir / "prepared" / "val"))
               if s["__key__"] == sample["__key__"])
    with torch.inference_mode():
        fresh = vae.encode(to_tensor(decode_uint8(image_bytes(ref)))[None]).latent_dist.mean[0]
    assert np.allclose(mean.astype(np.float32), fresh.numpy(), atol=2e-3, rtol=2e-3)


def test_stats_are_exact_over_train_split(encoded):
    _, out, stats = encoded
    means, stds = [], []
    for s in iter_samples(shard_paths(out / "train")):
        means.append(npy_load(s["mean.npy"]).astype(np.float64))
        stds.append(npy_load(s["std.npy"]).astype(np.float64))
    m, sd = np.stack(means), np.stack(stds)  # [N, C, h, w]
    channel_var = (sd**2).mean(axis=(0, 2, 3)) + m.var(axis=(0, 2, 3))
    assert np.allclose(stats["channel_mean"], m.mean(axis=(0, 2, 3)), atol=1e-9)
    assert np.allclose(stats["channel_std"], np.sqrt(channel_var), atol=1e-9)
    global_var = (sd**2).mean() + m.var()
    assert abs(stats["std"] - np.sqrt(global_var)) < 1e-9
    assert abs(stats["scaling_factor"] - 1 / np.sqrt(global_var)) < 1e-6
    assert stats["channels"] == 4 and stats["latent_shape"] == [4, 4, 4]


def latents_by_key(folder):
    return {s["__key__"]: s for s in iter_samples(shard_paths(folder))}


def encode_command(pipeline_dir, params, out) -> list[str]:
    return ["stages/encode.py", "--params", str(params), "--vae", str(pipeline_dir / "vae"),
            "--prepared", str(pipeline_dir / "prepared"), "--out", str(out)]


def assert_same_latents(one, other, stats1, stats2):
    """The same keys, latents to float16 tolerance and statistics as the one-process encode."""
    for split in ("train", "val"):
        a, b = latents_by_key(one / split), latents_by_key(other / split)
        assert set(a) == set(b) and stats2["splits"][split]["count"] == len(a)
        for k in a:
            assert np.allclose(npy_load(a[k]["mean.npy"]).astype(np.float32),
                               npy_load(b[k]["mean.npy"]).astype(np.float32), atol=2e-3, rtol=2e-3)
    # Both ranks wrote their own shards (names carry the rank), merged into exact stats.
    names = stats2["splits"]["train"]["shards"]
    assert any("-r000-" in n for n in names) and any("-r001-" in n for n in names)
    assert np.allclose(stats2["channel_std"], stats1["channel_std"], rtol=1e-3)


def test_two_process_encode_matches_one_process(pipeline_dir, encoded, tmp_path):
    """`encode.num_processes: 2`: the stage command starts 2 ranks under accelerate itself."""
    _, one, stats1 = encoded
    params = write_params(tmp_path / "params.yaml", encode={"num_processes": 2})
    proc = subprocess.run([sys.executable, *encode_command(pipeline_dir, params, tmp_path / "latents")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "launching 2 processes" in proc.stdout and proc.stdout.count("encode: train") == 1  # rank 0 reports
    stats2 = json.loads((tmp_path / "latents" / "stats.json").read_text())
    assert_same_latents(one, tmp_path / "latents", stats1, stats2)


def test_encode_on_the_ray_engine_gives_the_one_process_bytes(pipeline_dir, encoded, ray_engine, tmp_path):
    """Each input shard a Ray task on a two-node cluster (no GPUs: a CPU each), the VAE loaded by
    the tasks from its folder: the same shard names, bytes and stats.json as one local process."""
    vae, one, stats1 = encoded
    stats2 = run_encode(vae, pipeline_dir / "prepared", tmp_path / "latents", make_params().encode, ray_engine,
                        pipeline_dir / "vae")
    assert stats2 == stats1
    for split in ("train", "val"):
        a = {p.name: p.read_bytes() for p in (one / split).iterdir()}
        b = {p.name: p.read_bytes() for p in (tmp_path / "latents" / split).iterdir()}
        assert sorted(a) == sorted(b) and all(a[n] == b[n] for n in a), split
    assert (tmp_path / "latents" / "stats.json").read_bytes() == (one / "stats.json").read_bytes()


def test_half_precision_on_ray_is_decided_in_each_task_on_nodes_that_declare_gpus(pipeline_dir, encoded, tmp_path):
    """A Ray node that declares a GPU torch cannot use (tests/gpu_imitation.py): the driver, which
    has no GPU, no longer refuses bf16; the task that lands there fails once, naming the node and
    the fix; fp32 falls back to the node's CPU and gives the one-process bytes."""
    import dataclasses
    import shutil
    import tempfile
    from pathlib import Path

    from ldm_vae.config import EngineConfig
    from ldm_vae.units import UnitFailed

    from helpers.raycluster import RayCluster, patch_this_process

    vae, one, stats1 = encoded
    root = Path(tempfile.mkdtemp(prefix="raygpu", dir="/tmp"))  # Ray's socket paths must stay short
    cluster = RayCluster(root, cpus=(2,), gpus=(1,)).start()
    try:
        patch_this_process()
        engine = EngineConfig(kind="ray", ray_address=cluster.address)
        half = dataclasses.replace(make_params().encode, dtype="bf16")
        with pytest.raises(
            UnitFailed,
            match=r"on node 127\.0\.0\.1 .*'bf16': needs a GPU .*Ray node 127\.0\.0\.1 .*has no "
            r"GPU that torch can use\); use fp32",
        ):
            run_encode(vae, pipeline_dir / "prepared", tmp_path / "half", half, engine, pipeline_dir / "vae")
        stats2 = run_encode(vae, pipeline_dir / "prepared", tmp_path / "latents", make_params().encode, engine,
                            pipeline_dir / "vae")
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert stats2 == stats1
    for split in ("train", "val"):
        a = {p.name: p.read_bytes() for p in (one / split).iterdir()}
        assert a == {p.name: p.read_bytes() for p in (tmp_path / "latents" / split).iterdir()}, split


def test_a_launcher_group_over_several_machines_is_refused(pipeline_dir, encoded, monkeypatch, tmp_path):
    """Several machines are the Ray engine's; a launcher runs one machine's GPUs."""
    vae, _, _ = encoded
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="several machines.*engine.kind: ray"):
        run_encode(vae, pipeline_dir / "prepared", tmp_path / "latents", make_params().encode)


KILLED = """
import sys, os, time
sys.path.insert(0, {root!r})
import ldm_vae.encode.latents as L
from ldm_vae.config import EncodeConfig
from ldm_vae.encode.encoding import run_encode
from ldm_vae.export import load_vae
real = L.encode_shard
def slow(*a, **k):
    r = real(*a, **k)
    time.sleep(3)  # the parent kills us during a pause after at least one finished input
    return r
import ldm_vae.encode.encoding as E
E.encode_shard = slow
run_encode(load_vae({vae!r}), __import__('pathlib').Path({prepared!r}), __import__('pathlib').Path({out!r}),
           EncodeConfig(batch_size=2, samples_per_shard=2))
"""


def test_killed_encode_resumes_with_every_key_once(pipeline_dir, encoded, tmp_path):
    import time

    vae, one, _ = encoded
    out = tmp_path / "latents"
    code = KILLED.format(root=str(ROOT), vae=str(pipeline_dir / "vae"), prepared=str(pipeline_dir / "prepared"),
                         out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / ".done").glob("train-*.json")):
        time.sleep(0.1)
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in (out / ".done").glob("train-*.json")}
    assert done_before, "the killed run finished no input shard"
    (out / "train" / "train-r000-s99999-00000.tar").write_bytes(b"half a shard")  # junk a kill could leave

    stats = run_encode(vae, pipeline_dir / "prepared", out, EncodeConfig(batch_size=2, samples_per_shard=2))
    for split in ("train", "val"):
        assert sorted(latents_by_key(out / split)) == sorted(latents_by_key(one / split))
        assert stats["splits"][split]["count"] == len(latents_by_key(one / split))
    kept = {p.name: p.stat().st_mtime_ns for p in (out / ".done").glob("train-*.json")}
    assert all(kept[n] == t for n, t in done_before.items())  # finished inputs were not redone
    assert not (out / "train" / "train-r000-s99999-00000.tar").exists()


def test_new_vae_invalidates_old_shards_and_flip_is_stored(pipeline_dir, encoded, tmp_path):
    vae, _, _ = encoded
    cfg = EncodeConfig(flip=True)
    run_encode(vae, pipeline_dir / "prepared", tmp_path, cfg)
    sample = next(iter(latents_by_key(tmp_path / "val").values()))
    mean, mean_flip = npy_load(sample["mean.npy"]), npy_load(sample["mean_flip.npy"])
    assert mean_flip.shape == mean.shape and mean_flip.dtype == np.float16 and "std_flip.npy" in sample
    ref = latents_by_key(pipeline_dir / "prepared" / "val")[sample["__key__"]]
    with torch.inference_mode():
        fresh = vae.encode(to_tensor(decode_uint8(image_bytes(ref))).flip(-1)[None]).latent_dist.mean[0]
    assert np.allclose(mean_flip.astype(np.float32), fresh.numpy(), atol=2e-3, rtol=2e-3)

    other = load_vae(pipeline_dir / "vae")
    with torch.no_grad():
        other.decoder.conv_out.bias.add_(0.1)  # a different VAE (even if only its decoder differs)
    before = set(p.name for p in (tmp_path / "val").glob("*.tar"))
    run_encode(other, pipeline_dir / "prepared", tmp_path, cfg)
    records = [json.loads(p.read_text()) for p in (tmp_path / ".done").glob("val-*.json")]
    from ldm_vae.encode.latents import vae_fingerprint

    assert records and all(r["ident"]["vae"] == vae_fingerprint(other) for r in records)
    assert set(p.name for p in (tmp_path / "val").glob("*.tar")) == before  # same names, rewritten


def test_coverage_check_names_gaps_and_duplicates(pipeline_dir, encoded):
    from ldm_vae.encode.encoding import CoverageError, check_coverage

    _, one, _ = encoded
    inputs = shard_paths(pipeline_dir / "prepared" / "train")
    outputs = shard_paths(one / "train")
    check_coverage(inputs, outputs, "train")
    with pytest.raises(CoverageError, match="prepared samples without a latent"):
        check_coverage(inputs, outputs[1:], "train")
    with pytest.raises(CoverageError, match="1 encoded more than once|encoded more than once"):
        check_coverage(inputs, outputs + outputs[:1], "train")


def test_shard_keys_reads_ustar_pax_and_long_names(tmp_path):
    import io
    import tarfile

    from ldm_vae.shards import shard_keys

    long_key = "k" * 150  # longer than ustar's 100-byte name field
    for fmt in (tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        keys = ["a", "b"] if fmt == tarfile.USTAR_FORMAT else ["a", long_key, "b"]
        path = tmp_path / f"{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for k in keys:
                for ext in ("npy", "json"):
                    info = tarfile.TarInfo(f"{k}.{ext}")
                    info.size = 700  # data longer than one block: the reader must skip it right
                    tar.addfile(info, io.BytesIO(b"x" * 700))
        assert shard_keys(str(path)) == keys


@pytest.mark.parametrize("arr", [np.random.default_rng(0).random((4, 8, 8)).astype(np.float16),
                                 np.asfortranarray(np.random.default_rng(1).random((3, 5))),
                                 np.arange(7), np.zeros((0, 3), np.float16)])
def test_npy_load_round_trips_with_its_header_cache(arr):
    from ldm_vae.samples import npy_bytes

    for _ in range(2):  # the second read takes the cached-header path
        back = npy_load(npy_bytes(arr))
        assert back.dtype == arr.dtype and back.shape == arr.shape and np.array_equal(back, arr)


def test_ordered_map_keeps_order_runs_in_parallel_raises_errors_and_stops_when_left():
    import threading
    import time

    from ldm_vae.encode.latents import ordered_map

    def slow_square(i):
        time.sleep(0.02 if i % 3 else 0.05)  # later items often finish first
        return i * i

    t = time.perf_counter()
    assert list(ordered_map(slow_square, range(40), workers=4)) == [i * i for i in range(40)]
    assert time.perf_counter() - t < 40 * 0.03 / 2  # really in parallel (serial: ~1.3 s)

    def broken(i):
        if i == 5:
            raise OSError("truncated image")
        return i

    it = ordered_map(broken, range(20), workers=2)
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]  # everything before the failure arrives
    with pytest.raises(OSError, match="truncated image"):
        next(it)

    started = []
    before = threading.active_count()
    it = ordered_map(lambda i: started.append(i) or time.sleep(0.01), range(10_000), workers=2, depth=4)
    next(it)
    it.close()  # the consumer leaves early: nothing more starts, no thread lingers
    n = len(started)
    time.sleep(0.3)
    assert len(started) == n <= 6 and threading.active_count() <= before


def test_cpu_encode_uses_every_core_and_restores_the_thread_count(pipeline_dir, encoded, tmp_path):
    """On a CPU the stage runs one single-threaded encoder per core; afterwards torch's intra-op
    thread count is what it was (the rest of the process is unaffected)."""
    import threading

    import ldm_vae.encode.latents as L

    vae, one, _ = encoded
    seen = set()
    real = L._pixels

    def spy(batch):
        seen.add((threading.current_thread().name, torch.get_num_threads()))
        return real(batch)

    threads = torch.get_num_threads()
    L._pixels = spy
    try:
        run_encode(vae, pipeline_dir / "prepared", tmp_path, make_params(encode={"batch_size": 1}).encode)
    finally:
        L._pixels = real
    workers = {name for name, _ in seen}
    assert min(L.cpu_share(), 2) <= len(workers) <= L.cpu_share() and all(n.startswith("encode") for n in workers)
    assert {n for _, n in seen} == ({1} if L.cpu_share() > 1 else {threads})
    assert torch.get_num_threads() == threads
    assert sorted(latents_by_key(tmp_path / "train")) == sorted(latents_by_key(one / "train"))


def test_a_prepared_shard_mixing_image_shapes_is_refused_naming_both(pipeline_dir, encoded, tmp_path):
    """Prepare writes one bucket a shard; a hand-made shard that mixes shapes fails with a reason,
    and keeps nothing half-written."""
    import io
    import shutil

    from PIL import Image

    from ldm_vae.runner import UnitFailed
    from ldm_vae.shards import ShardWriter

    vae, _, _ = encoded
    prepared = tmp_path / "prepared"
    shutil.copytree(pipeline_dir / "prepared" / "val", prepared / "val")
    samples = list(iter_samples(shard_paths(pipeline_dir / "prepared" / "train")))[:3]
    buf = io.BytesIO()
    Image.new("RGB", (48, 32), "red").save(buf, format="PNG")
    samples[1] = {**samples[1], "png": buf.getvalue()}
    with ShardWriter(prepared / "train", "train-mixed", 10) as w:
        for s in samples:
            w.write({k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")})
    with pytest.raises(UnitFailed) as e:
        run_encode(vae, prepared, tmp_path / "latents", make_params().encode)
    msg = str(e.value)
    assert "of one shard differ in shape (32x32, 48x32)" in msg and samples[1]["__key__"] in msg
    assert "re-run prepare" in msg
    assert not list((tmp_path / "latents").rglob("train-*.tar"))
