import csv
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ldm_vae.config import DataConfig
from ldm_vae.ingest.download import raw_images, read_manifest, run_download
from ldm_vae.ingest.urls import Fetcher, FetchError, read_url_list, url_key

from helpers.common import ROOT, image_bytes, photo, rejections
from helpers.httpserver import ImageServer, Route

FAST = dict(connect_timeout=2.0, read_timeout=0.5, retries=2, retry_backoff=0.05)


@pytest.fixture
def server():
    s = ImageServer()
    yield s
    s.close()


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["key", "url", "caption", "label", "sha256"])
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return path


@pytest.mark.slow
def test_url_list_every_failure_has_its_reason(tmp_path, server):
    good = {f"good{i}": image_bytes(photo(64, 48, seed=i)) for i in range(3)}
    for k, body in good.items():
        server.routes[f"/{k}.png"] = Route(body)
    jpeg = image_bytes(photo(80, 64, seed=9), "JPEG")
    server.routes["/flaky.jpg"] = Route(jpeg, fail_first=1)  # 500 once, then fine
    server.routes["/slow.png"] = Route(image_bytes(photo(seed=5)), delay=2.0)  # > read_timeout
    server.routes["/page.png"] = Route(b"<html>sorry</html>", content_type="text/html")
    whole = image_bytes(photo(120, 100, seed=7), "JPEG")
    server.routes["/cut.jpg"] = Route(whole[: len(whole) // 2])
    server.routes["/tiny.png"] = Route(image_bytes(photo(8, 8)))
    server.routes["/same.png"] = Route(good["good0"])
    server.routes["/forged.png"] = Route(image_bytes(photo(seed=11)))
    u = server.url
    rows = [
        {"key": "good0", "url": f"{u}/good0.png", "caption": "a red thing", "label": "3"},
        {"key": "good1", "url": f"{u}/good1.png", "caption": "", "label": ""},
        {"key": "good2", "url": f"{u}/good2.png", "sha256": hashlib.sha256(good["good2"]).hexdigest()},
        {"key": "flaky", "url": f"{u}/flaky.jpg"},
        {"key": "gone", "url": f"{u}/gone.png"},
        {"key": "slow", "url": f"{u}/slow.png"},
        {"key": "page", "url": f"{u}/page.png"},
        {"key": "cut", "url": f"{u}/cut.jpg"},
        {"key": "tiny", "url": f"{u}/tiny.png"},
        {"key": "same", "url": f"{u}/same.png"},
        {"key": "forged", "url": f"{u}/forged.png", "sha256": "0" * 64},
        {"key": "local", "url": "file:///etc/passwd"},
        {"key": "ftp", "url": "ftp://127.0.0.1/x.png"},
        {"key": "good1", "url": f"{u}/good1.png"},  # listed twice
    ]
    cfg = DataConfig(source=f"urls:{write_csv(tmp_path / 'list.csv', rows)}", download_workers=4, **FAST)
    out = tmp_path / "raw"
    summary = run_download(cfg, out)

    manifest = read_manifest(out)
    assert [r["key"] for r in manifest] == ["good0", "good1", "good2", "flaky"]  # list order
    assert manifest[0]["caption"] == "a red thing" and manifest[0]["label"] == 3
    assert "caption" not in manifest[1] and "label" not in manifest[1]
    assert manifest[3]["source"] == f"{u}/flaky.jpg" and manifest[3]["member"] == "flaky.jpg"
    kept = raw_images(out)
    assert kept["good2"] == good["good2"] and kept["flaky"] == jpeg
    assert rejections(out) == {
        "gone": "http_404", "slow": "timeout", "page": "not_an_image", "cut": "truncated",
        "tiny": "too_small", "same": "duplicate", "forged": "sha256_mismatch", "local": "bad_url",
        "ftp": "bad_url", "good1": "duplicate_url",
    }
    assert summary["kept"] == 4 and summary["rejected"] == 10
    # Retried: the 500 once, the timeout until retries ran out; never the 404.
    assert server.hits["/flaky.jpg"] == 2 and server.hits["/slow.png"] == 3 and server.hits["/gone.png"] == 1
    assert [p.name for p in (out / "shards").iterdir()] == ["raw-u00000-00000.tar"]  # one unit, one shard


@pytest.mark.slow
def test_text_list_keys_hash_the_url_and_a_rerun_fetches_nothing_kept(tmp_path, server):
    for i in range(4):
        server.routes[f"/{i}.png"] = Route(image_bytes(photo(seed=i)))
    urls = [f"{server.url}/{i}.png" for i in range(4)] + [f"{server.url}/nope.png"]
    listing = tmp_path / "urls.txt"
    listing.write_text("# my images\n\n" + "\n".join(urls) + "\n")
    assert [r.key for r in read_url_list(listing)] == [url_key(x) for x in urls]
    cfg = DataConfig(source=f"urls:{listing}", download_workers=2, **FAST)
    out = tmp_path / "raw"
    first = run_download(cfg, out)
    manifest = (out / "manifest.jsonl").read_text()
    assert first == {"kept": 4, "rejected": 1, "reasons": {"http_404": 1}}
    again = run_download(cfg, out)
    assert again == first and (out / "manifest.jsonl").read_text() == manifest
    assert all(server.hits[f"/{i}.png"] == 1 for i in range(4))  # kept images were not fetched again
    assert server.hits["/nope.png"] == 2  # a failure is tried again on a re-run
    assert raw_images(out) == {url_key(urls[i]): image_bytes(photo(seed=i)) for i in range(4)}


def test_max_images_and_size_cap(tmp_path, server):
    server.routes["/big.png"] = Route(image_bytes(photo(400, 400, seed=1)))
    server.routes["/ok.png"] = Route(image_bytes(photo(seed=2)))
    listing = tmp_path / "urls.txt"
    listing.write_text(f"{server.url}/big.png\n{server.url}/ok.png\n{server.url}/ok2.png\n")
    out = tmp_path / "raw"
    summary = run_download(DataConfig(source=f"urls:{listing}", max_images=2, max_bytes=50_000, **FAST), out)
    assert summary == {"kept": 1, "rejected": 1, "reasons": {"too_large": 1}}
    assert "/ok2.png" not in server.hits


def test_fetcher_gives_up_on_connection_errors(tmp_path):
    cfg = DataConfig(**FAST)
    with pytest.raises(FetchError) as e:
        Fetcher(cfg).fetch("http://127.0.0.1:9/x.png")  # the discard port: nothing listens
    assert e.value.reason == "connection_error" and "3 tries" in e.value.detail


KILLED_RUN = """
import sys
sys.path.insert(0, {root!r})
from ldm_vae.config import DataConfig
from ldm_vae.ingest.download import run_download
run_download(DataConfig(source={source!r}, download_workers=1, num_workers="1", unit_images=3, read_timeout=30.0),
             __import__('pathlib').Path({out!r}))
"""


@pytest.mark.slow
def test_killed_download_keeps_finished_units_and_a_rerun_completes(tmp_path, server):
    bodies = {i: image_bytes(photo(seed=i)) for i in range(12)}
    for i, body in bodies.items():
        server.routes[f"/{i}.png"] = Route(body, delay=0.15)
    listing = tmp_path / "urls.csv"
    write_csv(listing, [{"key": f"k{i:02d}", "url": f"{server.url}/{i}.png"} for i in bodies])
    out = tmp_path / "raw"
    root = str(ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN.format(root=root, source=f"urls:{listing}", out=str(out))]
    )
    deadline = time.time() + 60
    while time.time() < deadline and len(list((out / ".done").glob("u*.json"))) < 1:
        time.sleep(0.05)
    time.sleep(0.2)  # the next unit is half fetched
    proc.kill()
    proc.wait()
    done = sorted(p.stem for p in (out / ".done").glob("u*.json"))
    assert 1 <= len(done) < 4 and not (out / "manifest.jsonl").exists()
    finished = {n: (out / "shards" / f"raw-{n}-00000.tar").stat().st_mtime_ns for n in done}

    before = sum(server.hits.values())
    summary = run_download(DataConfig(source=f"urls:{listing}", download_workers=4, num_workers="2", unit_images=3,
                                      **FAST), out)
    assert summary["kept"] == 12
    assert [r["key"] for r in read_manifest(out)] == [f"k{i:02d}" for i in range(12)]
    assert sum(server.hits.values()) - before == 12 - 3 * len(done)  # only the unfinished units fetched
    assert all((out / "shards" / f"raw-{n}-00000.tar").stat().st_mtime_ns == t for n, t in finished.items())
    assert raw_images(out) == {f"k{i:02d}": bodies[i] for i in range(12)}
    assert not list(out.glob("**/*.tmp"))


# --- hostile servers: every failure is that URL's rejection, nothing hangs ------------------------

@pytest.mark.slow
def test_hostile_responses_are_rejections_and_the_stage_goes_on(tmp_path, server):
    """Bad Content-Length headers, a drip feed, redirects and a 429 with Retry-After: each URL
    gets a reason (or its image), and the stage finishes within the deadline."""
    body = image_bytes(photo(seed=3))
    server.routes["/abc.png"] = Route(body, headers={"Content-Length": "abc"})  # once stopped the stage
    server.routes["/neg.png"] = Route(body, headers={"Content-Length": "-5"})
    server.routes["/huge-cl.png"] = Route(body, headers={"Content-Length": "9" * 30})
    server.routes["/drip.png"] = Route(image_bytes(photo(seed=4)), drip=0.05)  # a byte well inside read_timeout
    server.routes["/moved.png"] = Route(redirect="/final.png")
    server.routes["/final.png"] = Route(image_bytes(photo(seed=5)))
    server.routes["/busy.png"] = Route(image_bytes(photo(seed=6)), fail_first=1, fail_status=429,
                                       fail_headers={"Retry-After": "1"})
    server.routes["/later.png"] = Route(image_bytes(photo(seed=7)), fail_first=5, fail_status=503,
                                        fail_headers={"Retry-After": "3600"})  # past the deadline: give up now
    server.routes["/to-file.png"] = Route(redirect="file:///etc/passwd")
    names = ["abc", "neg", "huge-cl", "drip", "moved", "busy", "later", "to-file"]
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{server.url}/{n}.png\n" for n in names) + "http://[::1/bad\nhttps://\n")
    cfg = DataConfig(source=f"urls:{listing}", download_workers=8, fetch_deadline=3.0,
                     **{**FAST, "read_timeout": 1.0, "retry_backoff": 0.05})
    start = time.monotonic()
    summary = run_download(cfg, tmp_path / "raw")
    took = time.monotonic() - start

    by_url = {r["source"].rsplit("/", 1)[-1]: r for r in read_manifest(tmp_path / "raw")}
    assert set(by_url) == {"moved.png", "busy.png"}
    assert by_url["moved.png"]["final_url"] == f"{server.url}/final.png"
    assert "final_url" not in by_url["busy.png"]
    assert server.hits["/busy.png"] == 2  # waited out the Retry-After once, then got it
    assert server.hits["/later.png"] == 1  # a Retry-After past the deadline is not waited for
    reasons = {r["source"].rsplit("/", 1)[-1]: r["reason"] for r in _rejected(tmp_path / "raw")}
    assert reasons == {"abc.png": "bad_response", "neg.png": "bad_response", "huge-cl.png": "too_large",
                       "drip.png": "timeout", "later.png": "http_503", "to-file.png": "bad_url",
                       "bad": "bad_url", "": "bad_url"}
    assert summary["kept"] == 2 and summary["rejected"] == 8
    assert took < 3.0 + 1.0 + 3.0, f"the deadline did not hold: {took:.1f} s"


def _rejected(raw: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (raw / "rejected.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_drip_feed_stops_at_the_deadline(server):
    server.routes["/drip.png"] = Route(b"x" * 10_000, drip=0.02)
    cfg = DataConfig(**{**FAST, "read_timeout": 5.0, "fetch_deadline": 1.0})
    start = time.monotonic()
    with pytest.raises(FetchError) as e:
        Fetcher(cfg).fetch(f"{server.url}/drip.png")
    assert e.value.reason == "timeout" and "fetch_deadline" in e.value.detail
    assert time.monotonic() - start < 2.0
    # The thread's next fetch works (the cut connection is not reused).
    server.routes["/ok.png"] = Route(b"fine")
    assert Fetcher(cfg).fetch(f"{server.url}/ok.png") == (b"fine", f"{server.url}/ok.png")


@pytest.mark.parametrize("value,seconds", [("2", 2.0), ("0", 0.0), ("abc", None), ("", None), ("-1", None),
                                           ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0), ("Wed, 99 Oct", None)])
def test_retry_after_values(value, seconds):
    from ldm_vae.ingest.urls import _retry_after

    assert _retry_after(value) == seconds


def test_x_robots_tag_opt_outs_are_honoured_by_default_and_can_be_turned_off(tmp_path, server):
    """img2dataset's default: noai, noimageai, noindex and noimageindex, addressed to every agent
    or to ldm-vae, refuse an image (its own reason, its body never read); another crawler's rule,
    or another directive, does not."""
    tags = {"noai": "noai", "ours": "ldm-vae: noimageai", "theirs": "otherbot: noai",
            "index": "noindex, unavailable_after: 25 Jun 2030 15:00:00 PST", "follow": "nofollow", "none": ""}
    for i, (name, tag) in enumerate(tags.items()):
        server.routes[f"/{name}.png"] = Route(image_bytes(photo(seed=i)), headers={"X-Robots-Tag": tag} if tag else {})
    listing = tmp_path / "urls.txt"
    listing.write_text("".join(f"{server.url}/{name}.png\n" for name in tags))
    key = {url_key(f"{server.url}/{name}.png"): name for name in tags}
    summary = run_download(DataConfig(source=f"urls:{listing}", **FAST), tmp_path / "raw")
    assert summary == {"kept": 3, "rejected": 3, "reasons": {"opted_out": 3}}
    rows = [json.loads(line) for line in (tmp_path / "raw" / "rejected.jsonl").read_text().splitlines()]
    refused = {key[r["key"]]: (r["reason"], r["detail"]) for r in rows}
    assert refused == {
        "noai": ("opted_out", "X-Robots-Tag: noai"),
        "ours": ("opted_out", "X-Robots-Tag: ldm-vae: noimageai"),
        "index": ("opted_out", f"X-Robots-Tag: {tags['index']}"),
    }
    assert server.hits["/noai.png"] == 1  # refused at once: never retried
    # the list changed: a re-run into the same folder does its URL units again, fetching what it refused
    everything = run_download(DataConfig(source=f"urls:{listing}", disallowed_header_directives=(), **FAST),
                              tmp_path / "raw")
    assert everything == {"kept": 6, "rejected": 0, "reasons": {}} and server.hits["/noai.png"] == 2
    with pytest.raises(Exception, match="data.disallowed_header_directives: 'NoAI'"):
        DataConfig(source=f"urls:{listing}", disallowed_header_directives=("NoAI",)).check()
