import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ldm_vae.config import ParamError, load_params, params_from_dict

from helpers.common import ROOT


def test_shipped_params_are_valid():
    p = load_params(ROOT / "params.yaml")
    assert p.data.source == "builtin"
    assert p.data.resolution % 8 == 0
    assert p.model.latent_channels == 4


@pytest.mark.parametrize(
    "raw, names",
    [
        ({"data": {"resolution": 60}}, ["data.resolution", "60", "multiple of 8"]),
        ({"model": {"latent_channels": 0}}, ["model.latent_channels", "0", ">= 1"]),
        ({"data": {"source": "ftp:/x"}}, ["data.source", "ftp", "builtin, folder, hf, urls"]),
        ({"data": {"sauce": "builtin"}}, ["data.sauce", "unknown key", "did you mean `source`?"]),
        ({"data": {"crop_per_image": 2}}, ["data.crop_per_image", "did you mean `crops_per_image`"]),
        ({"data": {"lr": 1e-4}}, ["data.lr", "did you mean `train.lr` or `probe.lr`?"]),
        ({"traim": {}}, ["traim", "unknown params section (did you mean `train`?)"]),
        ({"train": {"batch_size": "8"}}, ["train.batch_size", "'8'", "expected int"]),
        ({"train": {"max_steps": 1.5}}, ["train.max_steps", "expected int"]),
        ({"model": {"block_out_channels": [32, 64]}}, ["model.block_out_channels", "4 entries"]),
        ({"model": {"block_out_channels": [32, 48, 64, 64], "norm_num_groups": 32}}, ["norm_num_groups"]),
        ({"loss": {"rec_loss": "l3"}}, ["loss.rec_loss", "l3", "l1, l2, log_l2"]),
        ({"optim": {}}, ["optim", "unknown params section"]),
        ({"data": {"source": "folder:"}}, ["data.source", "needs a target"]),
        ({"data": {"source": "s3://"}}, ["data.source", "s3://BUCKET[/PREFIX]"]),
        ({"data": {"source": "s3://My_Bucket/x"}}, ["data.source", "'s3://My_Bucket/x'", "bucket names"]),
        ({"data": {"s3_endpoint": "http://key:secret@minio:9000"}}, ["data.s3_endpoint", "no credentials"]),
        ({"data": {"s3_endpoint": "minio:9000"}}, ["data.s3_endpoint", "an http(s) URL"]),
        ({"loss": {"disc_loss": "wgan"}}, ["loss.disc_loss", "wgan", "hinge, vanilla"]),
        ({"loss": {"perceptual_weight": -1}}, ["loss.perceptual_weight", ">= 0"]),
        ({"train": {"num_processes": "all"}}, ["train.num_processes", "'all'", "auto or a number"]),
        ({"train": {"grad_accum_steps": 0}}, ["train.grad_accum_steps", ">= 1"]),
        ({"model": {"reinit_latent_layers": "yes"}}, ["model.reinit_latent_layers", "expected bool"]),
        ({"loss": {"kl_weight": float("nan")}}, ["loss.kl_weight", "nan", "finite"]),
        ({"train": {"lr": float("inf")}}, ["train.lr", "inf", "finite"]),
        ({"data": {"read_timeout": "-inf"}}, ["data.read_timeout", "finite"]),
        ({"data": {"fetch_deadline": "nan"}}, ["data.fetch_deadline", "finite"]),
        ({"data": {"split": "train/../x"}}, ["data.split", "slicing syntax"]),
        ({"data": {"split": ""}}, ["data.split"]),
        ({"data": {"split": "a\x00b"}}, ["data.split"]),
        ({"probe": {"log_snrs": [0, 30]}}, ["probe.log_snrs", "30", "[-20, 20]"]),
        ({"probe": {"log_snrs": ["high"]}}, ["probe.log_snrs", "non-empty list of finite numbers"]),
        ({"probe": {"widths": []}}, ["probe.widths", "non-empty list of integers"]),
        ({"probe": {"steps": 0}}, ["probe.steps", ">= 1"]),
        ({"engine": {"kind": "slurm"}}, ["engine.kind", "slurm", "local, ray"]),
        ({"engine": {"max_retries": -1}}, ["engine.max_retries", ">= 0"]),
    ],
)
def test_bad_values_name_key_value_and_allowed(raw, names):
    with pytest.raises(ParamError) as e:
        params_from_dict(raw)
    for n in names:
        assert n in str(e.value)


def test_yaml_quirks_are_read_as_meant():
    p = params_from_dict(yaml.safe_load("loss: {kl_weight: 1e-6}\ntrain: {mixed_precision: no}"))
    assert p.loss.kl_weight == 1e-6
    assert p.train.mixed_precision == "no"
    for text in ("loss: {kl_weight: .nan}", "train: {lr: .inf}", "data: {read_timeout: -.inf}"):
        with pytest.raises(ParamError, match="finite"):
            params_from_dict(yaml.safe_load(text))


def test_stage_fails_fast_on_bad_params(tmp_path):
    """A wrong value stops the stage before torch is imported, with the key in the message."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"]["latent_channels"] = 0
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "stages/download.py"), "--params", str(bad), "--out", str(tmp_path / "raw")],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "model.latent_channels" in proc.stderr and ">= 1" in proc.stderr
    assert time.perf_counter() - t0 < 10
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize("channels", [4, 8, 16])
def test_presets_are_sd_kl_f8_at_256(channels):
    import dataclasses

    from ldm_vae.model import build_vae

    raw = yaml.safe_load((ROOT / "presets" / f"sd-kl-f8-256-c{channels}.yaml").read_text())
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in shipped.items():  # complete files: no key silently left at a default
        assert set(raw[section]) == set(values) == {f.name for f in dataclasses.fields(
            type(getattr(load_params(ROOT / "params.yaml"), section)))}, section
    p = load_params(ROOT / "presets" / f"sd-kl-f8-256-c{channels}.yaml")
    assert p.model.latent_channels == channels and p.data.resolution == 256
    assert p.model.block_out_channels == (128, 256, 512, 512) and p.model.layers_per_block == 2
    assert (p.loss.rec_loss, p.loss.kl_weight, p.loss.perceptual_weight, p.loss.disc_weight, p.loss.disc_start) == (
        "l1", 1e-6, 1.0, 0.5, 50001)
    assert p.train.mixed_precision == "bf16" and p.train.num_processes == "auto"
    vae = build_vae(p.model, p.data.resolution)
    assert 83.6e6 < sum(t.numel() for t in vae.parameters()) < 83.9e6  # SD's VAE: 83.65 M at 4 channels


def _ldm_vae_imports(path: Path) -> set[str]:
    """ldm_vae modules a file imports (absolute or relative, at any depth, also inside
    functions), as repository paths."""
    import ast

    rel = path.relative_to(ROOT).with_suffix("")
    package = list(rel.parts[:-1]) if rel.parts[-1] != "__init__" else list(rel.parts[:-1])
    dotted = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module.split(".") if node.module else []
            if node.level:
                base = package[: len(package) - node.level + 1] + base
            if base[:1] == ["ldm_vae"]:
                subs = [".".join(base + [a.name]) for a in node.names]  # `from . import x`: a module
                dotted.update(subs)
                if not all(_module_file(d) for d in subs):  # names of the module (or package) itself
                    dotted.add(".".join(base))
        elif isinstance(node, ast.Import):
            dotted.update(a.name for a in node.names if a.name.startswith("ldm_vae."))
    found = set()
    for d in dotted:
        candidate = _module_file(d)
        if candidate is not None and candidate != path:
            found.add(candidate.relative_to(ROOT).as_posix())
    return found


def _module_file(dotted: str) -> Path | None:
    for candidate in (ROOT / (dotted.replace(".", "/") + ".py"), ROOT / dotted.replace(".", "/") / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def test_every_stage_depends_on_exactly_the_code_it_runs():
    """A change to any module a stage imports (directly or not) re-runs that stage under dvc repro,
    and a change to any other module does not (an edit to the Ray engine never re-runs evaluate).
    config.py is left out on purpose: it only validates, and every stage would re-run on a new key;
    so is what config.py alone imports to validate (the bucket geometry, a dep of prepare)."""
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        script = f"stages/{name}.py"
        seen, todo = set(), [ROOT / script]
        while todo:
            for mod in _ldm_vae_imports(todo.pop()) - seen:
                seen.add(mod)
                if mod != "ldm_vae/config.py":
                    todo.append(ROOT / mod)
        listed = {d for d in stage["deps"] if d.startswith("ldm_vae/")}
        missing, extra = seen - {"ldm_vae/config.py"} - listed, listed - seen
        assert script in stage["deps"] and not missing, f"{name}: dvc.yaml deps lack {sorted(missing)}"
        assert not extra, f"{name}: dvc.yaml deps list {sorted(extra)}, which the stage never imports"


def test_checkpoint_tag_hashes_exactly_the_train_stage_code():
    """The tag that decides whether training resumes hashes the modules the train stage runs
    (dvc.yaml's deps): editing the downloader must not throw a run's checkpoints away."""
    import yaml

    from ldm_vae.train.training import train_code

    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["deps"]
    assert {f"ldm_vae/{m}.py" for m in train_code()} == {d for d in deps if d.startswith("ldm_vae/")}


@pytest.mark.parametrize("stage, module", [("download", "ingest/download"), ("prepare", "ingest/prepare"),
                                           ("encode", "encode/encoding")])
def test_a_units_done_record_hashes_the_code_that_writes_its_outputs(stage, module):
    """A finished unit is kept by a re-run only while the code that wrote it is unchanged: the
    unit's code hash covers every module the stage's work imports, except those that shape no
    output byte: the atomic write, the params, the launcher, the engines that run the units (the
    same bytes on each, tested), and the VAE loading and where it comes from (encode's records
    carry the VAE's own fingerprint)."""
    import yaml

    from ldm_vae.runner import stage_code

    code = stage_code(module)
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["deps"]
    shapes_nothing = ("files", "config", "launch", "export", "inputs", "units", "engine/__init__", "engine/local",
                      "engine/ray_cluster", "code_deps")
    expected = {d for d in deps if d.startswith("ldm_vae/")} - {f"ldm_vae/{m}.py" for m in shapes_nothing}
    assert {f"ldm_vae/{m}.py" for m in code} == expected


WINGS = ("ingest", "train", "encode", "evaluate")


def _floor(module: str) -> tuple[int, str]:
    """(level, wing) of a repository path: the ground floor 0, a stage's wing 1, the top 2."""
    parts = Path(module).relative_to("ldm_vae").parts
    if parts[0] in WINGS:
        return 1, parts[0]
    return (
        (2, "") if parts[0] in ("loader.py", "token_batches.py", "probe.py", "compare.py", "__init__.py") else (0, "")
    )


def test_the_layout_only_imports_downwards_and_has_no_circles():
    """Ground floor (config, shards, runner, images, model, ...) imports only the ground floor; a
    stage's wing imports the ground floor and itself, never another wing or the top (the loader);
    and no module reaches itself through its imports."""
    modules = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "ldm_vae").rglob("*.py"))
    graph = {m: _ldm_vae_imports(ROOT / m) - {"ldm_vae/__init__.py"} - {
        f"ldm_vae/{w}/__init__.py" for w in WINGS} for m in modules}
    for module, imported in graph.items():
        level, wing = _floor(module)
        for target in imported:
            t_level, t_wing = _floor(target)
            assert t_level < level or (t_level == level and t_wing == wing), f"{module} imports {target}"

    def reach(start):
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(graph.get(m, ()))
        return seen

    circles = [m for m in modules if m in reach(m)]
    assert not circles, f"import circles through {circles}"


def test_every_float_param_refuses_nan_and_inf():
    """NaN passes every < and > check: each float key must refuse it (and both infinities)."""
    import dataclasses
    import typing

    from ldm_vae.config import Params

    for section in dataclasses.fields(Params):
        cls = section.default_factory().__class__
        for key, hint in typing.get_type_hints(cls).items():
            if hint is not float:
                continue
            for bad in (float("nan"), float("inf"), float("-inf"), "nan", "1e999"):
                with pytest.raises(ParamError, match=f"{section.name}.{key}.*finite"):
                    params_from_dict({section.name: {key: bad}})


def test_one_set_of_defaults():
    """params.yaml writes out the dataclass defaults: a key deleted from it keeps its value."""
    import dataclasses

    from ldm_vae.config import Params

    shipped = load_params(ROOT / "params.yaml")
    assert dataclasses.asdict(shipped) == dataclasses.asdict(Params())
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in raw.items():
        for key in values:
            fewer = {s: {k: v for k, v in vals.items() if (s, k) != (section, key)} for s, vals in raw.items()}
            assert params_from_dict(fewer) == shipped, f"deleting {section}.{key} changed a value"


def test_split_names_datasets_accepts_are_accepted():
    for split in ("train", "validation", "train[:10%]", "train[100:200]+test", "train.clean.100"):
        assert params_from_dict({"data": {"split": split}}).data.split == split


def test_every_package_is_installed():
    """pyproject lists the packages explicitly: a new sub-package must be listed, or a plain
    (non-editable) install would leave it out."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {p.parent.relative_to(ROOT).as_posix().replace("/", ".") for p in (ROOT / "ldm_vae").rglob("__init__.py")}
    assert listed == found
