"""Which ldm_vae modules a module runs: the import walk behind the units' code hashes, the train
stage's run hash and (checked by a test) dvc.yaml's deps, so that no hand-kept list drifts."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent
# What a unit's code hash leaves out: modules whose edits change no output byte (the atomic
# write, the params' validation, the launcher, the engines that run the units: the same bytes on
# each, tested; the VAE's loading and location: encode's records carry the VAE's fingerprint).
SHAPES_NOTHING = frozenset({"files", "config", "launch", "export", "inputs", "units", "engine/__init__",
                            "engine/local", "engine/ray_cluster", "code_deps"})


def stage_code(entry: str) -> tuple[str, ...]:
    """The modules a stage's outputs depend on: ``entry`` (``"ingest/download"``) and every ldm_vae
    module it imports, directly or not (at any depth, also inside functions), less SHAPES_NOTHING
    and the packages' ``__init__``; sorted. Read from the sources, so no hand-kept list drifts."""
    return tuple(sorted(m for m in imported_closure(entry) if m not in SHAPES_NOTHING and not m.endswith("__init__")))


def imported_closure(entry: str, stop: frozenset = frozenset({"config"})) -> set[str]:
    """``entry`` and the ldm_vae modules it reaches by imports, as names relative to the package
    (``"ingest/download"``); the walk does not go through ``stop`` (config: it only validates)."""
    seen, todo = {entry}, [entry]
    while todo:
        for name in imported_modules(PACKAGE / f"{todo.pop()}.py") - seen:
            seen.add(name)
            if name not in stop:
                todo.append(name)
    return seen


def imported_modules(path: Path) -> set[str]:
    """The ldm_vae modules one source file imports (absolute or relative), as package-relative names."""
    try:
        where = list(path.resolve().relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    except ValueError:  # a script outside the package (stages/*.py): only absolute imports
        where = []
    dotted = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module.split(".") if node.module else []
            if node.level:
                base = where[: len(where) - node.level + 1] + base
            if base[:1] == ["ldm_vae"]:
                subs = [".".join(base + [a.name]) for a in node.names]  # `from .. import s3`: a module
                dotted.update(subs)
                if not all(_exists(d) for d in subs):  # names from the module (or package) itself
                    dotted.add(".".join(base))
        elif isinstance(node, ast.Import):
            dotted.update(a.name for a in node.names if a.name.startswith("ldm_vae."))
    found = set()
    for d in dotted:
        rel = "/".join(d.split(".")[1:])
        for name in (rel, f"{rel}/__init__" if rel else "__init__"):
            if (PACKAGE / f"{name}.py").is_file() and (PACKAGE / f"{name}.py") != path.resolve():
                found.add(name)
    return found


def _exists(dotted: str) -> bool:
    """'ldm_vae.s3' -> whether it is a module or package of ldm_vae."""
    rel = PACKAGE.joinpath(*dotted.split(".")[1:])
    return rel.with_suffix(".py").is_file() or (rel / "__init__.py").is_file()
