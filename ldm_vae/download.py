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
from .images import ImageRejected, load_rgb
from .sources import iter_source


def run_download(cfg: DataConfig, out: Path) -> dict:
    """Fill ``out``; return a summary {kept, rejected, reasons}. One bad item never stops it."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    kept: list[dict] = []
    rejected: list[dict] = []
    by_sha: dict[str, str] = {}
    bar = tqdm(iter_source(cfg.source), desc="download", unit="img", dynamic_ncols=True)
    for item in bar:
        if item.error:
            reason, _, detail = item.error.partition(": ")
            rejected.append(_rejection(item, reason, detail))
            continue
        sha = hashlib.sha256(item.data).hexdigest()
        if sha in by_sha:
            rejected.append(_rejection(item, "duplicate", f"same bytes as {by_sha[sha]}"))
            continue
        try:
            img = load_rgb(item.data, cfg.max_pixels, cfg.min_size)
        except ImageRejected as e:
            rejected.append(_rejection(item, e.reason, e.detail))
            continue
        by_sha[sha] = item.key
        ext = os.path.splitext(item.source)[1].lower() or ".img"
        _write_atomic(images / f"{item.key}{ext}", item.data)
        row = {"key": item.key, "sha256": sha, "width": img.width, "height": img.height,
               "source": item.source, "file": f"images/{item.key}{ext}"}
        if item.caption is not None:
            row["caption"] = item.caption
        if item.label is not None:
            row["label"] = item.label
        kept.append(row)
        bar.set_postfix(kept=len(kept), rejected=len(rejected))
    _write_jsonl(out / "manifest.jsonl", kept)
    _write_jsonl(out / "rejected.jsonl", rejected)
    reasons = collections.Counter(r["reason"] for r in rejected)
    return {"kept": len(kept), "rejected": len(rejected), "reasons": dict(sorted(reasons.items()))}


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
