"""Real 2-process DDP training on the CPU (gloo), launched by the stage's own launcher."""

import json
import subprocess
import sys

from ldm_vae.train.training import lr_lambda

from helpers.common import ROOT, curve, make_params


def test_two_process_training_syncs_weights_splits_data_and_writes_once(pipeline_dir, tmp_path):
    proc = subprocess.run([sys.executable, "tests/train/dist_worker.py", str(tmp_path), str(pipeline_dir / "prepared")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"record{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    # Every forward of training went through the DDP wrapper (2 micro-batches a step, steps 2-4).
    assert r0["wrapper"] == r1["wrapper"] == "DistributedDataParallel"
    assert r0["ddp_forwards"] == r1["ddp_forwards"] == 3 * 2
    # The ranks trained on different images at every step...
    assert len(r0["batch"]) == 4 and all(a != b for a, b in zip(r0["batch"], r1["batch"]))
    # ...and hold bit-identical weights (autoencoder, log-variance, discriminator) after every step.
    assert r0["weights"] == r1["weights"] and len(set(r0["weights"])) == 4
    # Rank 0 wrote the outputs; rank 1 wrote nothing but its own RNG state into the checkpoints.
    assert (tmp_path / "rank0" / "vae" / "config.json").exists()
    assert sorted(p.name for p in (tmp_path / "rank0" / "logs" / "samples").iterdir()) == [
        "step-00000002.png", "step-00000004.png"]
    rank1 = sorted(str(p.relative_to(tmp_path / "rank1")) for p in (tmp_path / "rank1").rglob("*") if p.is_file())
    assert rank1 == ["ckpt/step-00000002/random_states_1.pkl", "ckpt/step-00000004/random_states_1.pkl"]
    # The LR schedule counts optimizer steps, not steps times processes.
    params = make_params(train={"max_steps": 4, "warmup_steps": 2})
    lrs = curve(tmp_path / "rank0" / "logs", "train/lr")
    assert [round(v, 9) for _, v in lrs] == [round(params.train.lr * lr_lambda(params.train)(s), 9) for s, _ in lrs]
    # The curves are means over both ranks: 4 logged steps, each once.
    assert [s for s, _ in curve(tmp_path / "rank0" / "logs", "train/d_loss")] == [2, 3, 4]


def test_train_stage_launches_its_own_processes(pipeline_dir, tmp_path):
    """`train.num_processes: 2` in params.yaml: the stage command itself starts 2 DDP processes."""
    from helpers.common import write_params

    write_params(tmp_path / "params.yaml", train={"num_processes": 2, "max_steps": 4, "batch_size": 2})
    proc = subprocess.run([sys.executable, "stages/train.py", "--params", str(tmp_path / "params.yaml"),
                           "--prepared", str(pipeline_dir / "prepared"), "--vae", str(tmp_path / "vae"),
                           "--logs", str(tmp_path / "logs"), "--checkpoints", str(tmp_path / "ck")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "launching 2 processes" in proc.stdout and "on 2 process(es)" in proc.stdout
    metrics = json.loads((tmp_path / "logs" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == 4
    assert sorted(p.name for p in (tmp_path / "ck" / "step-00000004").glob("random_states_*.pkl")) == [
        "random_states_0.pkl", "random_states_1.pkl"]


def test_two_process_vq_training_keeps_one_codebook(pipeline_dir, tmp_path):
    """A VQ autoencoder under real 2-process DDP (with the PatchGAN): the ranks see different images,
    yet after every step hold bit-identical weights, codebook, moving averages and use counts (the
    counts and sums are all-reduced, re-seeded codes come from rank 0); rank 0 exports a VQModel."""
    from diffusers import VQModel

    proc = subprocess.run([sys.executable, "tests/train/dist_worker.py", str(tmp_path), str(pipeline_dir / "prepared"),
                           "vq"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"record{r}.json").read_text()) for r in (0, 1))
    assert r0["wrapper"] == r1["wrapper"] == "DistributedDataParallel"
    assert all(a != b for a, b in zip(r0["batch"], r1["batch"]))
    assert r0["weights"] == r1["weights"] and len(set(r0["weights"])) == 4
    assert VQModel.from_pretrained(tmp_path / "rank0" / "vae").config.num_vq_embeddings == 16
    assert len(curve(tmp_path / "rank0" / "logs", "train/codebook_used")) == 4
