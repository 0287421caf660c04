"""What a person watches during training: dvclive curves, sample grids, the run summary.

Only the main process writes. Layout under the log folder (``dvc plots show`` reads the curves):

    plots/metrics/train/<name>.tsv   loss, nll, kl, lpips, g_adv, d_weight, d_loss, logits_real,
                                     logits_fake, lr, grad_norm, skipped_steps ...
    plots/metrics/val/<name>.tsv     psnr, and the validation reconstruction loss
    samples/step-<n>.png             originals | reconstructions of fixed validation images
    metrics.json                     the last values and the run summary (steps, factors)
    curves.png                       training loss and validation PSNR, for offline eyes
    run_info.json                    train_seconds, mean images/s, resumed, environment (device, CPU,
                                     instruction set, threads, torch; not a stage output, not in git)
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from dvclive import Live

from ..files import atomic_write
from ..metrics import psnr, to_unit
from ..viz import save_curves, save_grid

# Times and speeds differ run to run, so they stay out of the files git and DVC compare (metrics.json,
# the curves): a re-run of the same data, params and code leaves the working tree clean.
# run_info.json is no stage output and is ignored by git.
RUN_INFO_FILE = "run_info.json"
CURVES_FILE = "curves.png"
# "resumed": a re-run of a finished run only re-exports. "environment": what the weights depend on
# (device, CPU and its instruction set, threads, torch): it differs machine to machine.
RUN_INFO = ("train_seconds", "resumed", "environment")
SPEEDS = ("train/images_per_s",)


class _FilesOnlyLive(Live):
    """dvclive writing its files and nothing else.

    Its DVC integration opens the repository from inside the running stage (it also runs
    ``dvc init`` in a git repo that has none, and fails in one with no commit yet); none of it is
    needed when dvc.yaml declares the plots, so it is skipped.
    """

    def _init_dvc(self):
        pass


class TrainLog:
    def __init__(self, log_dir: Path, enabled: bool, resume_step: int | None):
        """``resume_step``: the step a resumed run restarts from (None: a fresh run)."""
        self.dir = Path(log_dir)
        self.live = None
        self.speeds: list[float] = []
        if not enabled:
            return
        if resume_step is None:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            self._truncate(resume_step)
        (self.dir / "samples").mkdir(parents=True, exist_ok=True)
        # No dvc.yaml edits, no experiment commits, no report: the stage's dvc.yaml declares the
        # plots, and `dvc exp run` already records the experiment.
        self.live = _FilesOnlyLive(dir=str(self.dir), resume=resume_step is not None, save_dvc_exp=False,
                                   dvcyaml=None, report=None)

    def _truncate(self, step: int) -> None:
        """Drop rows logged after the checkpoint being resumed: a curve never holds a step twice."""
        for tsv in (self.dir / "plots" / "metrics").rglob("*.tsv"):
            with open(tsv, newline="") as f:
                rows = list(csv.reader(f, delimiter="\t"))
            keep = [rows[0]] + [r for r in rows[1:] if int(r[0]) <= step] if rows else []
            with open(tsv, "w", newline="") as f:
                csv.writer(f, delimiter="\t", lineterminator="\n").writerows(keep)  # as dvclive writes
        for png in (self.dir / "samples").glob("step-*.png"):
            if int(png.stem.split("-")[1]) > step:
                png.unlink()

    def log(self, step: int, values: dict) -> None:
        """``values``: {"train/loss": 0.1, "val/psnr": 20.3, ...}: one row per key at ``step``
        (speeds go to run_info.json instead)."""
        if self.live is None:
            return
        self.live.step = step
        for name, value in values.items():
            if name in SPEEDS:
                self.speeds.append(float(value))
            else:
                self.live.log_metric(name, round(float(value), 6))

    def grid(self, step: int, originals, recs) -> None:
        if self.live is not None:
            scores = psnr(to_unit(recs), to_unit(originals))  # [N] dB
            save_grid([originals, recs], self.dir / "samples" / f"step-{step:08d}.png",
                      titles=["original", f"step {step}"], captions=[[], [f"{v:.2f} dB" for v in scores.tolist()]])

    def _curves_png(self) -> None:
        """curves.png: training loss and validation PSNR over the whole run (resumes included)."""
        panels = []
        for name, title in (("train/loss", "training loss"), ("val/psnr", "validation PSNR (dB)")):
            tsv = self.dir / "plots" / "metrics" / f"{name}.tsv"
            if tsv.is_file():
                with open(tsv, newline="") as f:
                    rows = list(csv.reader(f, delimiter="\t"))[1:]
                panels.append((title, [int(r[0]) for r in rows], [float(r[1]) for r in rows]))
        if panels:
            save_curves(panels, self.dir / CURVES_FILE)

    def finish(self, summary: dict) -> None:
        """metrics.json: dvclive's last values plus ``summary`` (steps, latent factors); the
        times to run_info.json."""
        if self.live is None:
            return
        info = {k: summary[k] for k in RUN_INFO if k in summary}
        if self.speeds:
            info["images_per_s"] = round(sum(self.speeds) / len(self.speeds), 1)
        atomic_write(self.dir / RUN_INFO_FILE, json.dumps(info, indent=2) + "\n")
        self._curves_png()
        self.live.summary.update({k: v for k, v in summary.items() if k not in RUN_INFO})
        if "steps" in summary:  # resumed from the final checkpoint, dvclive would say one step more
            self.live.step = summary["steps"]
        self.live.make_summary()
        self.live.end()
