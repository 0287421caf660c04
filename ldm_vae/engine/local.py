"""The local engine: a pool of ``workers`` processes on this machine (or none: the driver runs
each unit itself)."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
from typing import Callable

from .. import units
from ..units import Unit


class LocalEngine:
    """spawn: a fresh interpreter per worker, safe whatever threads the driver runs (tqdm's monitor,
    gloo). Its start and imports cost a few tenths of a second, so the processes start when the
    engine opens, before the driver plans (listing a million files takes seconds), not after;
    ``work`` goes in the initializer's arguments, so each one imports the work's modules as it
    starts. A run with one unit to do pays for starts it does not use: a fraction of a second.
    """

    def __init__(self, workers: int, work: Callable[[Unit], dict]):
        self.workers, self.work = workers, work
        self.pool = self.counter = None
        self.capacity = 2 * workers  # an idle process always finds the next unit queued

    def describe(self) -> str | None:
        return None  # this machine: the progress bar says enough

    def inline(self, n_units: int) -> bool:
        """Whether the driver should run these units itself (no pool, or nothing to share)."""
        return self.pool is None or n_units <= 1

    def __enter__(self) -> "LocalEngine":
        if self.workers > 1:
            ctx = mp.get_context("spawn")
            self.counter = ctx.Value("q", 0)
            self.pool = cf.ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_pool_init,
                                               initargs=(self.counter, self.work))
            for _ in range(self.workers):
                self.pool.submit(int)  # a process is spawned per submit while none is idle
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)  # on an interrupt: what has not started

    def submit(self, unit: Unit) -> cf.Future:
        return self.pool.submit(units.call, self.work, unit)

    def wait(self, handles: list[cf.Future], timeout: float) -> list[cf.Future]:
        return list(cf.wait(handles, timeout=timeout, return_when=cf.FIRST_COMPLETED)[0])

    def result(self, handle: cf.Future, unit: Unit) -> dict:
        return handle.result()  # UnitFailed from units.call; a dead pool process: BrokenProcessPool

    def progress(self) -> int:
        return self.counter.value


def _pool_init(counter, work) -> None:
    """Each pool process, as it starts; ``work`` is unused here: unpickling it imported its modules."""

    def add(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    units.set_tick(add)
