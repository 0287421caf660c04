import pytest

from ldm_vae.config import DataConfig
from ldm_vae.ingest.download import raw_images, read_manifest, run_download
from ldm_vae.ingest.prepare import run_prepare
from ldm_vae.shards import iter_samples, shard_paths

from helpers.common import image_bytes, photo, rejections

datasets = pytest.importorskip("datasets")

NAMES = ["cat", "dog", "fox"]


def make_dataset():
    whole = image_bytes(photo(120, 100, seed=40), "JPEG")
    cells = [{"bytes": image_bytes(photo(64 + i, 48, seed=i)), "path": None} for i in range(5)]
    cells += [
        {"bytes": whole[: len(whole) // 2], "path": None},  # truncated
        None,  # no image at all
        {"bytes": image_bytes(photo(8, 8)), "path": None},  # too small
        {"bytes": cells[0]["bytes"], "path": None},  # same bytes as row 0
    ]
    features = datasets.Features({
        "image": datasets.Image(),
        "text": datasets.Value("string"),
        "label": datasets.ClassLabel(names=NAMES),
    })
    return datasets.Dataset.from_dict(
        {"image": cells, "text": [f"photo number {i}" for i in range(len(cells))],
         "label": [i % 3 for i in range(len(cells))]},
        features=features,
    )


EXPECTED_KEPT = [f"train-{i:08d}" for i in range(5)]
EXPECTED_REJECTED = {"train-00000005": "truncated", "train-00000006": "missing_image",
                     "train-00000007": "too_small", "train-00000008": "duplicate"}


def cfg_for(target, **kw):
    return DataConfig(source=f"hf:{target}", caption_column="text", label_column="label",
                      crops_per_image=1, val_crops_per_image=1, val_fraction=0.2, resolution=32, **kw)


@pytest.mark.slow
def test_local_parquet_with_captions_and_labels_down_to_the_shards(tmp_path):
    make_dataset().to_parquet(str(tmp_path / "set.parquet"))
    cfg = cfg_for(tmp_path / "set.parquet")
    raw = tmp_path / "raw"
    summary = run_download(cfg, raw)
    rows = read_manifest(raw)
    assert [r["key"] for r in rows] == EXPECTED_KEPT
    assert rejections(raw) == EXPECTED_REJECTED
    assert summary["kept"] == 5 and summary["reasons"] == {"duplicate": 1, "missing_image": 1, "too_small": 1,
                                                             "truncated": 1}
    assert rows[2]["caption"] == "photo number 2" and rows[2]["label"] == 2
    assert (rows[1]["width"], rows[1]["height"]) == (65, 48)
    # The bytes kept are the dataset's own, not a re-encode.
    assert raw_images(raw)[rows[0]["key"]] == image_bytes(photo(64, 48, seed=0))

    run_prepare(cfg, raw, tmp_path / "prepared")
    samples = list(iter_samples(shard_paths(tmp_path / "prepared/train") + shard_paths(tmp_path / "prepared/val")))
    assert sorted(s["__key__"] for s in samples) == EXPECTED_KEPT
    for s in samples:
        i = int(s["__key__"].split("-")[1])
        assert s["txt"].decode() == f"photo number {i}" and int(s["cls"]) == i % 3


@pytest.mark.slow
def test_save_to_disk_folder_split_and_max_images(tmp_path):
    datasets.DatasetDict({"train": make_dataset(), "test": make_dataset().select(range(2))}).save_to_disk(
        str(tmp_path / "dd"))
    raw = tmp_path / "raw"
    run_download(cfg_for(tmp_path / "dd", split="test"), raw)
    assert [r["key"] for r in read_manifest(raw)] == ["test-00000000", "test-00000001"]
    run_download(cfg_for(tmp_path / "dd", max_images=3), raw)
    assert [r["key"] for r in read_manifest(raw)] == EXPECTED_KEPT[:3]
    with pytest.raises(ValueError, match="data.split: 'validation'.*train, test"):
        run_download(cfg_for(tmp_path / "dd", split="validation"), raw)


def test_imagefolder_with_class_folders(tmp_path):
    for i, name in enumerate(["cat", "cat", "dog"]):
        (tmp_path / "imgs" / name).mkdir(parents=True, exist_ok=True)
        photo(seed=i).save(tmp_path / "imgs" / name / f"{i}.png")
    raw = tmp_path / "raw"
    run_download(DataConfig(source=f"hf:{tmp_path / 'imgs'}", label_column="label"), raw)
    rows = read_manifest(raw)
    assert len(rows) == 3 and sorted(r["label"] for r in rows) == [0, 0, 1]


def test_unknown_column_is_named(tmp_path):
    make_dataset().to_parquet(str(tmp_path / "set.parquet"))
    with pytest.raises(ValueError, match="data.caption_column: 'caption'.*image, text, label"):
        run_download(DataConfig(source=f"hf:{tmp_path / 'set.parquet'}", caption_column="caption"), tmp_path / "raw")
