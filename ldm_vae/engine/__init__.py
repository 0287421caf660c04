"""Where a stage's units run: the engines of the one runner (:mod:`ldm_vae.runner`).

The runner plans, keeps and removes outputs, stamps records and merges, always in the stage's own
process (the *driver*); an engine only runs ``work(unit)`` somewhere and hands back its record:

- ``local`` (:mod:`.local`): a pool of processes on this machine (``data.num_workers``), or this
  process itself (one worker, or the encode stage, whose VAE lives here);
- ``ray`` (:mod:`.ray_cluster`): tasks on a Ray cluster, one unit each, scheduled by Ray onto
  whichever node has a free CPU (or GPU); a task lost with its worker or node is run again by Ray.

The contract both implement is :class:`Engine`. Which engine runs changes nothing in the outputs
(tested byte for byte).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

from ..units import Unit


class Engine(Protocol):
    """What the runner asks of where units run (a context manager: opened before planning, so a
    pool's start or a cluster's checks overlap it)."""

    capacity: int  # units to keep in flight: an idle worker always finds the next one queued

    def __enter__(self) -> "Engine": ...

    def __exit__(self, *exc) -> None: ...

    def inline(self, n_units: int) -> bool:
        """True: the driver runs these units itself (no pool, or nothing worth sharing)."""
        ...

    def describe(self) -> str | None:
        """The line the stage prints about where it runs (None: nothing to say, this machine)."""
        ...

    def submit(self, unit: Unit) -> Any:
        """Start ``work(unit)`` somewhere; a handle to wait on."""
        ...

    def wait(self, handles: list, timeout: float) -> list:
        """The handles among ``handles`` that finished within ``timeout`` seconds."""
        ...

    def result(self, handle, unit: Unit) -> dict:
        """The finished unit's record, or :class:`~ldm_vae.units.UnitFailed` raised naming it."""
        ...

    def progress(self) -> int:
        """Items done so far by units in flight, across processes (the progress bar)."""
        ...


def open_engine(cfg, workers: int, work: Callable[[Unit], dict], *, shared: list[Path] = (),
                gpu: bool = False) -> Engine:
    """The engine ``cfg`` (an :class:`~ldm_vae.config.EngineConfig`, or None: local) names.

    ``workers``: the local pool's processes (1: none, the driver runs the units itself).
    ``shared``: folders every node must see at the same path (the output folder first): the Ray
    engine checks each node before any unit starts. ``gpu``: units that use a GPU where the
    cluster has one (encode).
    """
    if cfg is not None and cfg.kind == "ray":
        from .ray_cluster import RayEngine

        return RayEngine(cfg, work, shared=list(shared), gpu=gpu)
    from .local import LocalEngine

    return LocalEngine(workers, work)
