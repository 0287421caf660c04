"""What a unit of stage work is, how its work is called, and how it reports progress: the pieces
the runner (:mod:`ldm_vae.runner`) and every engine (:mod:`ldm_vae.engine`) share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


class UnitFailed(RuntimeError):
    """A unit's work raised: the message names the stage, the unit and what it reads. ``abort``:
    the work said no later unit can succeed (its error had ``abort_stage``: a store that is down),
    so no more units are started; a re-run does them."""

    abort = False


@dataclass
class Unit:
    name: str  # unique within the stage; the record's file name: "u00003", "train-s00012"
    ident: dict  # JSON: what a record must hold to count as this unit, done
    # What the work function needs, picklable to a pool process or a Ray task: a frozen dataclass
    # per stage (download: a SourceSlice of its source kind; prepare: RawBlock; encode: EncodeInput).
    task: Any = None
    size: int = 0  # items, for the progress bar (0: unknown)
    about: str = ""  # what it reads, for error messages ("shards/raw-u00003-00000.tar")
    extra: dict = field(default_factory=dict)


def call(work: Callable[[Unit], dict], unit: Unit, where: str = "") -> dict:
    """``work(unit)``, with any exception turned into :class:`UnitFailed` naming the unit, its
    input and (on a cluster) the node."""
    try:
        return work(unit)
    except Exception as e:
        on = f" on {where}" if where else ""
        failed = UnitFailed(f"unit {unit.name} ({unit.about or 'no input'}){on}: {type(e).__name__}: {e}")
        failed.abort = bool(getattr(e, "abort_stage", False))
        raise failed from e


# -- progress -------------------------------------------------------------------------------------

_tick: Callable[[int], None] | None = None


def tick(n: int = 1) -> None:
    """Work functions call this per item done; the stage's progress bar shows the total."""
    if _tick is not None:
        _tick(n)


def set_tick(fn: Callable[[int], None] | None) -> None:
    """Where this process's ticks go: the bar (in process), a shared counter (a pool process), the
    cluster's progress actor (a Ray task); None: nowhere."""
    global _tick
    _tick = fn
