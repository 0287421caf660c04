"""The Ray engine: each unit is a Ray task, scheduled by Ray onto whichever node has a free CPU (or
GPU), on a cluster started with ``ray start`` (docs/scale.md: A cluster).

- **Outputs land on a shared filesystem.** Every node must see the stage's folders at the same
  path (NFS, Lustre, a FUSE mount of a bucket); a task writes its unit's outputs there, exactly as
  a local pool process does, and hands back only its record (small JSON). Before any unit starts,
  one probe task per node looks for a marker the driver just wrote in the output folder: a node
  that does not see it (no mount, another disk) fails the stage at once, naming the node and path.
- **Lost workers and nodes** are Ray's to handle: a task whose worker process or node dies is run
  again elsewhere (``engine.max_retries`` times). That is safe because a unit's outputs are
  renamed into place whole and carry the unit's name (the retry writes the same files), and only
  the driver writes records. An exception raised by the work (a corrupt shard) is never retried:
  it is the input's fault and would fail again (DataTrove's split between infrastructure and
  application failures); it fails the unit, naming the unit, its input and the node.
- **Progress** comes to a small actor on the driver's node: each task reports its unit's item
  count (cumulatively, every second), so the bar counts a retried unit once.
- **Memory** on the driver: ``capacity`` units in flight (twice the cluster's task slots), never the
  whole plan: a million units cost a million small records on disk, not in Ray.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Callable

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .. import units
from ..units import Unit, UnitFailed

# What a task needs from the driver's environment. Read when a client is made (object storage's
# credentials and endpoint), they are set by the task itself; read as a library loads (the hub's
# settings, the kernel variables that decide float results: README, What reproduces), they go in
# the job's runtime environment, which makes Ray start workers of their own for it (measured: a
# second of a 10-second stage on 2 cores), so only when one is set.
TASK_ENV = ("AWS_",)
START_ENV = ("HF_", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")
TASK_CPUS = "LDM_VAE_TASK_CPUS"  # runner.cpu_share reads it inside a task
SEND_EVERY = 1.0  # seconds between a task's progress reports


class RayEngine:
    def __init__(self, cfg, work: Callable[[Unit], dict], *, shared: list[Path], gpu: bool):
        self.cfg, self.work, self.shared, self.gpu = cfg, work, [Path(p) for p in shared], gpu
        self._connected_here = False  # capacity, slots and the rest: from the cluster, as it opens

    def inline(self, n_units: int) -> bool:
        return False

    def __enter__(self) -> "RayEngine":
        address = self.cfg.ray_address or os.environ.get("RAY_ADDRESS") or "auto"
        if not ray.is_initialized():
            _reachable(address)  # ray.init waits minutes on an address where nothing listens
            env = {k: v for k, v in os.environ.items() if k.startswith(START_ENV)}
            try:
                ray.init(address=None if address == "local" else address, logging_level="ERROR",
                         log_to_driver=False, runtime_env={"env_vars": env} if env else None)
            except (ConnectionError, RuntimeError) as e:
                raise ValueError(f"engine.ray_address: {address!r}: no Ray cluster there ({e}); start one with "
                                 "`ray start --head` (docs/scale.md: A cluster)") from None
            self._connected_here = True
        try:
            self._plan_resources()
            self._check_shared()
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
            self.progress_actor = _Progress.options(num_cpus=0, scheduling_strategy=here).remote()
            self.work_ref = ray.put(self.work)
            self.context = ray.put({"cwd": os.getcwd(), "cpus": self.task_cpus,
                                    "env": {k: v for k, v in os.environ.items() if k.startswith(TASK_ENV)}})
        except BaseException:
            self.__exit__()
            raise
        self._last_progress = 0
        return self

    def __exit__(self, *exc) -> None:
        if self._connected_here:
            ray.shutdown()

    def describe(self) -> str:
        return (f"on the Ray cluster: {self.nodes} nodes, {self.cpus:g} CPUs, {self.gpus:g} GPUs; "
                f"{self.slots} tasks at once ({self.task_cpus} CPU{'' if self.task_cpus == 1 else 's'}"
                f"{' and 1 GPU' if self.task_gpus else ''} each)")

    def _plan_resources(self) -> None:
        """Per task: one CPU (download, prepare, encode without GPUs), or one GPU and the CPUs that
        come with it (encode: its threads decode the next batches)."""
        alive = [n for n in ray.nodes() if n["Alive"]]
        self.nodes = len(alive)
        self.cpus = sum(n["Resources"].get("CPU", 0) for n in alive)
        self.gpus = sum(n["Resources"].get("GPU", 0) for n in alive)
        self.task_gpus = 1 if self.gpu and self.gpus > 0 else 0
        if self.task_gpus:
            per_gpu = [n["Resources"].get("CPU", 0) / n["Resources"]["GPU"] for n in alive
                       if n["Resources"].get("GPU", 0) > 0]
            self.task_cpus = max(1, int(min(per_gpu)))
            self.slots = int(self.gpus)
        else:
            self.task_cpus = 1
            self.slots = int(self.cpus)
        if self.slots < 1:
            raise ValueError(f"the Ray cluster has no {'GPU' if self.task_gpus else 'CPU'} to run tasks on")
        self.capacity = 2 * self.slots  # an idle worker always finds a unit queued
        self.remote = ray.remote(_run_unit).options(
            num_cpus=self.task_cpus, num_gpus=self.task_gpus, max_retries=self.cfg.max_retries,
            retry_exceptions=False)

    def _check_shared(self) -> None:
        """Every node with CPUs sees the shared folders, the first one being this very folder."""
        if not self.shared:
            return
        marker = self.shared[0] / f".ray-check-{uuid.uuid4().hex[:12]}"
        self.shared[0].mkdir(parents=True, exist_ok=True)
        marker.write_text("written by the driver: every node must see this file\n")
        try:
            nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
            probes = [
                _sees.options(
                    num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                ).remote([str(p.resolve()) for p in self.shared], marker.name)
                for n in nodes
            ]
            seen = ray.get(probes, timeout=120)
        finally:
            marker.unlink(missing_ok=True)
        problems = [f"node {where}: {problem}" for where, missing in seen for problem in missing]
        if problems:
            raise ValueError("the Ray engine needs the stage's folders on a filesystem every node mounts at the "
                             f"same path (docs/scale.md: A cluster): {'; '.join(problems)}")

    def submit(self, unit: Unit):
        return self.remote.remote(self.work_ref, unit, self.progress_actor, self.context)

    def wait(self, handles: list, timeout: float) -> list:
        ready, rest = ray.wait(handles, num_returns=1, timeout=timeout)
        if ready and rest:  # and whatever else finished meanwhile, without waiting
            ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        return ready

    def result(self, handle, unit: Unit) -> dict:
        try:
            return ray.get(handle)
        except ray.exceptions.RayTaskError as e:  # the work raised (units.call made it a UnitFailed)
            self.progress_actor.drop.remote(unit.name)
            if isinstance(e.cause, UnitFailed):
                raise e.cause from None
            raise UnitFailed(f"unit {unit.name} ({unit.about or 'no input'}): {e}") from None
        except ray.exceptions.RayError as e:  # its worker or node lost more often than Ray may retry
            self.progress_actor.drop.remote(unit.name)
            raise UnitFailed(f"unit {unit.name} ({unit.about or 'no input'}): Ray lost it {self.cfg.max_retries + 1} "
                             f"times (engine.max_retries: {self.cfg.max_retries}): {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}; a re-run does it") from None

    def progress(self) -> int:
        try:
            self._last_progress = ray.get(self.progress_actor.total.remote(), timeout=10)
        except (ray.exceptions.RayError, TimeoutError):
            pass  # progress only: keep the last count
        return self._last_progress


def _reachable(address: str, timeout: float = 10.0) -> None:
    """A ``host:port`` address must accept a connection within ``timeout`` seconds."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return  # "auto", "local": Ray itself looks on this node and says so at once
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ValueError(f"engine.ray_address: {address!r}: nothing answers there ({e}); start the cluster's "
                         "head with `ray start --head --port=<port>` (docs/scale.md: A cluster)") from None


def _run_unit(work, unit: Unit, progress, context: dict) -> dict:
    """One unit, in a Ray worker process: the driver's working directory (relative paths mean the
    same on a shared filesystem) and credentials, the task's CPUs, ticks to the progress actor."""
    os.chdir(context["cwd"])
    os.environ.update(context["env"])
    os.environ[TASK_CPUS] = str(context["cpus"])
    node = ray.get_runtime_context().get_node_id()
    ticks = _Ticks(progress, unit.name)
    units.set_tick(ticks.add)
    try:
        record = units.call(work, unit, where=f"node {ray.util.get_node_ip_address()} ({node[:8]})")
        ticks.send(final=True)
        return record
    finally:
        units.set_tick(None)


class _Ticks:
    """A task's item count, sent to the progress actor at most every SEND_EVERY seconds."""

    def __init__(self, actor, unit: str):
        self.actor, self.unit, self.n = actor, unit, 0
        self.started, self.sent_at = time.time(), 0.0

    def add(self, n: int) -> None:
        self.n += n
        if time.time() - self.sent_at > SEND_EVERY:
            self.send()

    def send(self, final: bool = False) -> None:
        self.sent_at = time.time()
        call = self.actor.set.remote(self.unit, self.started, self.n, final)
        if final:
            try:
                ray.get(call, timeout=10)  # the driver reads the total right after the task returns
            except (ray.exceptions.RayError, TimeoutError):
                pass  # progress only


@ray.remote
class _Progress:
    """Items done: of finished units (folded into one number), plus each running unit's latest
    report. A retried unit's new attempt (a later start) replaces the lost one's count."""

    def __init__(self):
        self.finished = 0
        self.running: dict[str, tuple[float, int]] = {}
        self.done: set[str] = set()  # a unit's name each: kilobytes for a million units

    def set(self, unit: str, started: float, n: int, final: bool) -> None:
        if unit in self.done or (unit in self.running and self.running[unit][0] > started):
            return  # a late report of an attempt that was lost and redone
        if final:
            self.running.pop(unit, None)
            self.done.add(unit)
            self.finished += n
        else:
            self.running[unit] = (started, n)

    def drop(self, unit: str) -> None:
        self.running.pop(unit, None)

    def total(self) -> int:
        return self.finished + sum(n for _, n in self.running.values())


@ray.remote
def _sees(paths: list[str], marker: str) -> tuple[str, list[str]]:
    """On one node: (the node, what it misses of the shared folders)."""
    where = f"{ray.util.get_node_ip_address()} ({ray.get_runtime_context().get_node_id()[:8]})"
    missing = [f"no folder {p}" for p in paths if not os.path.isdir(p)]
    if not missing and not os.path.exists(os.path.join(paths[0], marker)):
        missing.append(f"{paths[0]} is another folder than the driver's (the driver's marker file is not there)")
    return where, missing
