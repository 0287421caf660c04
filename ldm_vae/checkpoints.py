"""Resumable training state: accelerate ``save_state`` folders tagged with what shaped the run.

``<ckpt_dir>/step-<n>/`` holds the models, the EMA, both optimizers and schedulers, the step
counter and every rank's RNG state. ``run.json`` is written last, by the main process, with the
hash of the params (and training data) that shaped the run: a folder without it is an interrupted
save, and a folder with another hash belongs to other params; neither is ever resumed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

KEEP_CHECKPOINTS = 2


class Progress:
    """The optimizer-step counter, checkpointed with the models so a resumed run knows where it is."""

    def __init__(self):
        self.step = 0
        self.skipped = 0  # non-finite steps skipped so far (logged)
        self.seconds = 0.0  # training time up to this checkpoint, over every resumed run

    def state_dict(self):
        return {"step": self.step, "skipped": self.skipped, "seconds": self.seconds}

    def load_state_dict(self, state):
        self.step = int(state["step"])
        self.skipped = int(state.get("skipped", 0))
        self.seconds = float(state.get("seconds", 0.0))


def save_checkpoint(accelerator, ckpt_dir: Path, run_hash: str, step: int) -> None:
    target = Path(ckpt_dir) / f"step-{step:08d}"
    accelerator.save_state(str(target))
    accelerator.wait_for_everyone()  # every rank's RNG file is in place before the tag
    if accelerator.is_main_process:
        (target / "run.json").write_text(json.dumps({"params_hash": run_hash, "step": step}))
        for old in sorted(Path(ckpt_dir).glob("step-*"))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def resume_latest(accelerator, ckpt_dir: Path, run_hash: str) -> bool:
    """Load the newest complete checkpoint written under the same params; True if one was."""
    ckpt_dir = Path(ckpt_dir)
    for folder in sorted(ckpt_dir.glob("step-*"), reverse=True):
        tag = folder / "run.json"
        if tag.exists() and json.loads(tag.read_text()).get("params_hash") == run_hash:
            accelerator.load_state(str(folder))
            accelerator.print(f"resumed from {folder}")
            return True
    accelerator.wait_for_everyone()  # every rank has looked before rank 0 deletes anything
    if accelerator.is_main_process and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)  # written under other params: never resumed, so not kept
    accelerator.wait_for_everyone()
    return False
