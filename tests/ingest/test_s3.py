"""s3:// sources against a real S3-compatible server (SeaweedFS on 127.0.0.1, tests/s3server.py):
a bucket gives what the folder gives, URL lists and hf data files on S3, every refusal fails fast
and names the URL, a store that stops mid-read fails the stage and a re-run finishes the job."""

import hashlib
import io
import re
import subprocess
import sys
import time

import pytest
import yaml

from ldm_vae.ingest.download import raw_images, read_manifest, run_download
from ldm_vae.ingest.prepare import run_prepare
from ldm_vae.s3 import StoreError
from ldm_vae.shards import iter_samples, shard_paths

from helpers.common import ROOT, image_bytes, make_params, make_photo_folder, photo, tiny_raw
from helpers.httpserver import ImageServer, Route
from helpers.s3server import READER_KEY, READER_SECRET, free_port


@pytest.fixture(scope="module")
def photos(s3_server, tmp_path_factory):
    """The test photo folder plus two names that collide once made safe and a file that is no
    image, uploaded to s3://photos/set/."""
    folder = make_photo_folder(tmp_path_factory.mktemp("s3photos") / "photos")
    (folder / "a b.png").write_bytes(image_bytes(photo(70, 60, seed=20)))
    (folder / "a_b.png").write_bytes(image_bytes(photo(72, 60, seed=21)))
    (folder / "notes.txt").write_text("not an image")
    s3_server.upload(folder, "s3://photos/set")
    return folder


def test_a_bucket_gives_the_folders_samples(photos, s3_env, tmp_path):
    summaries = {}
    for name, source in (("folder", f"folder:{photos}"), ("s3", "s3://photos/set")):
        params = make_params(data={"source": source, "unit_images": 3})
        summaries[name] = run_download(params.data, tmp_path / name / "raw")
        run_prepare(params.data, tmp_path / name / "raw", tmp_path / name / "prepared")
    assert summaries["s3"] == summaries["folder"] and summaries["s3"]["kept"] == 10
    rows = {n: read_manifest(tmp_path / n / "raw") for n in summaries}
    # the same keys (collisions included), bytes, sizes and shards; only `source` says where from
    assert [{k: v for k, v in r.items() if k != "source"} for r in rows["s3"]] == \
           [{k: v for k, v in r.items() if k != "source"} for r in rows["folder"]]
    keys = [r["key"] for r in rows["s3"]]
    assert "a_b" in keys and len([k for k in keys if k.startswith("a_b-")]) == 1  # 'a b.png' and 'a_b.png'
    assert all(r["source"].startswith("s3://photos/set/") for r in rows["s3"])
    for split in ("train", "val"):
        a, b = (list(iter_samples(shard_paths(tmp_path / n / "prepared" / split))) for n in ("folder", "s3"))
        assert [s["__key__"] for s in a] == [s["__key__"] for s in b] and a
        assert [s["png"] for s in a] == [s["png"] for s in b]


def test_a_changed_object_redoes_only_its_unit(photos, s3_env, s3_server, tmp_path, capsys):
    s3_server.upload(photos, "s3://photos/edit")
    params = make_params(data={"source": "s3://photos/edit/", "unit_images": 3, "num_workers": "1"})
    out = tmp_path / "raw"
    run_download(params.data, out)
    shards = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar")}
    assert len(shards) == 4
    new = image_bytes(photo(90, 70, seed=99))
    s3_server.put("s3://photos/edit/sub/img5.png", new)  # in the third unit of key order
    capsys.readouterr()
    run_download(params.data, out)
    assert "3 of 4 units already done, 1 to do" in capsys.readouterr().out
    after = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar")}
    assert [n for n in shards if after[n] != shards[n]] == ["raw-u00002-00000.tar"]
    assert raw_images(out)["sub_img5"] == new


def test_auto_units_merge_as_the_listing_grows(photos, s3_env, tmp_path, monkeypatch):
    """unit_images: auto on a bucket: the planner cannot know the count before the listing ends, so
    it merges its smallest units in pairs as the count grows; the units are then the folder's, and
    each unit's fingerprint (over its leaves) still checks when the worker lists its slice again."""
    from ldm_vae.ingest import items, s3_source

    for module in (items, s3_source):  # a ladder small enough for 12 photos: 1, 2, 4 images
        monkeypatch.setattr(module, "UNIT_LADDER", (1, 2, 4))
    monkeypatch.setattr(items, "MIN_UNITS", 2)
    rows, shards = {}, {}
    for name, source in (("folder", f"folder:{photos}"), ("s3", "s3://photos/set")):
        cfg = make_params(data={"source": source, "num_workers": "1"}).data
        run_download(cfg, tmp_path / name)
        rows[name] = [(r["key"], r["sha256"], r["shard"]) for r in read_manifest(tmp_path / name)]
        shards[name] = sorted(p.name for p in (tmp_path / name / "shards").glob("*.tar"))
    assert rows["s3"] == rows["folder"] and shards["s3"] == shards["folder"]
    assert shards["s3"] == [f"raw-u{n:05d}-00000.tar" for n in range(3)]  # 10 images: units of 4, 4, 2


def test_a_parquet_url_list_on_s3(s3_env, s3_server, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    server = ImageServer()
    try:
        bodies = {i: image_bytes(photo(64, 64, seed=40 + i)) for i in range(4)}
        for i, body in bodies.items():
            server.routes[f"/{i}.png"] = Route(body)
        table = pa.table({"url": [f"{server.url}/{i}.png" for i in bodies] + [f"{server.url}/missing.png"],
                          "caption": [f"photo {i}" for i in bodies] + ["gone"]})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        s3_server.put("s3://lists/laion/part-0.parquet", buf.getvalue())
        cfg = make_params(data={"source": "urls:s3://lists/laion/part-0.parquet", "retries": 0}).data
        summary = run_download(cfg, tmp_path / "raw")
    finally:
        server.close()
    assert summary["kept"] == 4 and summary["reasons"] == {"http_404": 1}
    assert [r["caption"] for r in read_manifest(tmp_path / "raw")] == [f"photo {i}" for i in bodies]
    assert sorted(raw_images(tmp_path / "raw").values()) == sorted(bodies.values())


def test_hf_data_files_on_s3(s3_env, s3_server, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bodies = [image_bytes(photo(64, 48, seed=60 + i)) for i in range(5)]
    for part, rows in enumerate((bodies[:3], bodies[3:])):
        table = pa.table({"image": [{"bytes": b, "path": None} for b in rows],
                          "text": [f"caption {part}-{j}" for j in range(len(rows))]})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        s3_server.put(f"s3://hfdata/coco/train-{part:05d}.parquet", buf.getvalue())
    cfg = make_params(data={"source": "hf:s3://hfdata/coco/*.parquet", "caption_column": "text"}).data
    summary = run_download(cfg, tmp_path / "raw")
    assert summary["kept"] == 5
    rows = read_manifest(tmp_path / "raw")
    assert [r["key"] for r in rows] == ["train-00000-00000000", "train-00000-00000001", "train-00000-00000002",
                                        "train-00001-00000000", "train-00001-00000001"]
    assert [raw_images(tmp_path / "raw")[r["key"]] for r in rows] == bodies


def _bad_endpoint() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


FAILURES = {
    "missing bucket": ("s3://no-such-bucket/photos", {}, "the bucket does not exist"),
    "denied": ("s3://photos/set", {"AWS_ACCESS_KEY_ID": READER_KEY, "AWS_SECRET_ACCESS_KEY": READER_SECRET},
               "access denied"),
    "wrong secret": ("s3://photos/set", {"AWS_SECRET_ACCESS_KEY": "not-the-secret"}, "the secret key is wrong"),
    "unknown key": ("s3://photos/set", {"AWS_ACCESS_KEY_ID": "nobody"}, "access key is not known"),
    "wrong endpoint": ("s3://photos/set", {"AWS_ENDPOINT_URL": None}, "cannot reach the store's endpoint"),
    "empty prefix": ("s3://photos/nothing-here", {}, "no image objects under this prefix"),
    "url list missing": ("urls:s3://photos/no-list.parquet", {}, "no such object"),
    "hf files missing": ("hf:s3://no-such-bucket/*.parquet", {}, "the bucket does not exist"),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_refusals_fail_fast_naming_the_url(case, photos, s3_env, monkeypatch, tmp_path):
    source, env, reason = FAILURES[case]
    for name, value in env.items():
        monkeypatch.setenv(name, value or _bad_endpoint())
    cfg = make_params(data={"source": source, "num_workers": "1", "connect_timeout": 1.0, "retries": 1}).data
    start = time.monotonic()
    with pytest.raises(StoreError, match=reason) as err:
        run_download(cfg, tmp_path / "raw")
    assert time.monotonic() - start < 20
    url = source.split(":", 1)[1] if not source.startswith("s3:") else source
    assert url.split("*")[0].rstrip("/") in str(err.value)
    assert not (tmp_path / "raw" / "manifest.jsonl").exists()


def test_the_stage_names_the_bucket_and_exits(s3_server, tmp_path):
    import os

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_raw(data={"source": "s3://no-such-bucket/x"})))
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / "download.py"), "--params", str(params),
                           "--out", str(tmp_path / "raw")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **s3_server.env, "PYTHONPATH": str(ROOT)})
    assert proc.returncode != 0
    assert "download: s3://no-such-bucket/x/: the bucket does not exist" in proc.stderr


def test_a_store_that_stops_mid_read_fails_the_stage_and_a_rerun_finishes(s3_server, s3_env, tmp_path):
    import os

    bodies = {f"p{i:02d}": image_bytes(photo(40, 40, seed=100 + i)) for i in range(40)}
    for key, body in bodies.items():
        s3_server.put(f"s3://photos/many/{key}.png", body)
    params = tmp_path / "params.yaml"
    fast = {"unit_images": 1, "num_workers": "1", "connect_timeout": 1.0, "read_timeout": 1.0, "retries": 1}
    params.write_text(yaml.safe_dump(tiny_raw(data={"source": "s3://photos/many", **fast})))
    out = tmp_path / "raw"
    proc = subprocess.Popen([sys.executable, str(ROOT / "stages" / "download.py"), "--params", str(params),
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list((out / ".done").glob("u*.json"))) < 3:
            time.sleep(0.01)
        s3_server.pause()  # the store stops answering in the middle of the stage
        paused = time.monotonic()
        _, stderr = proc.communicate(timeout=90)
        took = time.monotonic() - paused
    finally:
        s3_server.resume()
        if proc.poll() is None:
            proc.kill()
    done = len(list((out / ".done").glob("u*.json")))
    assert proc.returncode != 0 and 3 <= done < 40, stderr[-2000:]
    assert took < 30  # one unit's retries, then no more units are started
    # the pause lands in a request or in a body being read: either way the stage says so and stops
    assert re.search(r"cannot reach the store's endpoint|the store stopped sending", stderr), stderr[-2000:]
    assert "units not started: a re-run does them" in stderr
    assert not (out / "manifest.jsonl").exists()

    start = time.monotonic()
    summary = run_download(make_params(data={"source": "s3://photos/many", **fast}).data, out)
    print(f"paused to exit {took:.1f} s, re-run {time.monotonic() - start:.1f} s")
    assert summary == {"kept": 40, "rejected": 0, "reasons": {}}
    assert [r["key"] for r in read_manifest(out)] == sorted(bodies)  # every image once, in key order
    assert raw_images(out) == bodies
    assert all(hashlib.sha256(bodies[r["key"]]).hexdigest() == r["sha256"] for r in read_manifest(out))


def _listing(bucket: str, prefix: str, objects: dict[str, bytes]) -> bytes:
    """A ListObjectsV2 answer, as S3 writes it."""
    rows = "".join(f"<Contents><Key>{prefix}{name}</Key><ETag>&quot;{hashlib.md5(body).hexdigest()}&quot;</ETag>"
                   f"<Size>{len(body)}</Size><LastModified>2026-01-01T00:00:00.000Z</LastModified></Contents>"
                   for name, body in sorted(objects.items()))
    return (f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            f"<Name>{bucket}</Name><Prefix>{prefix}</Prefix><KeyCount>{len(objects)}</KeyCount><MaxKeys>1000</MaxKeys>"
            f"<EncodingType>url</EncodingType><IsTruncated>false</IsTruncated>{rows}</ListBucketResult>").encode()


SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


@pytest.mark.slow
def test_slow_down_and_cut_bodies_are_retried(monkeypatch, tmp_path):
    """An S3 endpoint (this test's HTTP server speaking S3's XML) that answers 503 SlowDown to the
    listing and to an object, cuts another object's body mid-way, and has lost a third: the first
    two are retried and kept, the lost one is that image's `http_404`."""
    objects = {f"{c}.png": image_bytes(photo(48, 48, seed=200 + i)) for i, c in enumerate("abcd")}
    server = ImageServer()
    try:
        server.routes["/flaky?list-type=2&prefix=photos%2F&max-keys=1000&encoding-type=url"] = Route(
            _listing("flaky", "photos/", objects), fail_first=1, fail_status=503, fail_body=SLOW_DOWN,
            content_type="application/xml")
        server.routes["/flaky/photos/a.png"] = Route(objects["a.png"], fail_first=2, fail_status=503,
                                                     fail_body=SLOW_DOWN)
        server.routes["/flaky/photos/b.png"] = Route(objects["b.png"], cut_first=1)
        server.routes["/flaky/photos/d.png"] = Route(objects["d.png"])  # c.png: gone since the listing
        for name, value in {"AWS_ENDPOINT_URL": server.url, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
            monkeypatch.setenv(name, value)
        cfg = make_params(data={"source": "s3://flaky/photos", "num_workers": "1", "retries": 3,
                                "retry_backoff": 0.05}).data
        summary = run_download(cfg, tmp_path / "raw")
    finally:
        server.close()
    assert summary == {"kept": 3, "rejected": 1, "reasons": {"http_404": 1}}
    assert raw_images(tmp_path / "raw") == {k: objects[f"{k}.png"] for k in "abd"}
    assert server.hits["/flaky/photos/a.png"] == 3 and server.hits["/flaky/photos/b.png"] == 2


def test_a_prefix_changed_after_planning_fails_the_unit(photos, s3_env, s3_server):
    """A worker lists its own slice again: an object added or rewritten after the plan fails the
    unit (naming the prefix) instead of mixing two listings."""
    from ldm_vae.ingest.s3_source import iter_s3_unit, plan_s3

    s3_server.upload(photos, "s3://photos/moving")
    cfg = make_params(data={"source": "s3://photos/moving", "unit_images": 4}).data
    units = plan_s3(cfg)
    assert [u.size for u in units] == [4, 4, 2]
    s3_server.put("s3://photos/moving/a c.png", image_bytes(photo(50, 50, seed=7)))  # sorts into unit 0
    with pytest.raises(StoreError, match="s3://photos/moving/: the objects after the start of the prefix changed"):
        list(iter_s3_unit(cfg, units[0].task))
    assert len(list(iter_s3_unit(cfg, units[1].task))) == 4  # its slice (after img2.png) is unchanged
    s3_server.put("s3://photos/moving/img4.png", image_bytes(photo(50, 50, seed=8)))  # rewritten: a new ETag
    with pytest.raises(StoreError, match="the objects after s3://photos/moving/img2.png changed"):
        list(iter_s3_unit(cfg, units[1].task))
