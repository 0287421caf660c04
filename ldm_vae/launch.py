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


def launch_command(num_processes: int, mixed_precision: str, script_argv: list[str], cpu: bool) -> tuple[list[str], dict]:
    """The ``accelerate launch`` command line and environment for ``num_processes`` local processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
           "--num_processes", str(num_processes), "--mixed_precision", mixed_precision,
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()), *script_argv]
    env = dict(os.environ)
    if cpu:
        # Without this, --multi_gpu on a machine with no GPU starts unsynchronised copies;
        # with it, accelerate sets up gloo DDP on the CPU.
        env["ACCELERATE_USE_CPU"] = "true"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    return cmd, env


def relaunch(num_processes: int, mixed_precision: str, script_argv: list[str]) -> int:
    """Run ``script_argv`` under accelerate with ``num_processes`` processes; its exit status.

    SIGTERM/SIGINT (dvc stopping, Ctrl-C) are passed on, so no worker outlives the stage.
    """
    import torch

    cmd, env = launch_command(num_processes, mixed_precision, script_argv, cpu=not torch.cuda.is_available())
    print(f"launching {num_processes} processes: {' '.join(cmd)}", flush=True)
    child = subprocess.Popen(cmd, env=env)

    def forward(signum, _frame):
        child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    return child.wait()
