"""The inputs that params name and DVC cannot see: the VAEs of ``model.init_from`` and
``evaluate.references``, local folders or hub ids.

DVC tracks a param by its value, so weights overwritten inside the same folder, or a hub id whose
main branch moved, would change nothing it compares. The ``inputs`` stage (always run: it has no
torch and takes well under a second) writes what each input *is*: a local folder's files with
their md5s, a hub id's commit. It rewrites those files with the same bytes when nothing changed,
so ``train`` (which depends on ``init_from.json``) and ``evaluate`` (``references.json``) re-run
exactly when their input did, and nothing else does. The stages then load a hub id at the commit
recorded here, never a newer one (docs/training.md: Inputs DVC cannot see).

A location is ``folder``, ``org/name``, ``org/name/subfolder``, each optionally ``@revision``
(a branch, a tag or a commit) for a hub id.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import NamedTuple

from .config import ParamError, Params, reference_name
from .files import atomic_write, md5_of

INIT_FROM_FILE, REFERENCES_FILE = "init_from.json", "references.json"
_COMMIT = re.compile(r"[0-9a-f]{40}")


class Location(NamedTuple):
    """Where a diffusers VAE lives: a local folder or hub repo, its sub-folder, a hub revision."""
    path: str
    subfolder: str | None = None
    revision: str | None = None

    @property
    def local(self) -> bool:
        return Path(self.path).is_dir()


def pretrained_location(location: str, key: str = "model.init_from") -> Location:
    """A local folder holding config.json or vae/config.json, else a hub id whose path past
    ``org/name`` is the sub-folder, with an optional ``@revision``."""
    path = Path(location).expanduser()
    if path.is_dir():
        if (path / "config.json").exists():
            return Location(str(path))
        if (path / "vae" / "config.json").exists():
            return Location(str(path), "vae")
        raise ParamError(f"{key}: {location!r}: a folder without config.json or vae/config.json "
                         "(expected a diffusers AutoencoderKL saved with save_pretrained)")
    name, _, revision = location.partition("@")
    parts = name.strip("/").split("/")
    if len(parts) < 2 or path.is_absolute() or location.startswith(".") or (_ and not revision):
        raise ParamError(f"{key}: {location!r}: no such folder, and not a hub id (org/name[/subfolder][@revision])")
    return Location("/".join(parts[:2]), "/".join(parts[2:]) or None, revision or None)


def fingerprint(location: str, key: str) -> dict:
    """What the input is: {"location", "files": {relpath: md5}} for a folder (its VAE's files
    only), {"location", "revision": commit or None} for a hub id (None: offline, not cached)."""
    where = pretrained_location(location, key)
    if where.local:
        root = Path(where.path) / (where.subfolder or "")
        files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
        return {"location": location, "files": {p.relative_to(root).as_posix(): md5_of(p) for p in files}}
    return {"location": location, "revision": hub_commit(where.path, where.revision)}


def hub_commit(repo: str, revision: str | None) -> str | None:
    """The commit a hub repo's revision (default: main) points at: asked of the hub when online,
    else read from the local hub cache; None when neither knows."""
    if revision and _COMMIT.fullmatch(revision):
        return revision
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        try:
            from huggingface_hub import HfApi

            return HfApi().model_info(repo, revision=revision, timeout=10).sha
        except Exception:  # no network, no such repo, gated: the cache may still know
            pass
    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "refs" / (revision or "main")
    return ref.read_text().strip() if ref.is_file() else None


def write_inputs(params: Params, out: Path) -> dict:
    """``out``/init_from.json and references.json; returns {file name: content}."""
    init = params.model.init_from
    contents = {
        INIT_FROM_FILE: {"init_from": fingerprint(init, "model.init_from") if init else None},
        REFERENCES_FILE: {reference_name(r): fingerprint(r, "evaluate.references") for r in params.evaluate.references},
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, content in contents.items():
        atomic_write(out / name, json.dumps(content, indent=2, sort_keys=True) + "\n")
    return contents


def pinned(location: str, record: dict | None) -> str:
    """``location`` at the commit the inputs stage recorded for it (a hub id), else unchanged."""
    if not record or record.get("location") != location or not record.get("revision"):
        return location
    return f"{location.partition('@')[0]}@{record['revision']}"


def pinned_init_from(params: Params, folder: Path | None) -> Params:
    """``params`` with ``model.init_from`` at the commit the inputs stage in ``folder`` recorded."""
    record = _read(folder, INIT_FROM_FILE).get("init_from")
    init = pinned(params.model.init_from, record)
    return params if init == params.model.init_from else dataclasses.replace(
        params, model=dataclasses.replace(params.model, init_from=init))


def pinned_references(references: tuple[str, ...], folder: Path | None) -> tuple[str, ...]:
    records = _read(folder, REFERENCES_FILE)
    return tuple(pinned(r, records.get(reference_name(r))) for r in references)


def _read(folder: Path | None, name: str) -> dict:
    """An inputs file ({} without one: a stage run by hand, without the inputs stage)."""
    path = Path(folder or "") / name
    return json.loads(path.read_text()) if folder is not None and path.is_file() else {}


def loading_kwargs(where: Location) -> dict:
    """from_pretrained / load_config keywords for a location."""
    kwargs = {"subfolder": where.subfolder}
    if where.revision:
        kwargs["revision"] = where.revision
    return kwargs

