"""A real two-node Ray cluster for the tests: ``ray start --head`` and ``ray start --address``,
both on 127.0.0.1, each with its own CPU count and its own temp folder, stopped by pid (never
``ray stop``, which stops every Ray process of the machine).

Every process gets ``ray_loopback/`` first on PYTHONPATH (see its sitecustomize.py); Ray's health
checks are made quick, so a killed node is declared dead in about a second, not 30.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers.s3server import free_port

HERE = Path(__file__).resolve().parent
LOOPBACK = str(HERE / "ray_loopback")


def ray_env(extra: dict | None = None) -> dict:
    """The environment of a process of the cluster or of a driver (a stage command)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([LOOPBACK, str(HERE.parent), *filter(None, [env.get("PYTHONPATH")])])
    env.update({"RAY_health_check_period_ms": "300", "RAY_health_check_failure_threshold": "3",
                "RAY_health_check_initial_delay_ms": "0", "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_DEDUP_LOGS": "0", "OMP_NUM_THREADS": "1"})
    env.update(extra or {})
    return env


def node_env(root: Path) -> dict:
    return ray_env({"LDM_VAE_TEST_RAY": str(root)})


def patch_this_process() -> None:
    """What ray_loopback/sitecustomize.py does, for the pytest process as a Ray driver."""
    import ray._private.services as services

    services.resolve_ip_for_localhost = lambda host: host


class RayCluster:
    def __init__(self, root: Path, cpus: tuple[int, ...] = (1, 1), gpus: tuple[int, ...] = (0, 0)):
        """``cpus``: the head's CPUs and the second node's (one entry: a head alone); ``gpus``: the
        GPUs each declares (tests/gpu_imitation.py: Ray schedules GPU tasks there, torch finds none)."""
        self.root = Path(root)
        self.cpus, self.gpus = cpus, gpus
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[subprocess.Popen] = []

    def _ray(self, *args: str, name: str) -> None:
        log = open(self.root / f"{name}.log", "w")
        cmd = [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.exit(main())", *args]
        proc = subprocess.run(cmd, env=node_env(self.root), stdout=log, stderr=subprocess.STDOUT, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"ray {name} failed: {(self.root / f'{name}.log').read_text()[-2000:]}")

    def start(self) -> "RayCluster":
        self.root.mkdir(parents=True, exist_ok=True)
        self._ray("start", "--head", f"--port={self.port}", f"--num-cpus={self.cpus[0]}", "--include-dashboard=false",
                  f"--temp-dir={self.root / 'ray'}", f"--num-gpus={self.gpus[0]}", *self.COMMON, name="head")
        if len(self.cpus) > 1:
            self.add_worker()
        else:
            self.wait_nodes(1)
        return self

    COMMON = ("--node-ip-address=127.0.0.1", "--disable-usage-stats")

    def add_worker(self) -> None:
        """The second node (again, after a test killed it)."""
        alive = len(self.alive_nodes())
        self._ray("start", f"--address={self.address}", f"--num-cpus={self.cpus[1]}", f"--num-gpus={self.gpus[1]}",
                  *self.COMMON, name="worker")
        self.wait_nodes(alive + 1)

    def alive_nodes(self) -> list[dict]:
        import ray

        patch_this_process()
        with _connected(self.address):
            return [n for n in ray.nodes() if n["Alive"]]

    def wait_nodes(self, n: int, timeout: float = 60, exact: bool = False) -> None:
        """Until ``n`` nodes are alive (at least ``n``; exactly ``n`` with ``exact``: a killed node
        is declared dead)."""
        deadline = time.time() + timeout
        while (len(self.alive_nodes()) != n) if exact else (len(self.alive_nodes()) < n):
            if time.time() > deadline:
                raise RuntimeError(f"Ray: not {n} nodes alive after {timeout} s")
            time.sleep(0.3)

    def pids(self) -> list[int]:
        """Every process of this cluster. Ray renames its processes (setproctitle, which can clobber
        what /proc shows of their environment), so a process is this cluster's when its environment
        holds the tag every one inherits from ``ray start``, or it has a file open under the
        cluster's folder (its logs)."""
        tag = f"LDM_VAE_TEST_RAY={self.root}".encode()
        mine = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                if _tagged(entry, tag) or _has_open_under(entry, str(self.root)):
                    mine.append(int(entry.name))
        return mine

    def worker_raylet(self) -> int:
        """The second node's raylet (its socket is ``raylet.<n>``; the head's is ``raylet``)."""
        for pid in self.pids():
            try:
                cmd = (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "/raylet/raylet\0" in cmd and "sockets/raylet\0" not in cmd:
                return pid
        raise RuntimeError("the second node's raylet is not running")

    def stop(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _tagged(proc: Path, tag: bytes) -> bool:
    try:
        return tag in (proc / "environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _has_open_under(proc: Path, folder: str) -> bool:
    try:
        return any(os.readlink(fd).startswith(folder) for fd in (proc / "fd").iterdir())
    except OSError:
        return False


class _connected:
    """ray.init for a moment, unless this process is already connected."""

    def __init__(self, address: str):
        self.address = address
        self.mine = False

    def __enter__(self):
        import ray

        if not ray.is_initialized():
            ray.init(address=self.address, logging_level="ERROR", log_to_driver=False)
            self.mine = True

    def __exit__(self, *exc):
        import ray

        if self.mine:
            ray.shutdown()
