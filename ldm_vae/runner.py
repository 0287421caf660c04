"""Sharded, resumable, rank-split stage work: the one runner behind download, prepare and encode.

A stage cuts its job into named *units* (a slice of the source, one raw shard, one prepared
shard). Every process of a launcher group runs :func:`run_units` (alone, a process is the whole
group):

1. Rank 0 plans. It lists the units, keeps those whose done-record (``<out>/.done/<unit>.json``)
   still matches the unit's ``ident`` (its inputs, params and code) and whose outputs are all
   still the files it wrote (size and mtime),
   deletes everything else in the stage's output folders (half-written ``.tmp`` shards, outputs of
   other params, of a unit a kill interrupted), and broadcasts the units left to do.
2. Rank r of W takes units r, r+W, r+2W, ... of that list and runs them on its engine
   (:mod:`ldm_vae.engine`): a pool of ``workers`` local processes, this process, or a Ray cluster,
   where an idle worker takes the next unit. A unit writes its outputs under temporary names and
   renames them; its record is written after that, so a kill loses only the units in flight. A
   unit that fails does not stop the others: they finish and are recorded, then the stage fails
   naming the unit and what it reads.
3. After a barrier, rank 0 reads every record in unit order and the stage finishes from them
   (merges a manifest, checks coverage, writes stats). Records are read in unit order, never in
   the order units finished, which is why results do not depend on the process count.

Several machines are the Ray engine's (``engine.kind: ray``): one stage command, its units
scheduled over the cluster. A launcher group (W > 1) is one machine's GPUs running encode; it talks
through gloo, only for one broadcast and the barriers.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .code_deps import PACKAGE, stage_code
from .engine import open_engine
from .files import atomic_write
from .units import Unit, UnitFailed, call, set_tick, tick

# The stages import the unit pieces from here, with the runner's own.
__all__ = ["Unit", "UnitFailed", "tick", "run_units", "StageWork", "Placement", "iter_records", "record_path",
           "code_hash", "stage_code", "group", "cpu_share", "resolve_workers", "check_launcher", "RECORDS"]

RECORDS = ".done"

# Rank 0 waits at the final barrier for the slowest rank's last unit; a unit on a slow node is
# minutes, so hours only ever pass for a rank that hangs.
BARRIER_TIMEOUT = datetime.timedelta(hours=6)


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
    """CPU cores for this process: a Ray task's CPUs, else its affinity divided among the launcher's
    local processes."""
    if os.environ.get("LDM_VAE_TASK_CPUS"):  # set by the Ray engine (engine/ray_cluster.py) in its tasks
        return int(os.environ["LDM_VAE_TASK_CPUS"])
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
        h.update((PACKAGE / f"{name}.py").read_bytes())
    return h.hexdigest()[:16]


@dataclass
class StageWork:
    """What a stage hands the runner: its units and what to do with each."""
    desc: str  # the stage in messages and on its progress bar ("download folder", "encode")
    out: Path  # the stage's output folder; records go to out/.done
    plan: Callable[[], list[Unit]]  # every unit, in order (rank 0 only)
    # work(unit) writes the unit's outputs and returns its record: ``outputs`` (paths relative to
    # ``out``) plus anything the stage's finish needs.
    work: Callable[[Unit], dict]
    clean: list[str]  # folders under ``out`` (non-recursive) holding only outputs: unlisted files go
    item: str = "img"  # the progress bar's unit
    agree: str = ""  # a value every rank must share (the VAE's fingerprint), checked against rank 0's
    # redo(record): True for a valid record whose unit should run again (URL fetches that failed);
    # its outputs are kept and the record is passed as ``unit.extra["previous"]``.
    redo: Callable[[dict], bool] | None = None


@dataclass
class Placement:
    """Where a stage's units run."""
    engine: Any = None  # an EngineConfig (None: local)
    workers: int = 1  # the local pool's processes
    shared: list[Path] = field(default_factory=list)  # Ray: folders every node must see (``out`` is added)
    gpu: bool = False  # Ray: a GPU per task where the cluster has them
    launcher_group: bool = False  # the stage may run as the ranks of one machine's launcher (encode's GPUs)


def run_units(stage: StageWork, where: Placement) -> list[Unit] | None:
    """Run every unit of ``stage`` not yet done, ``where`` says; return all units (rank 0, for
    :func:`iter_records`) or None (the other ranks)."""
    check_launcher(stage.desc, where.engine, where.launcher_group)
    rank, world = group()
    # The pool's start-up (or the cluster's checks) overlap rank 0's planning.
    with open_engine(where.engine, where.workers, stage.work, shared=[Path(stage.out), *where.shared],
                     gpu=where.gpu) as runs_on:
        about = runs_on.describe()
        if about and rank == 0:
            print(f"{stage.desc}: {about}", flush=True)
        return _run(stage, runs_on, rank, world)


def check_launcher(desc: str, engine, launcher_group: bool) -> None:
    """Fail at once, saying what to use instead, for a launcher group this stage cannot run as."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return
    if engine is not None and engine.kind == "ray":
        raise ValueError(f"{desc}: engine.kind: ray runs the units on the cluster: start the stage without a "
                         "launcher (one command, on any node of the cluster)")
    if not launcher_group:
        raise ValueError(
            f"{desc}: runs as one process with a pool of workers (data.num_workers), not under a "
            f"launcher (WORLD_SIZE={world}); for several machines use engine.kind: ray (docs/scale.md: A cluster)"
        )
    if world != int(os.environ.get("LOCAL_WORLD_SIZE", world)):
        raise ValueError(f"{desc}: a launcher group spans several machines (WORLD_SIZE={world}, LOCAL_WORLD_SIZE="
                         f"{os.environ.get('LOCAL_WORLD_SIZE')}); for several machines use engine.kind: ray "
                         "(docs/scale.md: A cluster); a launcher runs the GPUs of one machine")


def _run(stage: StageWork, engine, rank: int, world: int) -> list[Unit] | None:
    out, clean, desc, agree, redo = stage.out, stage.clean, stage.desc, stage.agree, stage.redo
    units = todo = None
    if rank == 0:
        units = stage.plan()
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
    _execute(out, todo[rank::world], stage.work, engine, f"{desc} rank {rank}" if world > 1 else desc, stage.item)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank's records are written
    if rank != 0:
        return None
    # Again after the run: a task lost with its node (and run again elsewhere) leaves its partial file.
    _remove_unrecorded(out, clean, _valid(out, units))
    return units


def record_path(out: Path, unit: Unit) -> Path:
    return Path(out) / RECORDS / f"{unit.name}.json"


def iter_records(out: Path, units: list[Unit]) -> Iterator[dict]:
    """Every unit's record, in unit order (one at a time: a manifest's rows are never all held)."""
    for unit in units:
        yield json.loads(record_path(out, unit).read_text())


def _execute(out: Path, mine: list[Unit], work, engine, desc: str, item: str) -> None:
    from tqdm import tqdm  # here: the pool's processes never draw a bar

    total = sum(u.size for u in mine)
    bar = tqdm(total=total or None, desc=desc, unit=item, dynamic_ncols=True, mininterval=1.0,
               position=int(os.environ.get("LOCAL_RANK", "0")))
    try:
        if engine.inline(len(mine)):
            _run_inline(out, mine, work, bar)
        else:
            _drive(out, mine, engine, bar)
    finally:
        set_tick(None)
        bar.close()


def _run_inline(out: Path, mine: list[Unit], work, bar) -> None:
    set_tick(bar.update)
    failed = []
    for n, unit in enumerate(mine):
        bar.set_postfix_str(f"unit {n + 1}/{len(mine)}", refresh=False)
        try:
            _stamp(out, unit, call(work, unit))
        except UnitFailed as e:
            failed.append(e)  # the other units go on: none of their work is lost
            if e.abort:
                _raise_first(failed, len(mine) - n - 1)
    _raise_first(failed)


def _drive(out: Path, mine: list[Unit], engine, bar) -> None:
    """Keep ``engine.capacity`` units in flight (an idle worker takes the next one), stamp each
    record as its unit finishes, and show the items done across every process and node."""
    queue = iter(mine)
    in_flight: dict = {}  # engine handle -> unit
    finished, failed, stop = 0, [], False
    while True:
        while not stop and len(in_flight) < engine.capacity and (unit := next(queue, None)) is not None:
            in_flight[engine.submit(unit)] = unit
        if not in_flight:
            break
        for handle in engine.wait(list(in_flight), timeout=1.0):
            unit = in_flight.pop(handle)
            try:
                record = engine.result(handle, unit)
            except Exception as e:  # UnitFailed; or the pool itself broke (a process killed)
                if not isinstance(e, UnitFailed):
                    e = UnitFailed(f"unit {unit.name} ({unit.about or 'no input'}): {type(e).__name__}: {e}")
                failed.append(e)  # the other units go on: none of their work is lost
                stop = stop or e.abort  # ... unless none of them can succeed: start no more
                continue
            _stamp(out, unit, record)
            finished += 1
        bar.set_postfix_str(f"units {finished}/{len(mine)}", refresh=False)
        bar.update(engine.progress() - bar.n)
    _raise_first(failed, len(mine) - finished - len(failed))


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
