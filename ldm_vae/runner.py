"""Sharded, resumable, rank-split stage work: the one runner behind download, prepare and encode.

A stage cuts its job into named *units* (a slice of the source, one raw shard, one prepared
shard). Every process of a launcher group runs :func:`run_units` (alone, a process is the whole
group):

1. Rank 0 plans. It lists the units, keeps those whose done-record (``<out>/.done/<unit>.json``)
   still matches the unit's ``ident`` (its inputs, params and code) and whose outputs are all
   still the files it wrote (size and mtime),
   deletes everything else in the stage's output folders (half-written ``.tmp`` shards, outputs of
   other params, of a unit a kill interrupted), and broadcasts the units left to do.
2. Rank r of W takes units r, r+W, r+2W, ... of that list and runs them on a pool of ``workers``
   local processes (or in this process). A unit writes its outputs under temporary names and
   renames them; its record is written after that, so a kill loses only the units in flight. A
   unit that fails does not stop the others: they finish and are recorded, then the stage fails
   naming the unit and what it reads.
3. After a barrier, rank 0 reads every record in unit order and the stage finishes from them
   (merges a manifest, checks coverage, writes stats). Records are read in unit order, never in
   the order units finished, which is why results do not depend on the process count.

Several machines run the same stage command under one launcher each, with the output folder on a
shared filesystem (``accelerate launch --num_machines N --machine_rank R ...``); the group talks
through gloo, only for one broadcast and the barriers.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import datetime
import hashlib
import json
import multiprocessing as mp
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .files import atomic_write

RECORDS = ".done"

# Rank 0 waits at the final barrier for the slowest rank's last unit; a unit on a slow node is
# minutes, so hours only ever pass for a rank that hangs.
BARRIER_TIMEOUT = datetime.timedelta(hours=6)


class UnitFailed(RuntimeError):
    """A unit's work raised: the message names the stage, the unit and what it reads. ``abort``:
    the work said no later unit can succeed (its error had ``abort_stage``: a store that is down),
    so no more units are started; a re-run does them."""

    abort = False


@dataclass
class Unit:
    name: str  # unique within the stage; the record's file name: "u00003", "train-s00012"
    ident: dict  # JSON: what a record must hold to count as this unit, done
    task: Any = None  # what the work function needs (picklable when run on a pool)
    size: int = 0  # items, for the progress bar (0: unknown)
    about: str = ""  # what it reads, for error messages ("shards/raw-u00003-00000.tar")
    extra: dict = field(default_factory=dict)


def group() -> tuple[int, int]:
    """(rank, world size): (0, 1) alone; under a launcher (WORLD_SIZE > 1), the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    return dist.get_rank(), dist.get_world_size()


def cpu_share() -> int:
    """CPU cores for this process: its affinity divided among the launcher's local processes."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def resolve_workers(setting: str) -> int:
    """``auto``: every core this process may use; else the number given."""
    return cpu_share() if setting == "auto" else int(setting)


def code_hash(*modules: str) -> str:
    """A short hash of ldm_vae modules' sources (``"ingest/download"``, ``"shards"``): outputs of
    other code are never kept."""
    h = hashlib.sha256()
    for name in modules:
        h.update((Path(__file__).parent / f"{name}.py").read_bytes())
    return h.hexdigest()[:16]


def run_units(out: Path, plan: Callable[[], list[Unit]], work: Callable[[Unit], dict], *, clean: list[str],
              workers: int = 1, desc: str, item: str = "img", agree: str = "",
              redo: Callable[[dict], bool] | None = None) -> list[Unit] | None:
    """Run every unit not yet done; return all units (rank 0, for :func:`iter_records`) or None.

    ``work(unit)`` writes the unit's outputs and returns its record: ``outputs`` (paths relative
    to ``out``) plus anything the stage's finish needs. ``clean`` names the folders under ``out``
    (non-recursive) that hold only outputs: whatever no valid record lists is deleted there.
    ``agree``: a value every rank must share (the VAE's fingerprint), checked against rank 0's.
    ``redo(record)``: True for a valid record whose unit should run again (URL fetches that
    failed); its outputs are kept and the record is passed as ``unit.extra["previous"]``, so the
    work can reuse what it finished.
    """
    rank, world = group()
    with _helpers(workers, work) as helpers:  # their start-up overlaps rank 0's planning
        return _run(out, plan, work, clean, helpers, desc, item, agree, redo, rank, world)


def _run(out, plan, work, clean, helpers, desc, item, agree, redo, rank, world) -> list[Unit] | None:
    units = todo = None
    if rank == 0:
        units = plan()
        done = _valid(out, units)  # name -> record, each read once
        _remove_unrecorded(out, clean, done)
        for u in units:
            if u.name in done and redo is not None and redo(done[u.name]):
                u.extra["previous"] = done[u.name]
        todo = [u for u in units if u.name not in done or "previous" in u.extra]
        if done:
            print(f"{desc}: {len(units) - len(todo)} of {len(units)} units already done, {len(todo)} to do",
                  flush=True)
    if world > 1:
        import torch.distributed as dist

        shared = [todo, agree]
        dist.broadcast_object_list(shared, src=0)
        todo = shared[0]
        if shared[1] != agree:
            raise RuntimeError(f"rank {rank} disagrees with rank 0 ({agree} vs {shared[1]}): "
                               "were the inputs changed while the ranks started?")
    _execute(out, todo[rank::world], work, helpers, f"{desc} rank {rank}" if world > 1 else desc, item)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank's records are written
    return units if rank == 0 else None


def record_path(out: Path, unit: Unit) -> Path:
    return Path(out) / RECORDS / f"{unit.name}.json"


def iter_records(out: Path, units: list[Unit]) -> Iterator[dict]:
    """Every unit's record, in unit order (one at a time: a manifest's rows are never all held)."""
    for unit in units:
        yield json.loads(record_path(out, unit).read_text())


# -- progress across processes ------------------------------------------------------------------

_tick: Callable[[int], None] | None = None


def tick(n: int = 1) -> None:
    """Work functions call this per item done; the rank's progress bar shows the total."""
    if _tick is not None:
        _tick(n)


def _pool_init(counter, work) -> None:
    """Each pool process, as it starts; ``work`` is unused here: unpickling it imported its modules."""
    global _tick

    def add(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    _tick = add


def _call(work: Callable[[Unit], dict], unit: Unit) -> dict:
    try:
        return work(unit)
    except Exception as e:
        failed = UnitFailed(f"unit {unit.name} ({unit.about or 'no input'}): {type(e).__name__}: {e}")
        failed.abort = bool(getattr(e, "abort_stage", False))
        raise failed from e


@contextlib.contextmanager
def _helpers(workers: int, work) -> Iterator[tuple | None]:
    """(pool, counter) of ``workers`` processes, started at once (None for one worker).

    spawn: a fresh interpreter per worker, safe whatever threads this process runs (tqdm's monitor,
    gloo). Its start and imports cost a few tenths of a second, so the processes start before
    rank 0 plans (listing a million files takes seconds) rather than after; ``work`` goes in the
    initializer's arguments, so that each one imports the work's modules as it starts. A run with
    one unit to do pays for starts it does not use: a fraction of a second.
    """
    if workers <= 1:
        yield None
        return
    ctx = mp.get_context("spawn")
    counter = ctx.Value("q", 0)
    pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_pool_init, initargs=(counter, work))
    try:
        for _ in range(workers):
            pool.submit(int)  # a process is spawned per submit while none is idle
        yield pool, counter
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _execute(out: Path, mine: list[Unit], work, helpers: tuple | None, desc: str, item: str) -> None:
    global _tick
    from tqdm import tqdm  # here: the pool's processes never draw a bar

    total = sum(u.size for u in mine)
    bar = tqdm(total=total or None, desc=desc, unit=item, dynamic_ncols=True, mininterval=1.0,
               position=int(os.environ.get("LOCAL_RANK", "0")))
    try:
        if helpers is None or len(mine) <= 1:
            _tick = bar.update
            failed = []
            for n, unit in enumerate(mine):
                bar.set_postfix_str(f"unit {n + 1}/{len(mine)}", refresh=False)
                try:
                    _stamp(out, unit, _call(work, unit))
                except UnitFailed as e:
                    failed.append(e)  # the other units go on: none of their work is lost
                    if e.abort:
                        _raise_first(failed, len(mine) - n - 1)
            _raise_first(failed)
        else:
            _run_pool(out, mine, work, *helpers, bar)
    finally:
        _tick = None
        bar.close()


def _run_pool(out: Path, mine: list[Unit], work, pool: cf.ProcessPoolExecutor, counter, bar) -> None:
    futures = {pool.submit(_call, work, u): u for u in mine}
    finished, failed, skipped = 0, [], 0
    pending = set(futures)
    while pending:  # on an interrupt, _helpers' shutdown cancels what has not started
        ready, pending = cf.wait(pending, timeout=1.0, return_when=cf.FIRST_COMPLETED)
        for f in ready:
            if f.cancelled():
                continue
            if f.exception() is not None:
                failed.append(f.exception())  # the other units go on: none of their work is lost
                if getattr(f.exception(), "abort", False):  # ... unless none of them can succeed
                    skipped += sum(p.cancel() for p in pending)
                continue
            _stamp(out, futures[f], f.result())
            finished += 1
        bar.set_postfix_str(f"units {finished}/{len(mine)}", refresh=False)
        bar.update(counter.value - bar.n)
    _raise_first(failed, skipped)


def _raise_first(failed: list[BaseException], skipped: int = 0) -> None:
    if failed:
        more = f" (and {len(failed) - 1} more units failed)" if len(failed) > 1 else ""
        if skipped:
            more += f" ({skipped} units not started: a re-run does them)"
        raise UnitFailed(f"{failed[0]}{more}") from failed[0]


def _stamp(out: Path, unit: Unit, record: dict) -> None:
    # The outputs' sizes and mtimes: the records are not part of what DVC stores (.dvcignore), so
    # a `dvc checkout` can put other outputs under them; such outputs no longer match and are redone.
    record = {"unit": unit.name, "ident": unit.ident, **record,
              "written": {p: _stat(Path(out) / p) for p in record["outputs"]}}
    path = record_path(out, unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(record, sort_keys=True))


def _valid(out: Path, units: list[Unit]) -> dict[str, dict]:
    """The records of units whose record matches their ident and whose outputs are all present."""
    done = {}
    for unit in units:
        try:
            rec = json.loads(record_path(out, unit).read_text())
        except (OSError, ValueError):
            continue
        written = rec.get("written", {})
        if rec.get("ident") == json.loads(json.dumps(unit.ident)) and all(
                p in written and _stat(Path(out) / p) == written[p] for p in rec.get("outputs", [])):
            done[unit.name] = rec
    return done


def _stat(path: Path) -> list[int] | None:
    """[size, mtime_ns] of a file; None when it is missing or not a file."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns] if path.is_file() else None


def _remove_unrecorded(out: Path, clean: list[str], done: dict[str, dict]) -> None:
    out = Path(out)
    keep = {p for rec in done.values() for p in rec["outputs"]}
    for folder in clean:
        d = out / folder
        if d.is_dir():
            for p in d.iterdir():
                if p.is_file() and p.relative_to(out).as_posix() not in keep:
                    p.unlink()  # a partial or stale output, a .tmp
    if (out / RECORDS).is_dir():
        for p in (out / RECORDS).iterdir():
            if p.is_file() and p.stem not in done:
                p.unlink()
