"""The train stage's GPU-only paths, run on the CPU by imitation (tests/gpu_imitation.py): fp16
with a GradScaler (both optimizers, overflows), the adaptive GAN weight in fp16, the VQ lookup
under bf16 autocast, a skipped step and the codebook, validation beside a device the VAE is not on,
TF32 and the launcher's threads."""

import json

import torch
from diffusers import AutoencoderKL

from ldm_vae.shards import shard_paths
from ldm_vae.train.training import train

from helpers.common import curve, make_params
from helpers.gpu_imitation import elsewhere, fp16_on_cpu, fresh_precision, inject_overflows

GAN = {"disc_weight": 0.5, "disc_start": 2, "disc_channels": 8, "disc_layers": 2}


def _shards(pipeline_dir):
    return shard_paths(pipeline_dir / "prepared" / "train"), shard_paths(pipeline_dir / "prepared" / "val")


def _outs(tmp_path):
    return tmp_path / "vae", tmp_path / "logs", tmp_path / "ck"


def test_fp16_with_the_discriminator_steps_both_optimizers_through_one_scaler(pipeline_dir, tmp_path, monkeypatch):
    """The discriminator switched on at step 2 under fp16: each optimizer is unscaled once a step
    (a second unscale raised at disc_start), both step, the scale is updated once a step."""
    disc_weights = []

    def watch(step, x, accelerator, model):
        if step in (1, 4):  # the discriminator before it is on, and after two of its steps
            disc = accelerator._models[1]
            disc_weights.append([p.detach().clone() for p in disc.parameters()])

    params = make_params(loss=GAN, train={"mixed_precision": "fp16", "max_steps": 4, "log_every": 1})
    with fp16_on_cpu(monkeypatch) as scalers:
        result = train(params, *_shards(pipeline_dir), *_outs(tmp_path), on_step=watch)
    assert result["steps"] == 4 and result["skipped_steps"] == result["overflow_steps"]
    before, after = disc_weights
    assert any(not torch.equal(a, b) for a, b in zip(before, after))  # the discriminator trained
    scale = curve(tmp_path / "logs", "train/loss_scale")
    assert len(scale) == 4 and scale[-1][1] == scalers[0].get_scale() > 1  # one update a step, no halving for nothing
    assert [s for s, _ in curve(tmp_path / "logs", "train/d_weight")] == [3, 4]  # on from step 2 (0-based)
    assert all(0 < w < 1e4 * GAN["disc_weight"] for _, w in curve(tmp_path / "logs", "train/d_weight"))


def test_fp16_overflows_are_skipped_with_the_scale_lowered_and_the_run_goes_on(pipeline_dir, tmp_path, monkeypatch):
    """Two steps whose scaled gradients overflow (an inf gradient, at the 2nd and 4th backward)
    with max_bad_steps 1: each is skipped, the scale halved, and the run still ends at its last step."""
    params = make_params(train={"mixed_precision": "fp16", "max_steps": 6, "max_bad_steps": 1, "log_every": 1})
    inject_overflows(monkeypatch, {2, 4})
    with fp16_on_cpu(monkeypatch, init_scale=1024.0) as scalers:
        result = train(params, *_shards(pipeline_dir), *_outs(tmp_path))
    assert result["steps"] == 6 and result["overflow_steps"] == 2 and result["skipped_steps"] == 2
    assert scalers[0].get_scale() == 256.0  # halved twice (growth only after 2000 good steps)
    logs = tmp_path / "logs"
    assert curve(logs, "train/overflow_steps")[-1][1] == 2 and curve(logs, "train/loss_scale")[-1][1] == 256.0
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert all(torch.isfinite(p).all() for p in vae.parameters())  # nothing non-finite reached the weights


def test_a_non_finite_loss_under_fp16_still_counts_as_a_bad_step(pipeline_dir, tmp_path, monkeypatch):
    """A NaN loss is not an overflow: max_bad_steps stops the run as without a scaler."""
    import pytest

    from ldm_vae.train.training import TrainingDiverged

    class NaNPerceptual(torch.nn.Module):
        def forward(self, a, b):
            return (a - b).abs().mean((1, 2, 3)) * float("nan")

    params = make_params(loss={"perceptual_weight": 1.0}, train={"mixed_precision": "fp16", "max_bad_steps": 2})
    with fp16_on_cpu(monkeypatch), pytest.raises(TrainingDiverged, match="2 non-finite steps in a row at step 1"):
        train(params, *_shards(pipeline_dir), *_outs(tmp_path), perceptual=NaNPerceptual())


def test_the_adaptive_weight_does_not_underflow_in_fp16():
    """Gradients of a per-pixel mean loss through a float16 last layer: unscaled they flush to
    zero in float16; at the loss scale they give the float32 weight."""
    from ldm_vae.train.losses import adaptive_weight

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 3, 3, padding=1)
    h = torch.randn(4, 32, 64, 64)
    target = torch.rand(4, 3, 64, 64)

    def weight(scale, fp16):
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            rec = conv(h)
            nll = (rec.float() - target).abs().mean() * 1e-3
            adv = -rec.float().mean() * 1e-3
            return float(adaptive_weight(nll, adv, conv.weight, scale))

    exact = weight(1.0, fp16=False)
    assert abs(weight(2.0**16, fp16=True) / exact - 1) < 0.02
    assert abs(weight(1.0, fp16=True) / exact - 1) > 0.1  # what the unscaled fp16 gradients gave


def test_vq_tokens_under_bf16_autocast_are_the_fp32_nearest_codes_encode_stores():
    """Training's lookup under bf16 autocast picks the float32 nearest code: the token encode
    stores for the same latent (encode looks codes up in float32 under its autocast too)."""
    from ldm_vae.encode.latents import _vq_fields
    from ldm_vae.model import TrainedAutoencoder, build_vae
    from ldm_vae.vq import build_quantizer, nearest

    params = make_params(model={"regularizer": "vq", "codebook_size": 512}, loss={"vq_beta": 0.25})
    torch.manual_seed(0)
    vae = build_vae(params.model, sample_size=32)
    model = TrainedAutoencoder(vae, quantizer=build_quantizer(params)).eval()  # eval: no codebook update
    x = torch.rand(8, 3, 64, 64) * 2 - 1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        trained = model(x)[2].tokens  # [B, h, w]
        stored = _vq_fields(vae, x, prequant=False)["tokens"]
        h = vae.encode(x).latents.float()  # [B, D, h, w], as both saw it
    fp32 = nearest(h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]), vae.quantize.embedding.weight.float())
    assert torch.equal(trained.flatten(), fp32) and torch.equal(stored.flatten(), fp32)


def test_a_non_finite_step_leaves_the_vq_codebook_as_it_was(pipeline_dir, tmp_path):
    """A NaN encoder output at step 3 reached the moving averages in the forward, before the
    guard; the skipped step restores the codebook, and the run ends at its last step."""
    from diffusers import VQModel

    from ldm_vae.train import training

    params = make_params(model={"regularizer": "vq", "codebook_size": 64},
                         loss={"vq_beta": 0.25, "codebook_update": "ema", "codebook_decay": 0.9})
    calls = {"n": 0}
    codebooks = {}

    def nan_once(module, inputs, output):
        if module.training:
            calls["n"] += 1
            if calls["n"] == 3:
                return output * float("nan")
        return output

    def watch(step, x, accelerator, model):
        inner = accelerator.unwrap_model(model)
        if step == 2 and not inner.vae.quant_conv._forward_hooks:
            inner.vae.quant_conv.register_forward_hook(nan_once)
            calls["n"] = 2
        codebooks[step] = inner.vae.quantize.embedding.weight.detach().clone()

    result = training.train(params, *_shards(pipeline_dir), *_outs(tmp_path), on_step=watch)
    assert result["steps"] == 6 and result["skipped_steps"] == 1
    assert all(torch.isfinite(c).all() for c in codebooks.values())
    assert torch.isfinite(VQModel.from_pretrained(tmp_path / "vae").quantize.embedding.weight).all()


def test_validation_runs_where_the_vae_is_not_where_the_accelerator_points():
    """A CUDA Accelerator beside a VAE loaded on the CPU (model.use_as_is on a GPU machine): the
    images go to the VAE's device."""
    from accelerate import Accelerator

    from ldm_vae.train.training import validate_vae

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), norm_num_groups=2, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4).eval()
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    plain = validate_vae(Accelerator(cpu=True), vae, None, images)
    moved = validate_vae(elsewhere(Accelerator(cpu=True)), vae, None, images)
    assert torch.equal(plain[0], moved[0]) and plain[1] == moved[1]


def test_tf32_is_a_param_and_off_where_results_are_called_fp32():
    from ldm_vae.precision import set_tf32
    from ldm_vae.train.training import make_accelerator

    conv = torch.backends.cudnn.conv
    with fresh_precision():
        make_accelerator(make_params(train={"tf32": True}).train)
        assert conv.fp32_precision == "tf32" and torch.backends.cuda.matmul.fp32_precision == "tf32"
        make_accelerator(make_params().train)
        assert conv.fp32_precision == "ieee" and torch.backends.cuda.matmul.fp32_precision == "ieee"
    set_tf32(False)


def test_the_launcher_gives_each_gpu_process_its_share_of_the_cores(monkeypatch):
    import os

    from ldm_vae.launch import launch_command

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    _, env = launch_command(2, "bf16", ["x.py"], cpu=False)
    assert env["OMP_NUM_THREADS"] == str(max(1, cores // 2)) and "ACCELERATE_USE_CPU" not in env
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert launch_command(2, "bf16", ["x.py"], cpu=False)[1]["OMP_NUM_THREADS"] == "3"  # the user's, kept


def test_fp16_run_resumes_with_its_loss_scale(pipeline_dir, tmp_path, monkeypatch):
    """The scaler's state is in the checkpoint (accelerate's weights-only file) and comes back."""
    import shutil

    params = make_params(train={"mixed_precision": "fp16", "max_steps": 4, "checkpoint_every": 2})
    restore = inject_overflows(monkeypatch, {1})
    with fp16_on_cpu(monkeypatch, init_scale=1024.0):
        train(params, *_shards(pipeline_dir), *_outs(tmp_path))
    shutil.rmtree(tmp_path / "ck" / "step-00000004", ignore_errors=True)
    restore()
    with fp16_on_cpu(monkeypatch, init_scale=1.0e6) as scalers:
        result = train(params, *_shards(pipeline_dir), *_outs(tmp_path))
    assert result["resumed"] and scalers[0].get_scale() == 512.0  # the checkpoint's, not the new init
    assert json.loads((tmp_path / "ck" / "step-00000004" / "progress.json").read_text())["overflows"] == 1
