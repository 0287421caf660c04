"""Where a stage's units run: the engines of the one runner (:mod:`ldm_vae.runner`).

The runner plans, keeps and removes outputs, stamps records and merges, always in the stage's own
process (the *driver*); an engine only runs ``work(unit)`` somewhere and hands back its record:

- ``local`` (:mod:`.local`): a pool of processes on this machine (``data.num_workers``), or this
  process itself (one worker, or the encode stage, whose VAE lives here);
- ``ray`` (:mod:`.ray_cluster`): tasks on a Ray cluster, one unit each, scheduled by Ray onto
  whichever node has a free CPU (or GPU); a task lost with its worker or node is run again by Ray.

An engine is a context manager with ``inline(n_units)`` (True: the driver runs these units itself),
``capacity`` (units to keep in flight), ``submit(unit)``, ``wait(handles, timeout)`` (the finished
ones), ``result(handle, unit)`` (the record, or :class:`~ldm_vae.units.UnitFailed`) and
``progress()`` (items done so far, across processes); a cluster's engine also has ``describe()``,
the line the stage prints about where it runs.
Which engine runs changes nothing in the outputs (tested byte for byte).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..units import Unit


def open_engine(cfg, workers: int, work: Callable[[Unit], dict], *, shared: list[Path] = (), gpu: bool = False):
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
