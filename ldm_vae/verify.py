"""Find damaged outputs: every file the pipeline's stages wrote, checked against ``dvc.lock``, and
every shard's tar headers walked.

    python -m ldm_vae.verify            # the whole pipeline, from the repository root
    python -m ldm_vae.verify data/latents --jobs 4

Why DVC alone does not find it: the outputs are hard links into the DVC cache (docs/scale.md: storage),
so a file changed in place (root ignores the read-only bit; a copy that stopped half-way) changes
the cache object with it. ``dvc status`` trusts a file whose size and mtime it has seen, and
``dvc checkout --relink`` links the damaged cache object straight back. Here every byte is hashed
again and compared with the md5 that dvc.lock recorded when the stage ran.

For each damaged file it prints what is wrong and how to get it back: from an intact cache copy
(``dvc checkout``), from a DVC remote (``dvc pull``), or by running its stage again
(``dvc repro -f -s``). The damaged cache object is removed first in the last two: DVC would
otherwise link it back. Exit status 1 when something is damaged. It never changes a file.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from .files import md5_of
from .runner import RECORDS
from .shards import tar_members


@dataclass
class Expected:
    """One file a stage's output holds, as dvc.lock recorded it."""
    path: Path  # relative to the repository root
    md5: str
    stage: str
    out: str  # the output (file or folder) in dvc.lock that holds it
    size: int | None = None


@dataclass
class Damage:
    file: Expected
    what: str
    cache_object: Path | None = None  # the cache's copy of the expected bytes, when it exists
    cache_ok: bool = False  # that copy is intact (not the damaged file's own inode)


def cache_object(cache: Path, md5: str) -> Path:
    """Where DVC 3 keeps an object: ``<cache>/ab/cdef...`` (``.dir`` for a folder's list), ``cache``
    being DVC's md5 cache folder (``.dvc/cache/files/md5``)."""
    return cache / md5[:2] / md5[2:]


def expected_files(lock: dict, root: Path, cache: Path, only: list[Path]) -> tuple[list[Expected], list[str]]:
    """Every file of every stage output in dvc.lock, limited to ``only`` (paths or folders; empty:
    all). Also the problems of folders that cannot be checked file by file."""
    files, problems = [], []
    for stage, entry in (lock.get("stages") or {}).items():
        for out in entry.get("outs") or []:
            path, md5 = Path(out["path"]), out.get("md5")
            if not md5 or (only and not any(_within(path, o) or _within(o, path) for o in only)):
                continue
            if md5.endswith(".dir"):
                listed, problem = _folder(root, path, md5, stage, cache)
                files += listed
                problems += [problem] if problem else []
            else:
                files.append(Expected(path, md5, stage, out["path"], out.get("size")))
    if only:
        files = [f for f in files if any(_within(f.path, o) for o in only)]
    return files, problems


def _folder(root: Path, path: Path, md5: str, stage: str, cache: Path) -> tuple[list[Expected], str | None]:
    """A folder output's files: from its list in the cache (``<md5>.dir``, itself checked), or,
    where the cache has none (``cache: false`` outputs, a clone never pulled), from the folder
    itself when its files hash to the folder's md5 the way DVC hashes a folder."""
    listing = cache_object(cache, md5)
    if listing.is_file() and md5_of(listing) == md5[:-4]:
        items = json.loads(listing.read_text())
    else:
        items = sorted(({"md5": md5_of(p), "relpath": p.relative_to(root / path).as_posix()}
                        for p in (root / path).rglob("*") if p.is_file() and RECORDS not in p.parts),
                       key=lambda item: item["relpath"])
        if hashlib.md5(json.dumps(items, sort_keys=True).encode()).hexdigest() != md5[:-4]:
            return [], (f"{path}: differs from dvc.lock, and the cache has no list of its files to tell which "
                        f"(`dvc checkout -f {path}`, `dvc pull -f {path}` or `dvc repro -f -s {stage}`)")
    return [Expected(path / item["relpath"], item["md5"], stage, str(path)) for item in items], None


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check(file: Expected, root: Path, cache: Path) -> Damage | None:
    """What is wrong with one file (None: it is as dvc.lock says), and the state of its cache copy."""
    path = root / file.path
    what = None
    if not path.is_file():
        what = "missing"
    elif file.size is not None and path.stat().st_size != file.size:
        what = f"{path.stat().st_size} bytes, dvc.lock says {file.size}"
    elif (digest := md5_of(path)) != file.md5:
        what = f"content differs from dvc.lock (md5 {digest}, recorded {file.md5})"
        if path.suffix == ".tar" and (tar := _tar_problem(path)):
            what += f"; {tar}"
    elif path.suffix == ".tar":
        what = _tar_problem(path)
    if what is None:
        return None
    obj = cache_object(cache, file.md5)
    if not obj.is_file():
        return Damage(file, what)
    same = path.exists() and os.path.samefile(obj, path)
    return Damage(file, what, obj, cache_ok=not same and md5_of(obj) == file.md5)


def _tar_problem(path: Path) -> str | None:
    """A shard whose bytes are what dvc.lock recorded still gets its headers walked: a shard that
    was bad when written (or dvc.lock written over a damaged one) shows here."""
    try:
        with open(path, "rb") as f:
            for _ in tar_members(f, read_data=False):
                pass
    except ValueError as e:
        return f"not a readable tar: {e}"
    return None


def remedies(damaged: list[Damage], remotes: bool, in_git: set[Path] = frozenset()) -> list[str]:
    """Shell lines that bring every damaged file back, in order (stages in dvc.lock's order, which
    is the pipeline's). ``in_git``: damaged files git tracks (``cache: false`` outputs, which the
    DVC cache and remotes never hold)."""
    lines, stages, pulls, checkouts = [], [], [], []
    for d in damaged:
        if d.cache_ok:
            checkouts.append(d.file.out)
            continue
        if d.cache_object is None and d.file.path in in_git:
            lines.append(f"git checkout -- {d.file.path}")
            continue
        if d.cache_object is not None:  # the damaged bytes under the right name: DVC would link it back
            lines.append(f"rm -f {d.cache_object}")
        if d.what != "missing":
            lines.append(f"rm -f {d.file.path}")
        (pulls if remotes else stages).append(d.file.out if remotes else d.file.stage)
    lines += [f"dvc checkout -f {out}" for out in dict.fromkeys(checkouts)]
    lines += [f"dvc pull -f {out}" for out in dict.fromkeys(pulls)]
    lines += [f"dvc repro -f -s {stage}" for stage in dict.fromkeys(stages)]
    if stages:
        lines.append("dvc repro   # then the stages downstream, if their inputs came out different")
    return lines


def dvc_settings(root: Path) -> tuple[Path, bool]:
    """(DVC's md5 cache folder, whether a remote is configured) of the repository at ``root``."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return Path(repo.cache.local.path), bool(repo.config.get("remote"))


def verify(root: Path, only: list[Path], jobs: int, cache: Path,
           progress: bool = True) -> tuple[list[Damage], list[str], int]:
    """(damaged files, problems, files checked) of the repository at ``root`` (which has a dvc.lock)."""
    lock = yaml.safe_load((root / "dvc.lock").read_text()) or {}
    files, problems = expected_files(lock, root, cache, only)
    sizes = {f.path: _size(root / f.path) for f in files}
    damaged = []
    from tqdm import tqdm

    with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="verify", disable=not progress,
              dynamic_ncols=True) as bar, cf.ThreadPoolExecutor(jobs) as pool:  # hashlib lets go of the GIL
        futures = {pool.submit(check, f, root, cache): f for f in files}
        for future in cf.as_completed(futures):
            if (d := future.result()) is not None:
                damaged.append(d)
            bar.update(sizes[futures[future].path])
    order = {name: i for i, name in enumerate(lock.get("stages") or {})}
    damaged.sort(key=lambda d: (order.get(d.file.stage, 0), str(d.file.path)))
    return damaged, problems, len(files)


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def _in_git(root: Path, paths: list[Path]) -> set[Path]:
    import subprocess

    proc = subprocess.run(["git", "ls-files", "-z", "--", *map(str, paths)], cwd=root, capture_output=True, text=True)
    return {Path(p) for p in proc.stdout.split("\0") if p} if proc.returncode == 0 else set()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", type=Path, help="outputs or folders to check (default: every output)")
    ap.add_argument("--root", type=Path, default=Path("."), help="the repository (default: here)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="files hashed at once")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    only = [Path(os.path.relpath(p.resolve(), root)) for p in args.paths]
    if not (root / "dvc.lock").is_file():
        print(f"verify: {root / 'dvc.lock'}: no dvc.lock: nothing has run here yet (`dvc repro`, or `dvc pull` a run)")
        return 1
    cache, has_remote = dvc_settings(root)
    damaged, problems, checked = verify(root, only, max(1, args.jobs), cache, progress=sys.stderr.isatty())
    for p in problems:
        print(f"cannot check: {p}")
    for d in damaged:
        print(f"DAMAGED {d.file.path} ({d.file.stage}): {d.what}")
    if damaged:
        print("\nTo get them back (from the repository root):")
        lines = remedies(damaged, has_remote, _in_git(root, [d.file.path for d in damaged]))
        print("\n".join(f"  {line}" for line in lines))
    print(f"verify: {checked} files checked against dvc.lock, {len(damaged)} damaged"
          + (f", {len(problems)} outputs not checkable" if problems else ""))
    return 1 if damaged or problems else 0


if __name__ == "__main__":
    sys.exit(main())
