"""The download stage's work: take every item of a source, keep the good ones, record the rest.

Output (the raw contract, docs/design.md):
  <out>/shards/raw-<unit>-00000.tar  the kept images of one unit: member ``<key>.<ext>`` holds the
                                     source's bytes, unchanged (the manifest's sha256 is of these)
  <out>/manifest.jsonl      one line per kept image: key, sha256, width, height, source, shard,
                            member (+caption/label), in source order
  <out>/rejected.jsonl      one line per rejected input: key, source, reason, detail
  <out>/classes.json        the class names a label indexes (data.labels; [] without), never
                            renumbered by a later run (:mod:`ldm_vae.ingest.labels`)
  <out>/.done/<unit>.json   the runner's per-unit records (what a re-run keeps)

The source is cut into units (:func:`ldm_vae.ingest.sources.plan_source`) that a pool of worker
processes reads, hashes and decodes independently (:mod:`ldm_vae.runner`); one raw shard per unit,
so DVC tracks a file per few thousand images instead of one per image. Exact duplicates are
rejected globally: within a unit as it runs, across units when rank 0 merges the records in unit
order (a duplicate of an earlier unit's image stays in its shard, unlisted: the manifest decides).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import shutil
from pathlib import Path

from ..config import DataConfig
from ..files import atomic_path
from ..images import ImageRejected, check_image, image_ext
from ..runner import Placement, StageWork, Unit, code_hash, iter_records, resolve_workers, run_units, stage_code, tick
from ..samples import RAW, read_classes, write_classes
from ..shards import ShardWriter, tar_members
from .labels import LabelRule
from .sources import Labels, iter_unit, plan_source

SHARDS = "shards"


def run_download(cfg: DataConfig, out: Path, engine=None) -> dict | None:
    """Fill ``out``; return a summary {kept, rejected, reasons}. ``engine``: where the units run
    (an :class:`~ldm_vae.config.EngineConfig`; None: this machine).

    ``out`` may hold a previous, interrupted run's output (the stage output persists): finished
    units are kept, the rest are read again, and the manifest is merged from all of them.
    """
    out = Path(out)
    if (out / "images").is_dir():
        shutil.rmtree(out / "images")  # the one-file-per-image layout of earlier versions of this stage
    judged = {"min_size": cfg.min_size, "max_pixels": cfg.max_pixels, "max_bytes": cfg.max_bytes,
              "code": code_hash(*stage_code("ingest/download"))}
    if cfg.source_kind == "urls":  # what a fetch refuses: another list re-runs the units (folders never fetch)
        judged["disallowed_header_directives"] = list(cfg.disallowed_header_directives)
    if cfg.labels != "none":  # each item's label is in its unit's fingerprint; this covers those rejected
        judged["labels"] = cfg.labels

    def plan() -> list[Unit]:
        out.mkdir(parents=True, exist_ok=True)
        labels = None
        if cfg.labels != "none":
            labels = Labels(LabelRule(cfg.labels, cfg.label_file), read_classes(out))
        units = plan_source(cfg, labels)
        # Written before any unit runs: a killed run's units and its re-run number the same.
        write_classes(out, labels.classes.names if labels else [])
        if labels and labels.classes.note():
            print(f"download: {labels.classes.note()}", flush=True)
        for u in units:
            u.ident = {**u.ident, **judged}
        return units

    shared = [Path(cfg.source_target)] if cfg.source_kind == "folder" else []  # what the workers read
    stage = StageWork(f"download {cfg.source_kind}", out, plan, _Work(cfg, out), clean=[SHARDS],
                      redo=_failed_fetches if cfg.source_kind == "urls" else None)
    units = run_units(stage, Placement(engine, resolve_workers(cfg.num_workers), shared))
    if units is None:
        return None
    return merge(out, units)


class _Work:
    """One unit: its items judged, the kept ones written to one raw shard (picklable for the pool)."""

    def __init__(self, cfg: DataConfig, out: Path):
        self.cfg, self.out = cfg, out

    def __call__(self, unit: Unit) -> dict:
        rows: list[dict] = []
        by_sha: dict[str, str] = {}
        previous = unit.extra.get("previous") or {"rows": [], "outputs": []}
        reuse = {r["key"]: r["member"] for r in previous["rows"] if "member" in r}
        with contextlib.ExitStack() as stack:
            # The new shard replaces the old one by a rename: the old one stays readable until then.
            old = stack.enter_context(open(self.out / previous["outputs"][0], "rb")) if reuse else None
            members = tar_members(old) if old else iter(())
            writer = stack.enter_context(ShardWriter(self.out / SHARDS, f"raw-{unit.name}", 1 << 62))
            for item in iter_unit(self.cfg, unit.task, skip=set(reuse)):
                if item.key in reuse:  # fetched by an earlier run: its bytes from the old shard, in order
                    item.data = next(data for name, data in members if name == reuse[item.key])
                row = judge(self.cfg, item, by_sha)
                if "reason" not in row:
                    ext = image_ext(item.data).lstrip(".")
                    writer.write(RAW.build(item.key, fmt=ext, image=item.data))
                    row["member"] = f"{item.key}.{ext}"
                rows.append(row)
                tick()
        shards = [f"{SHARDS}/{n}" for n in writer.written]
        for row in rows:
            if "member" in row:
                row["shard"] = shards[0]
        return {"outputs": shards, "rows": rows}


def _failed_fetches(record: dict) -> bool:
    """A URL unit runs again while any of its fetches failed (a host down, a 404 that may be
    fixed): only those are fetched again; what it kept is reused from its shard."""
    return any(r.get("reason", "").startswith("http_") or r.get("reason") in ("timeout", "connection_error")
               for r in record["rows"])


def judge(cfg: DataConfig, item, by_sha: dict[str, str]) -> dict:
    """The manifest row of ``item`` (without its place), or its rejection row."""
    if item.error:
        reason, _, detail = item.error.partition(": ")
        return _rejection(item.key, item.source, reason, detail)
    sha = hashlib.sha256(item.data).hexdigest()
    if sha in by_sha:
        return _rejection(item.key, item.source, "duplicate", f"same bytes as {by_sha[sha]}")
    try:
        width, height = check_image(item.data, cfg.max_pixels, cfg.min_size)
    except ImageRejected as e:
        return _rejection(item.key, item.source, e.reason, e.detail)
    by_sha[sha] = item.key
    row = {"key": item.key, "sha256": sha, "width": width, "height": height, "source": item.source}
    if item.caption is not None:
        row["caption"] = item.caption
    if item.label is not None:
        row["label"] = item.label
    if item.final_url is not None:
        row["final_url"] = item.final_url
    return row


def merge(out: Path, units: list[Unit]) -> dict:
    """manifest.jsonl and rejected.jsonl from the unit records, in unit order; the global
    duplicate check. Rows stream through: only the hashes of kept images are held."""
    by_sha: dict[bytes, str] = {}
    reasons: collections.Counter = collections.Counter()
    kept = 0
    with atomic_path(out / "manifest.jsonl") as manifest, atomic_path(out / "rejected.jsonl") as rejected, \
            open(manifest, "w") as man, open(rejected, "w") as rej:
        for record in iter_records(out, units):
            for row in record["rows"]:
                if "reason" not in row:
                    digest = bytes.fromhex(row["sha256"])[:16]
                    if digest in by_sha:
                        row = _rejection(row["key"], row["source"], "duplicate", f"same bytes as {by_sha[digest]}")
                    else:
                        by_sha[digest] = row["key"]
                if "reason" in row:
                    reasons[row["reason"]] += 1
                    rej.write(json.dumps(row, sort_keys=True) + "\n")
                else:
                    kept += 1
                    man.write(json.dumps(row, sort_keys=True) + "\n")
    return {"kept": kept, "rejected": sum(reasons.values()), "reasons": dict(sorted(reasons.items()))}


def read_manifest(raw: Path) -> list[dict]:
    """Every manifest row (for tests and small sets; stages stream it)."""
    with open(Path(raw) / "manifest.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def raw_images(raw: Path) -> dict[str, bytes]:
    """key -> the source bytes kept for it, read from the raw shards (for tests and small sets)."""
    rows = read_manifest(raw)
    wanted = {(r["shard"], r["member"]): r["key"] for r in rows}
    found = {}
    for shard in sorted({r["shard"] for r in rows}):
        with open(Path(raw) / shard, "rb") as f:
            for name, data in tar_members(f):
                if (shard, name) in wanted:
                    found[wanted[shard, name]] = data
    return found


def _rejection(key: str, source: str, reason: str, detail: str) -> dict:
    return {"key": key, "source": source, "reason": reason, "detail": detail}

