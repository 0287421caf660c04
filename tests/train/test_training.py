import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL

from ldm_vae.shards import shard_paths
from ldm_vae.train.training import lr_lambda, train

from helpers.common import curve, make_params


def test_train_exports_a_diffusers_vae_with_measured_scale(pipeline_dir):
    vae = AutoencoderKL.from_pretrained(pipeline_dir / "vae")  # diffusers alone, no project code
    assert vae.config.latent_channels == 4
    assert vae.config.scaling_factor != 0.18215 and vae.config.scaling_factor > 0
    stats = json.loads((pipeline_dir / "vae" / "latent_stats.json").read_text())
    assert abs(stats["scaling_factor"] - vae.config.scaling_factor) < 1e-9
    assert abs(stats["shift_factor"] - vae.config.shift_factor) < 1e-9
    # The factors really normalise the training latents (checked here on the export images).
    metrics = json.loads((pipeline_dir / "train" / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["vae_scaling_factor"] == vae.config.scaling_factor


def test_train_writes_curves_and_sample_grids(pipeline_dir):
    logs = pipeline_dir / "train"
    assert [s for s, _ in curve(logs, "train/loss")] == [2, 4, 6]
    for name in ("rec_l1", "nll", "kl", "lr", "grad_norm", "skipped_steps", "posterior_std"):
        assert len(curve(logs, f"train/{name}")) == 3, name
    # Times stay out of what git and DVC compare: no speed curve, no seconds in metrics.json.
    assert not (logs / "plots" / "metrics" / "train" / "images_per_s.tsv").exists()
    timing = json.loads((logs / "run_info.json").read_text())
    assert timing["train_seconds"] > 0 and timing["images_per_s"] > 0
    val = curve(logs, "val/psnr")
    assert [s for s, _ in val] == [3, 6] and val[-1][1] > 0 and len(curve(logs, "val/rec_l1")) == 2
    assert sorted(p.name for p in (logs / "samples").iterdir()) == ["step-00000003.png", "step-00000006.png"]
    metrics = json.loads((logs / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["train"]["loss"] == curve(logs, "train/loss")[-1][1]


def test_a_run_repeats_byte_for_byte_and_records_what_it_depends_on(pipeline_dir, tmp_path):
    """Same data, params, code, CPU kind and train.cpu_threads: the same weights, byte for byte (the
    session's pipeline trained the first copy, earlier, in another state of this process)."""
    tr, va = shard_paths(pipeline_dir / "prepared" / "train"), shard_paths(pipeline_dir / "prepared" / "val")
    result = train(make_params(data={"source": "folder:unused"}), tr, va, tmp_path / "vae", tmp_path / "logs",
                   tmp_path / "ckpt")
    assert result["resumed"] is False
    name = "diffusion_pytorch_model.safetensors"
    assert (tmp_path / "vae" / name).read_bytes() == (pipeline_dir / "vae" / name).read_bytes()
    env = json.loads((tmp_path / "logs" / "run_info.json").read_text())["environment"]
    assert env["device"] == "cpu" and env["threads"] == 2 and env["torch"] == torch.__version__
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and env["cpu"]
    # Machine-specific, so never in what git and DVC compare.
    assert "environment" not in json.loads((tmp_path / "logs" / "metrics.json").read_text())


def test_lr_warms_up_then_decays_to_floor():
    cfg = make_params(train={"max_steps": 100, "warmup_steps": 10, "lr_min_ratio": 0.1}).train
    f = lr_lambda(cfg)
    assert f(0) == 0.1 and f(9) == 1.0
    assert f(10) == 1.0 and abs(f(100) - 0.1) < 1e-9 and f(55) < f(20)


def test_killed_run_resumes_from_checkpoint_and_ends_at_same_step(pipeline_dir, tmp_path):
    params = make_params(data={"source": "folder:unused"})
    tr, va = shard_paths(pipeline_dir / "prepared" / "train"), shard_paths(pipeline_dir / "prepared" / "val")
    # A run of 6 steps that "died" after its step-4 checkpoint: copy that state only.
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copytree(pipeline_dir / "checkpoints" / "step-00000004", ckpt / "step-00000004")
    shutil.copytree(pipeline_dir / "train", tmp_path / "logs")  # its curves went on past step 4
    result = train(params, tr, va, tmp_path / "vae", tmp_path / "logs", ckpt)
    assert result["resumed"] is True and result["steps"] == 6
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000004", "step-00000006"]
    # The curves hold every step once: rows after the checkpoint were dropped, then re-logged.
    assert [s for s, _ in curve(tmp_path / "logs", "train/loss")] == [2, 4, 6]
    assert [s for s, _ in curve(tmp_path / "logs", "val/psnr")] == [3, 6]


def test_checkpoint_from_other_params_is_never_resumed(pipeline_dir, tmp_path):
    params = make_params(train={"lr": 5e-4})  # differs from the run that wrote the checkpoint
    tr, va = shard_paths(pipeline_dir / "prepared" / "train"), shard_paths(pipeline_dir / "prepared" / "val")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(pipeline_dir / "checkpoints", ckpt)
    result = train(params, tr, va, tmp_path / "vae", tmp_path / "logs", ckpt)
    assert result["resumed"] is False and result["steps"] == 6
    assert [s for s, _ in curve(tmp_path / "logs", "train/loss")] == [2, 4, 6]  # trained from step 0


class _Payload:
    """A pickle that, if ever unpickled, creates a file: proof that code ran."""

    def __init__(self, proof):
        self.proof = str(proof)

    def __reduce__(self):
        return (open, (self.proof, "w"))


def test_resume_never_unpickles_crafted_files(pipeline_dir, tmp_path):
    import pickle

    import pytest

    params = make_params(data={"source": "folder:unused"})
    tr, va = shard_paths(pipeline_dir / "prepared" / "train"), shard_paths(pipeline_dir / "prepared" / "val")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(pipeline_dir / "checkpoints" / "step-00000004", ckpt / "step-00000004")
    proof = tmp_path / "payload-ran"
    # accelerate's custom-object files (the old way to save the EMA and the counter) are refused...
    for i in range(2):
        (ckpt / "step-00000004" / f"custom_checkpoint_{i}.pkl").write_bytes(pickle.dumps(_Payload(proof)))
    with pytest.raises(RuntimeError, match="custom checkpoints in folder .*step-00000004"):
        train(params, tr, va, tmp_path / "vae", tmp_path / "logs", ckpt)
    assert not proof.exists()
    # ...the folder without them resumes...
    for i in range(2):
        (ckpt / "step-00000004" / f"custom_checkpoint_{i}.pkl").unlink()
    assert train(params, tr, va, tmp_path / "vae", tmp_path / "logs", ckpt)["resumed"] is True
    # ...and a crafted optimizer file beside a matching run.json is refused, not run.
    shutil.rmtree(ckpt)
    shutil.copytree(pipeline_dir / "checkpoints" / "step-00000004", ckpt / "step-00000004")
    torch.save({"state": _Payload(proof)}, ckpt / "step-00000004" / "optimizer.bin")
    with pytest.raises(Exception, match="[Ww]eights only|weights_only|Unsupported global"):
        train(params, tr, va, tmp_path / "vae2", tmp_path / "logs2", ckpt)
    assert not proof.exists()


def test_a_fresh_run_deletes_only_its_own_step_folders(pipeline_dir, tmp_path):
    params = make_params(train={"lr": 5e-4})  # not the run that wrote the checkpoints
    tr, va = shard_paths(pipeline_dir / "prepared" / "train"), shard_paths(pipeline_dir / "prepared" / "val")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(pipeline_dir / "checkpoints", ckpt)
    (ckpt / "notes.txt").write_text("the user's")
    (ckpt / "step-99999999").mkdir()
    (ckpt / "step-99999999" / "weights.bin").write_bytes(b"not ours")
    old_tag = json.loads((ckpt / "step-00000006" / "run.json").read_text())["params_hash"]
    result = train(params, tr, va, tmp_path / "vae", tmp_path / "logs", ckpt)
    assert result["resumed"] is False
    assert (ckpt / "notes.txt").read_text() == "the user's"
    assert (ckpt / "step-99999999" / "weights.bin").read_bytes() == b"not ours"
    tags = {json.loads((p / "run.json").read_text())["params_hash"] for p in ckpt.glob("step-0*")}
    assert len(tags) == 1 and old_tag not in tags  # the other run's folders went, this run's are there
    assert (ckpt / "step-00000006" / "ema.safetensors").is_file() and (
        ckpt / "step-00000006" / "progress.json"
    ).is_file()


@pytest.mark.slow
def test_training_fits_a_small_set(tmp_path):
    """Not a toy loop: on four fixed images, a few dozen steps must clearly improve reconstructions."""
    from ldm_vae.images import encode_image
    from ldm_vae.shards import ShardWriter

    from helpers.common import photo

    with ShardWriter(tmp_path / "data", "train", per_shard=100) as w:
        for i in range(40):
            w.write({"__key__": f"k{i:02d}", "png": encode_image(photo(32, 32, seed=i % 4), "png")})
    shards = shard_paths(tmp_path / "data")
    params = make_params(train={"max_steps": 150, "lr": 1e-3, "lr_min_ratio": 1.0, "warmup_steps": 1,
                                "log_every": 10, "val_every": 10, "sample_every": 150,
                                "checkpoint_every": 1000, "ema_decay": 0.0, "batch_size": 4})
    train(params, shards, shards, tmp_path / "vae", tmp_path / "logs", tmp_path / "ckpt")
    psnrs = [v for _, v in curve(tmp_path / "logs", "val/psnr")]
    print(psnrs)
    assert max(psnrs[-3:]) > psnrs[0] + 4.0  # measured: about +7 dB
    assert torch.isfinite(torch.tensor([v for _, v in curve(tmp_path / "logs", "train/loss")])).all()


@pytest.mark.slow
def test_free_bits_keep_channels_that_a_strong_kl_collapses_above_the_floor(tmp_path):
    """KL weight 10 (LDM's meaning) with the posterior starting at std 1: in 80 steps every channel
    collapses to the prior, and latent health flags all four; with free bits of 0.5 nats none does."""
    from ldm_vae.data import load_images
    from ldm_vae.evaluate.health import ChannelStats
    from ldm_vae.export import load_vae
    from ldm_vae.images import encode_image
    from ldm_vae.shards import ShardWriter

    from helpers.common import photo

    with ShardWriter(tmp_path / "data", "train", per_shard=100) as w:
        for i in range(40):
            w.write({"__key__": f"k{i:02d}", "png": encode_image(photo(32, 32, seed=i % 8), "png")})
    shards = shard_paths(tmp_path / "data")
    kl = {}
    for free_bits in (0.0, 0.5):
        params = make_params(model={"logvar_init": 0.0}, loss={"kl_weight": 10.0, "free_bits": free_bits},
                             train={"max_steps": 80, "lr": 1e-3, "lr_min_ratio": 1.0, "warmup_steps": 1,
                                    "log_every": 10, "val_every": 80, "sample_every": 80, "checkpoint_every": 1000,
                                    "ema_decay": 0.0, "batch_size": 4})
        run = tmp_path / f"fb{free_bits}"
        train(params, shards, shards, run / "vae", run / "logs", run / "ckpt")
        _, x = load_images(shards)
        with torch.no_grad():
            post = load_vae(run / "vae").encode(x).latent_dist
        health = ChannelStats()
        health.update(post.mean, post.std)
        kl[free_bits] = health.result()
    assert all(r["collapsed"] for r in kl[0.0])  # measured: KL 0.000 to 0.001 nats per element
    assert not any(r["collapsed"] for r in kl[0.5])
    assert min(r["kl"] for r in kl[0.5]) > 0.2  # measured 0.34 to 0.46: near the floor of 0.5


def _shards(pipeline_dir):
    return shard_paths(pipeline_dir / "prepared" / "train"), shard_paths(pipeline_dir / "prepared" / "val")


GAN = {"disc_weight": 0.5, "disc_start": 2, "disc_channels": 8, "disc_layers": 2}


def test_every_trainable_parameter_is_in_exactly_one_optimizer():
    from ldm_vae.model import TrainedAutoencoder, build_vae
    from ldm_vae.train.losses import build_discriminator
    from ldm_vae.train.training import build_optimizers

    for learn_logvar in (False, True):
        params = make_params(loss={**GAN, "learn_logvar": learn_logvar})
        model = TrainedAutoencoder(build_vae(params.model, 16), learn_logvar=learn_logvar)
        disc = build_discriminator(params.loss)
        opt_ae, opt_d = build_optimizers(model, disc, params)
        in_opt = [id(p) for opt in (opt_ae, opt_d) for g in opt.param_groups for p in g["params"]]
        trainable = [id(p) for m in (model, disc) for p in m.parameters() if p.requires_grad]
        assert sorted(in_opt) == sorted(trainable) and len(set(in_opt)) == len(in_opt)
        assert (id(model.output_logvar) in in_opt) is learn_logvar
        assert {id(p) for p in disc.parameters()} == {id(p) for g in opt_d.param_groups for p in g["params"]}


def test_discriminator_step_sees_detached_reconstructions_and_never_touches_the_autoencoder():
    from accelerate import Accelerator

    from ldm_vae.model import TrainedAutoencoder, build_vae
    from ldm_vae.train.losses import VAELoss, build_discriminator
    from ldm_vae.train.training import _generator_pass

    params = make_params(loss=GAN)
    accelerator = Accelerator(cpu=True)
    model = TrainedAutoencoder(build_vae(params.model, 16))
    disc = build_discriminator(params.loss)
    loss_fn = VAELoss(params.loss)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    logs, rec = _generator_pass(accelerator, model, disc, loss_fn, x, step=5, accum=1)
    assert "train/g_adv" in logs and not rec.requires_grad
    assert all(p.grad is None for p in disc.parameters())  # the generator pass leaves D alone
    assert all(p.requires_grad for p in disc.parameters())  # and unfreezes it afterwards
    ae_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    d_loss, d_logs = loss_fn.discriminator_loss(disc, x, model(x)[0])  # a live graph: detached inside
    d_loss.backward()
    assert all(p.grad is not None for p in disc.parameters())
    after = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(after) == len(ae_grads) and all(torch.equal(a, b) for a, b in zip(ae_grads, after))
    assert {"train/d_loss", "train/logits_real", "train/logits_fake"} <= set(d_logs)


def test_bf16_autocast_keeps_trainable_weights_float32(pipeline_dir, tmp_path):
    weights, activations = [], []

    def check(step, x, accelerator, model):
        inner = accelerator.unwrap_model(model)
        weights.append({p.dtype for p in inner.parameters()})
        if step == 1:  # from now on, record what the decoder's last conv computes in
            inner.vae.decoder.conv_out.register_forward_hook(lambda m, i, o: activations.append(o.dtype))

    from accelerate.state import AcceleratorState

    params = make_params(loss=GAN, train={"mixed_precision": "bf16", "max_steps": 4})
    AcceleratorState._reset_state()  # accelerate keeps one precision per process; this test needs another
    try:
        result = train(params, *_shards(pipeline_dir), tmp_path / "vae", tmp_path / "logs", tmp_path / "ck",
                       on_step=check)
    finally:
        AcceleratorState._reset_state()
    assert weights == [{torch.float32}] * 4  # the trained weights, after every step
    assert len(activations) >= 3 and set(activations) == {torch.bfloat16}  # while the convs ran in bf16
    assert result["steps"] == 4 and torch.isfinite(torch.tensor(curve(tmp_path / "logs", "train/loss")[-1][1]))


def test_adversarial_run_with_accumulation_logs_discriminator_curves(pipeline_dir, tmp_path):
    params = make_params(loss={**GAN, "learn_logvar": True}, train={"grad_accum_steps": 2})
    result = train(params, *_shards(pipeline_dir), tmp_path / "vae", tmp_path / "logs", tmp_path / "ck")
    logs = tmp_path / "logs"
    assert result["steps"] == 6 and [s for s, _ in curve(logs, "train/d_loss")] == [4, 6]  # from disc_start
    for name in ("logits_real", "logits_fake", "d_weight", "g_adv", "d_grad_norm"):
        assert len(curve(logs, f"train/{name}")) >= 2, name
    assert curve(logs, "train/output_logvar")[-1][1] != 0.0  # learned: it moved
    assert json.loads((logs / "run_info.json").read_text())["images_per_s"] > 0


class FlakyPerceptual(torch.nn.Module):
    """A stand-in perceptual distance that returns NaN on chosen calls (one call per micro-batch)."""

    def __init__(self, bad_calls):
        super().__init__()
        self.bad_calls, self.calls = bad_calls, 0

    def forward(self, a, b):
        self.calls += 1
        d = (a - b).abs().mean((1, 2, 3))  # [B]
        return d * float("nan") if self.calls in self.bad_calls else d


def test_nan_guard_skips_bad_steps_and_finishes(pipeline_dir, tmp_path):
    params = make_params(loss={"perceptual_weight": 1.0})
    result = train(params, *_shards(pipeline_dir), tmp_path / "vae", tmp_path / "logs", tmp_path / "ck",
                   perceptual=FlakyPerceptual({3, 4}))
    assert result["steps"] == 6 and result["skipped_steps"] == 2
    assert curve(tmp_path / "logs", "train/skipped_steps")[-1][1] == 2
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert all(torch.isfinite(p).all() for p in vae.parameters())  # no NaN reached the weights


def test_nan_guard_stops_a_diverged_run_with_a_clear_message(pipeline_dir, tmp_path):
    import pytest

    from ldm_vae.train.training import TrainingDiverged

    params = make_params(loss={"perceptual_weight": 1.0}, train={"max_bad_steps": 3})
    with pytest.raises(TrainingDiverged, match=r"3 non-finite steps in a row at step 3 \(train.max_bad_steps: 3\)"):
        train(params, *_shards(pipeline_dir), tmp_path / "vae", tmp_path / "logs", tmp_path / "ck",
              perceptual=FlakyPerceptual(set(range(3, 100))))
    assert (tmp_path / "ck" / "step-00000002" / "run.json").exists()  # the last good checkpoint is kept


def test_train_stage_killed_mid_run_resumes_on_rerun(pipeline_dir, tmp_path):
    """The real stage command, SIGKILLed after its first checkpoint, then run again as dvc would."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from helpers.common import ROOT, TINY

    raw = {k: dict(v) for k, v in TINY.items()}
    raw["train"].update({"max_steps": 200, "checkpoint_every": 10, "log_every": 5, "val_every": 50,
                         "sample_every": 50})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, str(ROOT / "stages/train.py"), "--params", str(tmp_path / "params.yaml"),
           "--prepared", str(pipeline_dir / "prepared"), "--vae", str(tmp_path / "vae"), "--logs",
           str(tmp_path / "logs"), "--checkpoints", str(tmp_path / "ck")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((tmp_path / "ck").glob("step-*/run.json")) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "vae").exists()  # it died before the end
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    metrics = json.loads((tmp_path / "logs" / "metrics.json").read_text())
    assert json.loads((tmp_path / "logs" / "run_info.json").read_text())["resumed"] is True
    assert metrics["steps"] == 200
    assert [s for s, _ in curve(tmp_path / "logs", "train/loss")] == list(range(5, 201, 5))  # each step once


def test_exported_weights_are_the_ema_weights_and_the_checkpoint_keeps_the_trained_ones(pipeline_dir):
    from safetensors.torch import load_file

    ckpt = pipeline_dir / "checkpoints" / "step-00000006"
    shadow = load_file(ckpt / "ema.safetensors")  # shadow.<i>: the i-th parameter's average
    ema = [shadow[f"shadow.{i:05d}"] for i in range(len(shadow))]
    assert not list(ckpt.glob("*.pkl")) or all("random_states" in p.name for p in ckpt.glob("*.pkl"))
    trained = load_file(ckpt / "model.safetensors")  # TrainedAutoencoder: vae.* + output_logvar
    exported = AutoencoderKL.from_pretrained(pipeline_dir / "vae").state_dict()
    names = [k for k, _ in AutoencoderKL.from_pretrained(pipeline_dir / "vae").named_parameters()]
    assert len(ema) == len(names)
    for name, shadow in zip(names, ema):
        assert torch.equal(exported[name], shadow), name
    assert any(not torch.equal(exported[n], trained[f"vae.{n}"]) for n in names)  # EMA != raw weights
