import json
import os

from conftest import image_bytes, photo
from ldm_vae.config import DataConfig
from ldm_vae.download import read_manifest, run_download
from ldm_vae.sources import BUILTIN_PHOTOS, folder_key, iter_builtin


def test_builtin_photographs_are_found_on_disk():
    items = list(iter_builtin())
    assert [i.key for i in items] == [k for _, _, k in BUILTIN_PHOTOS]
    assert all(i.error is None and len(i.data) > 10_000 for i in items)


def test_builtin_download_keeps_every_photograph(tmp_path):
    summary = run_download(DataConfig(), tmp_path)
    rows = read_manifest(tmp_path)
    assert summary == {"kept": len(BUILTIN_PHOTOS), "rejected": 0, "reasons": {}}
    assert {r["key"] for r in rows} == {k for _, _, k in BUILTIN_PHOTOS}
    astronaut = next(r for r in rows if r["key"] == "skimage-astronaut")
    assert (astronaut["width"], astronaut["height"]) == (512, 512)
    assert astronaut["source"] == "skimage/data/astronaut.png"
    assert (tmp_path / astronaut["file"]).stat().st_size > 0


def test_folder_source_good_bad_duplicate_and_escaping_link(tmp_path, photo_folder):
    (photo_folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (photo_folder / "notes.txt").write_text("not an image extension: ignored, not rejected")
    (photo_folder / "tiny.png").write_bytes(image_bytes(photo(16, 16)))
    (photo_folder / "sub" / "copy.png").write_bytes((photo_folder / "img0.jpg").read_bytes())
    truncated = image_bytes(photo(120, 100, seed=99), "JPEG")
    (photo_folder / "cut.jpg").write_bytes(truncated[: len(truncated) // 2])
    outside = tmp_path / "outside.png"
    photo(seed=50).save(outside)
    os.symlink(outside, photo_folder / "escape.png")

    out = tmp_path / "raw"
    summary = run_download(DataConfig(source=f"folder:{photo_folder}", min_size=32), out)

    kept = {r["key"] for r in read_manifest(out)}
    assert kept == {"img0", "img2", "img4", "img6", "sub_img1", "sub_img3", "sub_img5", "sub_img7"}
    rejected = {r["key"]: r["reason"] for r in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())}
    assert rejected == {
        "broken": "not_an_image",
        "cut": "truncated",
        "escape": "link_outside_folder",
        "sub_copy": "duplicate",
        "tiny": "too_small",
    }
    assert summary["kept"] == 8 and summary["rejected"] == 5
    assert not list(out.glob("**/*.tmp"))


def test_folder_keys_are_safe_and_unique():
    assert folder_key("cats/Tabby 01.v2.jpg") == "cats_Tabby_01_v2"
    assert folder_key("../..//x.png") == "x"
