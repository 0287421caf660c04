"""How many processes a stage runs, and how the train stage starts them with accelerate.

``dvc repro`` runs ``python stages/train.py ...``; with more than one process wanted, that command
re-runs itself under ``accelerate launch`` (one process per GPU, DDP), waits, and exits with its
status. Already under a launcher (``accelerate launch``/``torchrun`` set ``WORLD_SIZE``), e.g. a
multi-node job started by hand, it runs as the rank it was given.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys


def resolve_processes(setting: str) -> int:
    """``auto``: one process per visible GPU, one on a CPU-only machine; else the number given."""
    if setting == "auto":
        import torch

        return max(1, torch.cuda.device_count())
    return int(setting)


def launched() -> bool:
    """True inside a distributed launcher's worker (accelerate launch, torchrun)."""
    return "WORLD_SIZE" in os.environ


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def available_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_threads_per_process(cpu_threads: int, num_processes: int) -> int:
    """``train.cpu_threads`` shared among a CPU run's processes (0: the cores shared)."""
    total = cpu_threads or available_cores()
    return max(1, total // num_processes)


def launch_command(num_processes: int, mixed_precision: str, script_argv: list[str], cpu: bool,
                   cpu_threads: int = 0) -> tuple[list[str], dict]:
    """The ``accelerate launch`` command line and environment for ``num_processes`` local processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
           "--num_processes", str(num_processes), "--mixed_precision", mixed_precision,
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()), *script_argv]
    env = dict(os.environ)
    if cpu:
        # Without this, --multi_gpu on a machine with no GPU starts unsynchronised copies;
        # with it, accelerate sets up gloo DDP on the CPU.
        env["ACCELERATE_USE_CPU"] = "true"
        env["OMP_NUM_THREADS"] = str(cpu_threads_per_process(cpu_threads, num_processes))
    else:
        # torch's launcher gives each process one OpenMP thread unless told: the host-side work of
        # a GPU process (decoding in the main process, the optimizer's CPU ops) gets its share of the
        # cores instead. A value the user set is kept.
        env.setdefault("OMP_NUM_THREADS", str(cpu_threads_per_process(0, num_processes)))
    return cmd, env


def relaunch(num_processes: int, mixed_precision: str, script_argv: list[str], cpu_threads: int = 0) -> int:
    """Run ``script_argv`` under accelerate with ``num_processes`` processes; its exit status.

    SIGTERM/SIGINT (dvc stopping, Ctrl-C) are passed on, so no worker outlives the stage.
    """
    import torch

    cmd, env = launch_command(num_processes, mixed_precision, script_argv, cpu=not torch.cuda.is_available(),
                              cpu_threads=cpu_threads)
    print(f"launching {num_processes} processes: {' '.join(cmd)}", flush=True)
    child = subprocess.Popen(cmd, env=env)

    def forward(signum, _frame):
        child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    return child.wait()


# What a CPU run's floats depend on besides the thread count: the kernels torch, oneDNN and MKL pick
# for the CPU. These variables hold all three to AVX2 (docs/reproducibility.md: What reproduces);
# the stages never set them.
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")


def environment() -> dict:
    """What a run's numbers depend on: device, CPU model and the instruction set torch uses,
    the kernel variables set, threads, torch's version (for run_info.json)."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "cpu": cpu,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "kernel_variables": {k: os.environ[k] for k in KERNEL_VARIABLES if k in os.environ},
            "torch": torch.__version__}
