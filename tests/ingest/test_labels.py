"""Class labels from the layout (data.labels): an ImageNet-like tree gets torchvision ImageFolder's
indices, through raw, prepared and latent shards to the loader; a flat folder with ImageNet's
LOC_val_solution.csv gets the same classes; a class added later never renumbers the old ones; a
bucket gives what the folder gives."""

import json
import os

import pytest

from ldm_vae.config import ParamError
from ldm_vae.encode.encoding import run_encode
from ldm_vae.export import load_vae
from ldm_vae.ingest.download import read_manifest, run_download
from ldm_vae.ingest.prepare import run_prepare
from ldm_vae.loader import latent_loader
from ldm_vae.samples import LATENT, PREPARED
from ldm_vae.shards import iter_samples, shard_paths

from helpers.common import CLASSES, image_bytes, imagenet_tree, make_params, photo


def image_folder_labels(root) -> dict[str, int]:
    """torchvision.datasets.ImageFolder's rule (find_classes), written out: classes are the sorted
    sub-folder names, a file's label its class's index in that order. Relative path -> label."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    return {f"{c}/{name}": i for i, c in enumerate(classes) for name in sorted(os.listdir(root / c))}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, pipeline_dir):
    """An ImageNet-like tree (plus one stray file at its top) through download, prepare, encode."""
    base = tmp_path_factory.mktemp("labels")
    tree = imagenet_tree(base / "train")
    (tree / "stray.png").write_bytes(image_bytes(photo(50, 40, seed=99)))
    params = make_params(data={"source": f"folder:{tree}", "labels": "folder"})
    summary = run_download(params.data, base / "raw")
    run_prepare(params.data, base / "raw", base / "prepared")
    stats = run_encode(load_vae(pipeline_dir / "vae"), base / "prepared", base / "latents", params.encode)
    return base, tree, summary, stats


def test_folder_labels_are_image_folders_indices_and_travel_to_the_loader(labelled):
    base, tree, summary, stats = labelled
    want = image_folder_labels(tree)
    rows = read_manifest(base / "raw")
    assert {r["source"]: r["label"] for r in rows} == want  # every image, ImageFolder's index
    assert summary["reasons"] == {"no_class_folder": 1}  # stray.png: a reason, not a silent label
    rejected = json.loads((base / "raw" / "rejected.jsonl").read_text())
    assert rejected["source"] == "stray.png" and "first folder" in rejected["detail"]
    for stage in ("raw", "prepared", "latents"):
        assert json.loads((base / stage / "classes.json").read_text()) == sorted(CLASSES)
    label_of = {r["key"]: r["label"] for r in rows}
    latent_label = {}
    for split in ("train", "val"):  # prepared crops and latents carry the label of their photograph
        for s in iter_samples(shard_paths(base / "prepared" / split)):
            assert PREPARED.get(s, "label") == label_of[PREPARED.get(s, "meta")["raw_key"]]
        per_class = {}
        for s in iter_samples(shard_paths(base / "latents" / split)):
            label = latent_label[s["__key__"]] = LATENT.get(s, "label")
            assert label == label_of[LATENT.get(s, "meta")["raw_key"]]
            per_class[str(label)] = per_class.get(str(label), 0) + 1
        assert stats["splits"][split]["labels"] == dict(sorted(per_class.items()))
    assert stats["num_classes"] == 4
    loader = latent_loader(str(base / "latents" / "train" / "*.tar"), stats=base / "latents" / "stats.json",
                           batch_size=2, num_workers=0)
    got = {key: label for batch in loader for key, label in zip(batch["key"], batch["label"].tolist())}
    assert got and got == {k: v for k, v in latent_label.items() if k in got}
    assert set(got.values()) == set(range(4))


def test_a_class_added_later_keeps_the_old_indices(tmp_path, capsys):
    tree = imagenet_tree(tmp_path / "train", CLASSES[:2])
    params = make_params(data={"source": f"folder:{tree}", "labels": "folder"})
    run_download(params.data, tmp_path / "raw")
    before = {r["source"]: r["label"] for r in read_manifest(tmp_path / "raw")}
    assert set(before.values()) == {0, 1} and before == image_folder_labels(tree)
    imagenet_tree(tree, ["n00000001", "n09999999"], seed=50)  # one sorts before every old class
    run_download(params.data, tmp_path / "raw")
    after = {r["source"]: r["label"] for r in read_manifest(tmp_path / "raw")}
    assert {k: after[k] for k in before} == before  # not silently renumbered
    assert json.loads((tmp_path / "raw" / "classes.json").read_text()) == \
        ["n01440764", "n02085620", "n00000001", "n09999999"]
    out = capsys.readouterr().out
    assert "2 new class(es) appended" in out and "differ from ImageFolder's sorted order" in out


def test_a_flat_validation_folder_takes_its_classes_from_loc_val_solution(tmp_path):
    flat = tmp_path / "val"
    flat.mkdir()
    truth = {}
    for i, wnid in enumerate(CLASSES * 2):
        name = f"ILSVRC2012_val_{i + 1:08d}"
        (flat / f"{name}.JPEG").write_bytes(image_bytes(photo(44, 40, seed=200 + i), "JPEG"))
        truth[name] = wnid
    (flat / "ILSVRC2012_val_00000099.JPEG").write_bytes(image_bytes(photo(44, 40, seed=300), "JPEG"))  # unlisted
    solution = tmp_path / "LOC_val_solution.csv"  # Kaggle's: the class is the first word of the boxes
    solution.write_text("ImageId,PredictionString\n" + "".join(
        f"{name},{wnid} 10 20 30 40 {wnid} 1 2 3 4 \n" for name, wnid in reversed(truth.items())))
    params = make_params(data={"source": f"folder:{flat}", "labels": "file", "label_file": str(solution)})
    summary = run_download(params.data, tmp_path / "raw")
    names = json.loads((tmp_path / "raw" / "classes.json").read_text())
    assert names == sorted(CLASSES)  # what the train tree's folders give: the same indices
    got = {r["key"]: names[r["label"]] for r in read_manifest(tmp_path / "raw")}
    assert got == truth
    assert summary["reasons"] == {"no_label": 1}


def test_label_params_fail_at_once_naming_the_key(tmp_path):
    devkit = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    devkit.write_text("490\n361\n171\n")
    cases = [({"labels": "folder"}, "data.labels"),  # builtin: no layout
             ({"source": "urls:x.csv", "labels": "folder"}, "data.labels"),
             ({"source": f"folder:{tmp_path}", "labels": "file"}, "data.label_file"),
             ({"source": f"folder:{tmp_path}", "label_file": str(devkit)}, "data.label_file"),
             ({"source": "s3://bucket/val", "labels": "file", "label_file": str(devkit)}, "data.labels"),
             ({"source": f"folder:{tmp_path}", "labels": "file", "label_file": str(tmp_path / "none.csv")},
              "data.label_file"),
             ({"source": f"folder:{tmp_path}", "labels": "classes"}, "data.labels")]
    for data, key in cases:
        with pytest.raises(ParamError, match=key):
            make_params(data=data)
    params = make_params(data={"source": f"folder:{tmp_path}", "labels": "file", "label_file": str(devkit)})
    with pytest.raises(ValueError, match="meta.mat"):
        run_download(params.data, tmp_path / "raw")


def test_a_bucket_of_class_folders_gives_the_folders_labels(s3_env, s3_server, tmp_path):
    tree = imagenet_tree(tmp_path / "train")
    (tree / "stray.png").write_bytes(image_bytes(photo(50, 40, seed=99)))
    s3_server.upload(tree, "s3://photos/imagenet/train")
    rows = {}
    for name, source in (("folder", f"folder:{tree}"), ("s3", "s3://photos/imagenet/train")):
        params = make_params(data={"source": source, "labels": "folder", "unit_images": 5})
        assert run_download(params.data, tmp_path / name)["reasons"] == {"no_class_folder": 1}
        rows[name] = {r["key"]: r["label"] for r in read_manifest(tmp_path / name)}
        assert json.loads((tmp_path / name / "classes.json").read_text()) == sorted(CLASSES)
    assert rows["s3"] == rows["folder"] and len(rows["s3"]) == 12
