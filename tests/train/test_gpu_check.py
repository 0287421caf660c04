"""bench/gpu_check.py, the prepared GPU check, run at tiny sizes on the CPU (under the imitations
of tests/gpu_imitation.py), so that the one command a GPU machine gets still works."""

import json
import subprocess
import sys

import pytest

from helpers.common import ROOT


@pytest.mark.slow
def test_the_gpu_check_runs_every_step_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--tiny", "--out", str(out), "--work", str(tmp_path / "w")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["step"]: r for r in result["rows"]}
    assert list(rows) == ["data", "train_bf16_gan", "train_fp16_overflow", "vq_bf16_train", "vq_bf16_tokens",
                          "encode_fp32", "encode_bf16", "evaluate", "ray_encode"]
    assert rows["train_bf16_gan"]["steps"] == 6 and rows["train_bf16_gan"]["skipped"] == 0
    fp16 = rows["train_fp16_overflow"]
    assert fp16["steps"] == 6 and fp16["overflows"] >= 2 and fp16["loss_scale"] <= 2.0**14  # two halvings at least
    vq = rows["vq_bf16_tokens"]
    assert vq["agree_lookup"] == 1.0 and vq["tokens"] > 0 and vq["agree_bf16_lookup"] < 1.0
    assert rows["encode_bf16"]["images"] == rows["encode_fp32"]["images"] > 0
    assert abs(rows["encode_bf16"]["psnr_cost_vs_fp32"]) < 1.0
    assert rows["evaluate"]["psnr"] > 5
    assert rows["ray_encode"]["same_bytes_as_local"] and rows["ray_encode"]["half_refused_in_task"]
    assert "| train_fp16_overflow |" in proc.stdout  # the table
