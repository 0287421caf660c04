"""The VQ autoencoder (model.regularizer: vq): the straight-through gradient, the codebook's
moving averages, dead-code restarts, a real training run and its export as a diffusers VQModel."""

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import VQModel

from ldm_vae.model import TrainedAutoencoder, VQTerms, build_vae
from ldm_vae.shards import shard_paths
from ldm_vae.train.losses import VAELoss
from ldm_vae.vq import Quantizer, build_quantizer, histogram_stats, nearest, token_dtype

from helpers.common import curve, make_params


def vq_params(**model):
    return make_params(model={"regularizer": "vq", "codebook_size": 64, **model},
                       loss={"vq_beta": 0.25, "codebook_update": "ema", "codebook_decay": 0.9})


def test_the_decoders_gradient_reaches_the_encoder_through_the_snap():
    """The reconstruction alone (beta 0, codes moved by averages): the encoder still learns, by the
    straight-through estimator; the codebook gets no gradient."""
    torch.manual_seed(0)
    params = make_params(model={"regularizer": "vq", "codebook_size": 16},
                         loss={"vq_beta": 0.0, "dead_code_threshold": 0.0})
    model = TrainedAutoencoder(build_vae(params.model, 16), quantizer=build_quantizer(params))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    rec, h, terms, _ = model(x)
    assert isinstance(terms, VQTerms) and terms.tokens.shape == (2, 2, 2) and terms.tokens.dtype == torch.long
    loss, logs = VAELoss(params.loss)(rec, x, h, terms)
    assert "train/kl" not in logs and "train/codebook_used" in logs
    loss.backward()
    assert model.vae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.vae.quantize.embedding.weight.grad is None


def test_the_codebook_loss_moves_codes_when_they_are_not_averaged():
    torch.manual_seed(0)
    params = make_params(model={"regularizer": "vq", "codebook_size": 16}, loss={"codebook_update": "loss"})
    model = TrainedAutoencoder(build_vae(params.model, 16), quantizer=build_quantizer(params))
    assert model.vae.quantize.embedding.weight.requires_grad
    rec, h, terms, _ = model(torch.rand(2, 3, 16, 16))
    terms.loss.backward()
    assert model.vae.quantize.embedding.weight.grad.abs().sum() > 0


def test_moving_averages_move_codes_toward_their_vectors():
    torch.manual_seed(0)
    q = Quantizer(8, 2, beta=0.25, update="ema", decay=0.5, dead_threshold=0.0).train()
    weight = torch.nn.Parameter(torch.randn(8, 2), requires_grad=False)
    h = torch.randn(4, 2, 4, 4) * 3  # [B, D, h, w]
    flat = h.permute(0, 2, 3, 1).reshape(-1, 2)
    idx = nearest(flat, weight.data)
    before = weight.data.clone()
    q(h, weight)
    for k in idx.unique():
        target = flat[idx == k].mean(0)
        assert (weight.data[k] - target).norm() < (before[k] - target).norm()
    unused = [k for k in range(8) if k not in idx]
    assert torch.allclose(weight.data[unused], before[unused], atol=1e-5)  # unused codes stay put


def test_l2_codes_are_unit_vectors_and_the_diffusers_lookup_agrees():
    """With model.codebook_l2 the codes stay unit vectors, so diffusers' nearest-by-distance lookup
    of the raw latent chooses the code of highest cosine: the token the quantizer chose."""
    torch.manual_seed(0)
    params = make_params(model={"regularizer": "vq", "codebook_size": 32, "codebook_l2": True},
                         loss={"dead_code_threshold": 0.0})  # (re-seeded codes can tie: 16 vectors, 32 codes)
    model = TrainedAutoencoder(build_vae(params.model, 16), quantizer=build_quantizer(params))
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    _, h, terms, _ = model(x)  # training mode: the averages have moved the codes
    w = model.vae.quantize.embedding.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(32), atol=1e-5)
    model.eval()
    _, h, terms, _ = model(x)
    _, _, (_, _, theirs) = model.vae.quantize(h)
    assert torch.equal(theirs.flatten(), terms.tokens.flatten())


def collapse_run(threshold: float, steps: int = 60) -> dict:
    """A quantizer trained on a stream of 2-D vectors from a spread distribution, from diffusers'
    tiny codebook initialisation; latent health's codebook report on its last 10 steps' tokens."""
    from ldm_vae.evaluate.health import CodebookStats

    torch.manual_seed(0)
    q = Quantizer(64, 2, beta=0.25, update="ema", decay=0.9, dead_threshold=threshold).train()
    weight = torch.nn.Parameter(torch.empty(64, 2).uniform_(-1 / 64, 1 / 64), requires_grad=False)
    health = CodebookStats(64)
    for step in range(steps):
        h = torch.randn(8, 2, 8, 8) * 2 + 5  # [B, D, h, w], far from the initial codes
        _, tokens, _, _ = q(h, weight)
        if step >= steps - 10:
            health.update(tokens)
    return health.metrics()


def test_without_restarts_the_codebook_collapses_and_with_them_it_stays_used():
    collapsed, used = collapse_run(0.0), collapse_run(0.03)
    assert collapsed["codebook_usage"] < 0.25 and collapsed["collapsed_codebook"]
    assert used["codebook_usage"] > 0.9 and not used["collapsed_codebook"]
    assert used["codebook_perplexity"] > 3 * collapsed["codebook_perplexity"]


def test_histogram_stats_and_token_types():
    s = histogram_stats([10, 10, 0, 0], 4)
    assert s["codes_used"] == 2 and s["usage"] == 0.5 and s["perplexity"] == pytest.approx(2.0)
    assert s["bits_per_token"] == 2.0 and s["entropy_bits_per_token"] == pytest.approx(1.0)
    assert token_dtype(256).__name__ == "uint8" and token_dtype(257).__name__ == "uint16"
    assert token_dtype(16384).__name__ == "uint16" and token_dtype(65537).__name__ == "uint32"


def test_a_vq_run_trains_exports_a_diffusers_vqmodel_and_resumes(pipeline_dir, tmp_path):
    from ldm_vae.train.training import train

    params = vq_params()
    tr, va = shard_paths(pipeline_dir / "prepared" / "train"), shard_paths(pipeline_dir / "prepared" / "val")
    result = train(params, tr, va, tmp_path / "vae", tmp_path / "logs", tmp_path / "ckpt")
    assert result["steps"] == 6 and result["val_psnr"] > 0
    vq = VQModel.from_pretrained(tmp_path / "vae")  # diffusers alone
    assert vq.config.num_vq_embeddings == 64 and vq.config.scaling_factor > 0
    stats = json.loads((tmp_path / "vae" / "latent_stats.json").read_text())
    assert stats["codebook_size"] == 64 and 0 < stats["usage"] <= 1 and stats["bits_per_token"] == 6.0
    assert len(curve(tmp_path / "logs", "train/codebook_used")) == 3
    assert len(curve(tmp_path / "logs", "train/vq_loss")) == 3
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        h = vq.encode(x).latents
        z, _, (_, _, idx) = vq.quantize(h)
        codes = vq.quantize.embedding.weight[idx].view(2, 4, 4, -1).permute(0, 3, 1, 2)
        assert torch.allclose(vq.decode(codes, force_not_quantize=True).sample, vq.decode(h).sample, atol=1e-5)
    assert F.mse_loss(vq(x).sample, x) < 2.0
    # Killed after its step-4 checkpoint, then run again: it resumes, and the checkpoint (loaded
    # whole, strictly, by accelerate) holds the codebook's moving averages and use counts as trained.
    import shutil

    from safetensors.torch import load_file

    state = load_file(tmp_path / "ckpt" / "step-00000004" / "model.safetensors")
    assert bool(state["quantizer.started"]) and bool(state["quantizer.started_use"])
    assert state["quantizer.use"].sum() > 0 and not torch.equal(state["quantizer.ema_count"], torch.ones(64))
    ckpt = tmp_path / "ckpt2"
    ckpt.mkdir()
    shutil.copytree(tmp_path / "ckpt" / "step-00000004", ckpt / "step-00000004")
    again = train(params, tr, va, tmp_path / "vae2", tmp_path / "logs2", ckpt)
    assert again["resumed"] is True and again["steps"] == 6
    assert VQModel.from_pretrained(tmp_path / "vae2").config.num_vq_embeddings == 64
