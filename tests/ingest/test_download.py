import os

from ldm_vae.config import DataConfig
from ldm_vae.ingest.download import raw_images, read_manifest, run_download
from ldm_vae.ingest.sources import BUILTIN_PHOTOS, builtin_files, folder_key, iter_builtin

from helpers.common import image_bytes, photo, rejections


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
    assert astronaut["shard"] == "shards/raw-u00000-00000.tar" and astronaut["member"] == "skimage-astronaut.png"
    path = next(f.path for f in builtin_files() if f.key == "skimage-astronaut")
    assert raw_images(tmp_path)["skimage-astronaut"] == open(path, "rb").read()  # the source's bytes


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
    rejected = rejections(out)
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


def test_folder_with_every_odd_mode_and_bad_case(tmp_path):
    import numpy as np
    from PIL import Image

    root = tmp_path / "odd"
    (root / "deep" / "er").mkdir(parents=True)
    rgba = photo(64, 64, seed=1).convert("RGBA")
    rgba.putalpha(0)  # fully transparent: must come out as the documented white background
    rgba.save(root / "rgba.png")
    photo(64, 64, seed=2).convert("L").save(root / "grey.png")
    photo(64, 64, seed=3).convert("LA").save(root / "grey_alpha.png")
    pal = photo(64, 64, seed=4).convert("P")
    pal.info["transparency"] = 0
    pal.save(root / "palette.png", transparency=0)
    photo(64, 64, seed=5).convert("CMYK").save(root / "deep" / "cmyk.jpg")
    Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16)).save(root / "deep" / "er" / "grey16.png")
    rotated = photo(96, 48, seed=6)
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(root / "rotated.jpg", exif=exif)
    (root / "upper.JPEG").write_bytes(image_bytes(photo(64, 64, seed=7), "JPEG"))
    # Rejections: a bomb above the pixel cap, a truncated file, text, a tiny image, a duplicate,
    # an empty file, and a link to a photo outside the folder.
    Image.new("RGB", (4000, 4000)).save(root / "bomb.png")
    whole = image_bytes(photo(120, 100, seed=8), "PNG")
    (root / "cut.png").write_bytes(whole[:-300])
    (root / "text.jpg").write_text("hello")
    photo(20, 20).save(root / "tiny.png")
    (root / "deep" / "again.png").write_bytes((root / "grey.png").read_bytes())
    (root / "empty.webp").write_bytes(b"")
    photo(seed=9).save(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", root / "deep" / "link.png")

    out = tmp_path / "raw"
    summary = run_download(DataConfig(source=f"folder:{root}", min_size=32, max_pixels=4_000_000), out)
    rows = {r["key"]: r for r in read_manifest(out)}
    assert set(rows) == {"rgba", "grey", "grey_alpha", "palette", "deep_cmyk", "deep_er_grey16", "rotated", "upper"}
    assert (rows["rotated"]["width"], rows["rotated"]["height"]) == (48, 96)  # EXIF applied
    assert rejections(out) == {
        "bomb": "too_many_pixels", "cut": "truncated", "text": "not_an_image", "tiny": "too_small",
        "deep_again": "duplicate", "empty": "empty", "deep_link": "link_outside_folder",
    }
    assert summary["kept"] == 8 and summary["reasons"]["duplicate"] == 1
    # Every kept file is the source's bytes; prepare's decoder turns each into RGB.
    from ldm_vae.images import load_rgb

    kept = raw_images(out)
    assert kept["deep_cmyk"] == (root / "deep" / "cmyk.jpg").read_bytes()
    white = np.asarray(load_rgb(kept["rgba"], 10**7))
    assert white.shape == (64, 64, 3) and (white == 255).all()
    grey16 = np.asarray(load_rgb(kept["deep_er_grey16"], 10**7))
    assert grey16.shape == (64, 64, 3) and abs(int(grey16[0, 0, 0]) - 40000 // 257) <= 1
