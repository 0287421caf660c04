"""Download and prepare on every core and on a Ray cluster: the same results whatever the process
count or engine, a lost node costing only its units in flight, the ADM crop against its reference,
hf datasets split by their own shards."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm_vae.config import DataConfig
from ldm_vae.images import adm_center_crop, load_rgb
from ldm_vae.ingest.download import raw_images, read_manifest, run_download
from ldm_vae.ingest.prepare import run_prepare
from ldm_vae.shards import iter_samples, shard_paths

from helpers.common import image_bytes, make_photo_folder, photo


def busy_folder(root: Path) -> Path:
    """14 photos (8 + 6 more) plus a bad file and two duplicates that cross unit boundaries."""
    make_photo_folder(root)
    for i in range(6):
        photo(90 + 4 * i, 70 + 6 * i, seed=20 + i).save(root / f"more{i}.png")
    (root / "zz_bad.jpg").write_bytes(b"not a jpeg")
    (root / "zz_copy_a.png").write_bytes((root / "img0.jpg").read_bytes())  # an earlier unit's image
    (root / "sub" / "zz_copy_b.png").write_bytes((root / "more5.png").read_bytes())
    return root


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".done" not in p.parts}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    base = tmp_path_factory.mktemp("one")
    folder = busy_folder(base / "photos")
    cfg = DataConfig(source=f"folder:{folder}", unit_images=3, num_workers="1", resolution=32, crops_per_image=3,
                     val_crops_per_image=2, val_fraction=0.3, samples_per_shard=4)
    summary = run_download(cfg, base / "raw")
    counts = run_prepare(cfg, base / "raw", base / "prepared")
    return cfg, base, summary, counts


@pytest.mark.slow
def test_one_and_two_processes_give_identical_outputs(one_process, tmp_path):
    cfg, base, summary, counts = one_process
    assert summary == {"kept": 14, "rejected": 3, "reasons": {"duplicate": 2, "not_an_image": 1}}
    assert len(list((base / "raw" / "shards").iterdir())) == 6  # 17 items in units of 3
    two = DataConfig(**{**cfg.__dict__, "num_workers": "2"})
    assert run_download(two, tmp_path / "raw") == summary
    assert run_prepare(two, tmp_path / "raw", tmp_path / "prepared") == counts
    for stage in ("raw", "prepared"):
        a, b = files_of(base / stage), files_of(tmp_path / stage)
        assert sorted(a) == sorted(b) and all(a[n] == b[n] for n in a), stage  # names and bytes
    # The duplicate of an earlier unit's image is rejected by the global merge, in source order.
    rejected = [json.loads(x) for x in (tmp_path / "raw" / "rejected.jsonl").read_text().splitlines()]
    assert [(r["key"], r["reason"]) for r in rejected] == [
        ("zz_bad", "not_an_image"), ("zz_copy_a", "duplicate"), ("sub_zz_copy_b", "duplicate")]
    assert rejected[1]["detail"] == "same bytes as img0" and rejected[2]["detail"] == "same bytes as more5"
    # Every kept image once in the prepared shards, split by photograph.
    raw_keys = {json.loads(s["json"])["raw_key"] for split in ("train", "val")
                for s in iter_samples(shard_paths(tmp_path / "prepared" / split))}
    assert raw_keys == {r["key"] for r in read_manifest(tmp_path / "raw")}


def test_the_ray_engine_gives_the_one_process_bytes(one_process, ray_engine, tmp_path):
    """download and prepare as tasks on a two-node Ray cluster: the same names and bytes (manifest,
    rejections, raw and prepared shards) as one local process."""
    cfg, base, summary, counts = one_process
    assert run_download(cfg, tmp_path / "raw", ray_engine) == summary
    assert run_prepare(cfg, tmp_path / "raw", tmp_path / "prepared", ray_engine) == counts
    for stage in ("raw", "prepared"):
        a, b = files_of(base / stage), files_of(tmp_path / stage)
        assert sorted(a) == sorted(b) and all(a[n] == b[n] for n in a), stage
    assert not list(tmp_path.rglob(".ray-check-*"))  # the shared-folder probe's marker is gone


def test_default_units_give_every_core_work_and_ignore_the_process_count(tmp_path):
    """data.unit_images: auto cuts a small set into units for every core (2,000 images were one
    unit of 5,000 before), large ones into units of up to 4,000, and never looks at the process count."""
    from ldm_vae.ingest.items import unit_size
    from ldm_vae.ingest.urls import plan_urls

    counts = (17, 2000, 15_999, 16_000, 100_000, 256_000, 1_281_167)
    assert [unit_size("auto", n) for n in counts] == [125, 125, 125, 250, 1000, 4000, 4000]
    assert unit_size("5000", 2000) == 5000
    listing = tmp_path / "urls.txt"
    listing.write_text("".join(f"http://127.0.0.1:9/{i}.jpg\n" for i in range(2000)))
    plans = [plan_urls(DataConfig(source=f"urls:{listing}", num_workers=w)) for w in ("1", "2", "64")]
    assert [[(u.name, u.ident, u.size) for u in p] for p in plans[1:]] == \
           [[(u.name, u.ident, u.size) for u in plans[0]]] * 2
    assert [u.size for u in plans[0]] == [125] * 16  # a 16-core machine's pool is busy


def test_a_launcher_is_refused_for_download_and_prepare(one_process, monkeypatch, tmp_path):
    """Several machines are the Ray engine's: a launcher group fails at once, saying so."""
    cfg, base, _, _ = one_process
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="engine.kind: ray"):
        run_download(cfg, tmp_path / "raw")
    with pytest.raises(ValueError, match="engine.kind: ray"):
        run_prepare(cfg, base / "raw", tmp_path / "prepared")
    assert not (tmp_path / "raw").exists() and not (tmp_path / "prepared").exists()


def test_a_folder_a_node_cannot_see_fails_at_the_start(one_process, ray_engine, tmp_path):
    """The Ray engine needs the stage's folders on every node: one missing fails before any unit."""
    cfg, base, _, _ = one_process
    with pytest.raises(ValueError, match=r"every node mounts.*node 127\.0\.0\.1 .*no folder .*nowhere"):
        run_prepare(cfg, tmp_path / "nowhere", tmp_path / "prepared", ray_engine)
    assert not list((tmp_path / "prepared").rglob("*.tar"))


@pytest.mark.slow
def test_an_address_where_no_cluster_listens_fails_in_a_second(one_process, tmp_path):
    import time

    from ldm_vae.config import EngineConfig

    from helpers.s3server import free_port

    cfg, base, _, _ = one_process
    start = time.time()
    with pytest.raises(ValueError, match=r"engine.ray_address: '127.0.0.1:\d+': nothing answers there"):
        run_prepare(
            cfg, base / "raw", tmp_path / "prepared", EngineConfig(kind="ray", ray_address=f"127.0.0.1:{free_port()}")
        )
    assert time.time() - start < 5  # ray.init alone would wait minutes


def test_a_node_killed_mid_prepare_costs_only_its_units_in_flight(ray_cluster, ray_engine, tmp_path):
    """The second node's raylet killed (by pid) while prepare runs on both nodes: Ray runs its
    units again on the head, and the outputs are the local run's, every sample once."""
    import threading
    import time

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(16):
            photo(640, 480, seed=i).save(folder / f"p{i:02d}.jpg", quality=90)
    cfg = DataConfig(source=f"folder:{folder}", unit_images=2, num_workers="1", resolution=256, crops_per_image=30,
                     val_crops_per_image=10, val_fraction=0.2, samples_per_shard=50)
    run_download(cfg, tmp_path / "raw")
    counts = run_prepare(cfg, tmp_path / "raw", tmp_path / "local")
    done = tmp_path / "prepared" / ".done"
    seen: dict = {}

    def kill_when_a_unit_is_done():
        deadline = time.time() + 60
        while time.time() < deadline and not (done.is_dir() and any(done.iterdir())):
            time.sleep(0.01)
        seen["records"] = len(list(done.iterdir())) if done.is_dir() else 0
        os.kill(ray_cluster.worker_raylet(), 9)

    killer = threading.Thread(target=kill_when_a_unit_is_done)
    killer.start()
    try:
        assert run_prepare(cfg, tmp_path / "raw", tmp_path / "prepared", ray_engine) == counts
    finally:
        killer.join()
        ray_cluster.wait_nodes(1, exact=True)
        ray_cluster.add_worker()  # for the tests after this one
    assert 0 < seen["records"] < 8  # killed mid-stage
    a, b = files_of(tmp_path / "local"), files_of(tmp_path / "prepared")
    assert sorted(a) == sorted(b) and all(a[n] == b[n] for n in a)  # every sample once, the same bytes
    assert not [p for p in (tmp_path / "prepared").rglob("*.tmp")]  # the lost attempt's partial file is gone


def test_prepare_resumes_from_its_records_and_drops_strays(one_process, tmp_path):
    cfg, base, _, counts = one_process
    import shutil

    shutil.copytree(base / "raw", tmp_path / "raw")
    shutil.copytree(base / "prepared", tmp_path / "prepared")
    done = tmp_path / "prepared" / ".done"
    (done / "u00004.json").unlink()  # as if killed before unit 4 was recorded
    (tmp_path / "prepared" / "train" / ".train-u00005-00000.tar.tmp").write_bytes(b"half")
    kept = {p.name: p.stat().st_mtime_ns for p in done.iterdir()}
    assert run_prepare(cfg, tmp_path / "raw", tmp_path / "prepared") == counts
    assert {p.name: p.stat().st_mtime_ns for p in done.iterdir() if p.name in kept} == kept  # not redone
    a, b = files_of(base / "prepared"), files_of(tmp_path / "prepared")
    assert sorted(a) == sorted(b) and all(a[n] == b[n] for n in a)
    # Other params: every unit is redone, and nothing of the old crops survives.
    other = DataConfig(**{**cfg.__dict__, "resolution": 16})
    run_prepare(other, tmp_path / "raw", tmp_path / "prepared")
    sizes = {load_rgb(s.get("png"), 10**6).size for s in iter_samples(shard_paths(tmp_path / "prepared" / "train"))}
    assert sizes == {(16, 16)}


def reference_center_crop_arr(pil_image, image_size):
    """ADM's center_crop_arr (guided-diffusion image_datasets.py), as DiT and EDM2 use it."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


@pytest.mark.parametrize("size,res", [((500, 375), 256), ((375, 500), 256), ((1201, 803), 256), ((2600, 1950), 256),
                                      ((200, 150), 256), ((333, 517), 64), ((255, 255), 128), ((64, 640), 32)])
@pytest.mark.slow
def test_adm_crop_matches_the_reference_pixel_for_pixel(size, res):
    img = photo(*size, seed=size[0])
    ours, box = adm_center_crop(img, res)
    assert np.array_equal(np.asarray(ours), reference_center_crop_arr(img, res))
    # The box, in the original's pixels, is the centred square of the shorter side (to rounding).
    side, tol = min(size), 1 + min(size) / res  # a pixel of the crop, in the original's pixels
    assert abs((box[2] - box[0]) - side) <= tol and abs((box[3] - box[1]) - side) <= tol
    assert abs(box[0] - (size[0] - side) / 2) <= tol and abs(box[1] - (size[1] - side) / 2) <= tol


def test_crop_methods_through_prepare(tmp_path):
    folder = make_photo_folder(tmp_path / "photos")
    base = dict(source=f"folder:{folder}", resolution=32, val_fraction=0.3, num_workers="1", val_crops_per_image=1)
    run_download(DataConfig(**base), tmp_path / "raw")
    rows = {r["key"]: r for r in read_manifest(tmp_path / "raw")}
    images = raw_images(tmp_path / "raw")
    run_prepare(DataConfig(**base, crop="adm", crops_per_image=1), tmp_path / "raw", tmp_path / "adm")
    for s in iter_samples(shard_paths(tmp_path / "adm" / "train")):
        ref = reference_center_crop_arr(load_rgb(images[s["__key__"]], 10**7), 32)
        assert np.array_equal(np.asarray(load_rgb(s["png"], 10**6)), ref)
    run_prepare(DataConfig(**base, crop="random", crops_per_image=4), tmp_path / "raw", tmp_path / "random")
    boxes = {}
    for s in iter_samples(shard_paths(tmp_path / "random" / "train")):
        meta = json.loads(s["json"])
        w, h = rows[meta["raw_key"]]["width"], rows[meta["raw_key"]]["height"]
        left, top, right, bottom = meta["crop_box"]
        assert right - left == bottom - top == min(w, h) and 0 <= left <= w - min(w, h)  # whole shorter side
        boxes.setdefault(meta["raw_key"], set()).add(left)
    assert any(len(v) > 1 for v in boxes.values())  # at random places


def test_adm_crop_with_many_crops_is_refused_naming_the_keys():
    from ldm_vae.config import ParamError

    with pytest.raises(ParamError, match="data.crops_per_image"):
        DataConfig(crop="adm", crops_per_image=90).check()
    with pytest.raises(ParamError, match="data.crop: 'centre'"):
        DataConfig(crop="centre").check()


@pytest.mark.slow
def test_streamed_hf_set_is_split_by_its_own_shards(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "parquet"
    folder.mkdir()
    for f in range(3):
        cells = [{"bytes": image_bytes(photo(64 + i, 48, seed=10 * f + i)), "path": None} for i in range(4)]
        ds = datasets.Dataset.from_dict({"image": cells, "text": [f"file {f} row {i}" for i in range(4)]},
                                        features=datasets.Features({"image": datasets.Image(),
                                                                    "text": datasets.Value("string")}))
        ds.to_parquet(str(folder / f"part-{f}.parquet"))
    cfg = DataConfig(source=f"hf:{folder}", caption_column="text", num_workers="1")
    assert run_download(cfg, tmp_path / "one")["kept"] == 12
    rows = read_manifest(tmp_path / "one")
    assert [r["key"] for r in rows][:5] == ["train-00000-00000000", "train-00000-00000001", "train-00000-00000002",
                                            "train-00000-00000003", "train-00001-00000000"]
    assert len({r["shard"] for r in rows}) == 3  # a unit (and a raw shard) per data file
    assert {r["caption"] for r in rows} == {f"file {f} row {i}" for f in range(3) for i in range(4)}
    two = DataConfig(**{**cfg.__dict__, "num_workers": "2"})
    run_download(two, tmp_path / "two")
    assert files_of(tmp_path / "one") == files_of(tmp_path / "two")
    # max_images takes an equal share of each shard: a first look that sees every file.
    few = run_download(DataConfig(**{**cfg.__dict__, "max_images": 5}), tmp_path / "few")
    assert few["kept"] == 5
    assert [r["key"] for r in read_manifest(tmp_path / "few")] == [
        "train-00000-00000000", "train-00000-00000001", "train-00001-00000000", "train-00001-00000001",
        "train-00002-00000000"]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "ray"])
def test_a_corrupt_raw_shard_names_its_unit_and_loses_no_other_unit(one_process, tmp_path, where, request):
    """On a cluster too, a bad input fails its unit once (Ray does not retry the work's own error),
    naming the unit, its input and the node."""
    import shutil

    from ldm_vae.runner import UnitFailed

    cfg, base, _, counts = one_process
    engine = request.getfixturevalue("ray_engine") if where == "ray" else None
    shutil.copytree(base / "raw", tmp_path / "raw")
    shard = tmp_path / "raw" / "shards" / "raw-u00002-00000.tar"
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])  # cut mid-member
    two = DataConfig(**{**cfg.__dict__, "num_workers": "2"})
    on = r" on node 127\.0\.0\.1 \(\w+\)" if where == "ray" else ""
    with pytest.raises(
        UnitFailed, match=rf"unit u00002 \(shards/raw-u00002-00000.tar\){on}: ValueError: truncated tar"
    ) as e:
        run_prepare(two, tmp_path / "raw", tmp_path / "prepared", engine)
    assert "more units failed" not in str(e.value)
    done = sorted(p.name for p in (tmp_path / "prepared" / ".done").iterdir())
    assert done == [f"u{i:05d}.json" for i in range(6) if i != 2]  # every other unit finished and recorded
    shard.write_bytes(whole)
    assert run_prepare(two, tmp_path / "raw", tmp_path / "prepared", engine) == counts
    a, b = files_of(base / "prepared"), files_of(tmp_path / "prepared")
    assert sorted(a) == sorted(b) and all(a[n] == b[n] for n in a)
