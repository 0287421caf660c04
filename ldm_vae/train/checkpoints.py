"""Resumable training state: accelerate ``save_state`` folders tagged with what shaped the run.

``<ckpt_dir>/step-<n>/`` holds the models, both optimizers and schedulers and every rank's RNG
state (accelerate's files; it loads them with ``weights_only=True``), the EMA weights as
safetensors and the step counter as JSON. Nothing here is ever unpickled: accelerate's own
custom-object files would be (``weights_only=False``), so the EMA and the counter are not
registered with it. ``run.json`` is written last, by the main process, with the hash of the
params, data and code that shaped the run: a folder without it is an interrupted save, and a
folder with another hash belongs to another run; neither is ever resumed.

Only step folders that carry this project's marker file are ever deleted: whatever else sits in
the checkpoints folder is left alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

KEEP_CHECKPOINTS = 2
MARKER = ".ldm-vae-checkpoint"  # written before anything else in a step folder: ours to delete
EMA_FILE, EMA_META, PROGRESS_FILE = "ema.safetensors", "ema.json", "progress.json"


class Progress:
    """The optimizer-step counter, checkpointed with the models so a resumed run knows where it is."""

    def __init__(self):
        self.step = 0
        self.skipped = 0  # non-finite steps skipped so far (logged), fp16 overflows included
        self.overflows = 0  # of which fp16 GradScaler overflows (ldm_vae/precision.py)
        self.seconds = 0.0  # training time up to this checkpoint, over every resumed run

    def state_dict(self):
        return {"step": self.step, "skipped": self.skipped, "overflows": self.overflows, "seconds": self.seconds}

    def load_state_dict(self, state):
        self.step = int(state["step"])
        self.skipped = int(state.get("skipped", 0))
        self.overflows = int(state.get("overflows", 0))
        self.seconds = float(state.get("seconds", 0.0))


def save_checkpoint(accelerator, ckpt_dir: Path, run_hash: str, step: int, progress: Progress, ema=None) -> None:
    target = Path(ckpt_dir) / f"step-{step:08d}"
    if accelerator.is_main_process:
        target.mkdir(parents=True, exist_ok=True)
        (target / MARKER).write_text("written by ldm-vae's train stage\n")
    accelerator.wait_for_everyone()
    accelerator.save_state(str(target))
    accelerator.wait_for_everyone()  # every rank's RNG file is in place before the tag
    if accelerator.is_main_process:
        if ema is not None:
            _save_ema(ema, target)
        (target / PROGRESS_FILE).write_text(json.dumps(progress.state_dict()))
        (target / "run.json").write_text(json.dumps({"params_hash": run_hash, "step": step}))
        for old in _ours(ckpt_dir)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def resume_latest(accelerator, ckpt_dir: Path, run_hash: str, progress: Progress, ema=None) -> bool:
    """Load the newest complete checkpoint of this run; True if one was. When none matches, the
    step folders this project wrote are deleted (they belong to other params or code)."""
    ckpt_dir = Path(ckpt_dir)
    for folder in reversed(_ours(ckpt_dir)):
        tag = folder / "run.json"
        if tag.exists() and json.loads(tag.read_text()).get("params_hash") == run_hash:
            accelerator.load_state(str(folder))
            progress.load_state_dict(json.loads((folder / PROGRESS_FILE).read_text()))
            if ema is not None:
                _load_ema(ema, folder, accelerator.device)
            accelerator.print(f"resumed from {folder}")
            return True
    accelerator.wait_for_everyone()  # every rank has looked before rank 0 deletes anything
    if accelerator.is_main_process:
        for folder in _ours(ckpt_dir):
            shutil.rmtree(folder, ignore_errors=True)  # other params or code: never resumed, so not kept
    accelerator.wait_for_everyone()
    return False


def _ours(ckpt_dir: Path) -> list[Path]:
    """This project's step folders, oldest first."""
    return sorted(p for p in Path(ckpt_dir).glob("step-*") if (p / MARKER).is_file())


def _save_ema(ema, folder: Path) -> None:
    # [i] -> the i-th shadow parameter, in the model's parameter order
    tensors = {f"shadow.{i:05d}": p.detach().to("cpu").contiguous() for i, p in enumerate(ema.shadow_params)}
    save_file(tensors, str(folder / EMA_FILE))
    meta = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
    (folder / EMA_META).write_text(json.dumps(meta))


def _load_ema(ema, folder: Path, device) -> None:
    tensors = load_file(str(folder / EMA_FILE))
    shadow = [tensors[f"shadow.{i:05d}"] for i in range(len(tensors))]
    if [tuple(t.shape) for t in shadow] != [tuple(p.shape) for p in ema.shadow_params]:
        raise ValueError(f"{folder / EMA_FILE}: its shapes do not match the model")
    state = json.loads((folder / EMA_META).read_text())
    ema.load_state_dict({**state, "shadow_params": [t.to(device) for t in shadow]})

