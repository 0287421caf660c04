"""The download stage's work: take every item of a source, keep the good ones, record the rest.

Output (the raw-manifest contract of DESIGN.md):
  <out>/images/<key><ext>   the source bytes, unchanged (sha256 in the manifest is of these)
  <out>/manifest.jsonl      one line per kept image: key, sha256, width, height, source (+caption/label)
  <out>/rejected.jsonl      one line per rejected input: key, source, reason, detail
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from pathlib import Path

from tqdm import tqdm

from .config import DataConfig
from .images import ImageRejected, image_ext, load_rgb
from .sources import iter_source


def run_download(cfg: DataConfig, out: Path) -> dict:
    """Fill ``out``; return a summary {kept, rejected, reasons}. One bad item never stops it.

    ``out`` may hold a previous, interrupted run's files (the stage output persists): an image
    already written under its key is not fetched again, and files no longer in the manifest are
    removed at the end, so ``out`` always holds exactly what the manifest lists.
    """
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for tmp in images.glob("*.tmp"):
        tmp.unlink()  # a write a kill interrupted: never taken for a finished file
    existing = {p.stem: p for p in images.iterdir() if p.is_file()}
    kept: list[dict] = []
    rejected: list[dict] = []
    by_sha: dict[str, str] = {}
    bar = tqdm(iter_source(cfg, existing.get), desc=f"download {cfg.source_kind}", unit="img",
               dynamic_ncols=True, mininterval=1.0)
    for n, item in enumerate(bar):
        if cfg.max_images and n >= cfg.max_images:
            break
        row = _keep(cfg, item, images, existing, by_sha)
        if "reason" in row:
            rejected.append(row)
        else:
            kept.append(row)
        bar.set_postfix(kept=len(kept), rejected=len(rejected), refresh=False)
    bar.close()
    wanted = {r["file"] for r in kept}
    for path in images.iterdir():
        if f"images/{path.name}" not in wanted:
            path.unlink()  # an earlier run's file whose item is gone or now rejected
    _write_jsonl(out / "manifest.jsonl", kept)
    _write_jsonl(out / "rejected.jsonl", rejected)
    reasons = collections.Counter(r["reason"] for r in rejected)
    return {"kept": len(kept), "rejected": len(rejected), "reasons": dict(sorted(reasons.items()))}


def _keep(cfg: DataConfig, item, images: Path, existing: dict[str, Path], by_sha: dict[str, str]) -> dict:
    """The manifest row of ``item``, written to ``images``; or its rejection row."""
    if item.error:
        reason, _, detail = item.error.partition(": ")
        return _rejection(item, reason, detail)
    sha = hashlib.sha256(item.data).hexdigest()
    if sha in by_sha:
        return _rejection(item, "duplicate", f"same bytes as {by_sha[sha]}")
    try:
        img = load_rgb(item.data, cfg.max_pixels, cfg.min_size)
    except ImageRejected as e:
        return _rejection(item, e.reason, e.detail)
    by_sha[sha] = item.key
    path = images / f"{item.key}{image_ext(item.data)}"
    old = existing.get(item.key)
    # Rewrite unless the file under this name already holds these bytes (bytes read back from it
    # by a resumed source are not compared with themselves).
    if old != path or (item.kept_file != path and (path.stat().st_size != len(item.data)
                                                   or path.read_bytes() != item.data)):
        _write_atomic(path, item.data)
    row = {"key": item.key, "sha256": sha, "width": img.width, "height": img.height,
           "source": item.source, "file": f"images/{path.name}"}
    if item.caption is not None:
        row["caption"] = item.caption
    if item.label is not None:
        row["label"] = item.label
    return row


def read_manifest(raw: Path) -> list[dict]:
    with open(raw / "manifest.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def _rejection(item, reason: str, detail: str) -> dict:
    return {"key": item.key, "source": item.source, "reason": reason, "detail": detail}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    _write_atomic(path, text.encode())


def _write_atomic(path: Path, data: bytes) -> None:
    # A kill mid-write leaves only a .tmp file, never a short file under the final name.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
