"""The GPU-only paths, imitated on this CPU: one place for every test that needs one.

Each stands for one thing a GPU run does and a CPU run skips:

- :func:`fp16_on_cpu` stands for CUDA fp16 mixed precision. accelerate gives a CPU no GradScaler
  and no fp16 autocast (``mixed_precision: fp16`` on a CPU runs plain float32). This puts a
  ``torch.amp.GradScaler("cpu")`` into the train stage's Accelerator with the state accelerate
  sets on CUDA (``native_amp``): backward scales the loss, unscaling finds overflows, the scale
  moves, and the forward runs under CPU float16 autocast.
- bf16 needs no imitation: ``train.mixed_precision: bf16`` on a CPU is real CPU bf16 autocast
  (accelerate turns it on), so the code under a bf16 autocast runs as on a GPU, with CPU kernels.
- :func:`elsewhere` stands for a CUDA Accelerator beside a VAE loaded on the CPU: an Accelerator
  whose ``device`` is a device the VAE was not loaded on (``meta``: nothing can compute there, so
  any tensor sent to it instead of to the VAE's device fails at once).
- :func:`inject_overflows` stands for the gradients that overflow float16 at a loss scale too
  high: an inf gradient at chosen backward passes, so the scaler's skip is exercised at known steps
  (on a GPU too: bench/gpu_check.py).
- ``RayCluster(gpus=...)`` (raycluster.py) stands for Ray nodes with GPUs: they declare GPUs, Ray
  plans and schedules GPU tasks onto them and sets ``CUDA_VISIBLE_DEVICES``, and torch finds no GPU
  there, as on a node whose GPU torch cannot use.

What only a real GPU shows (bench/gpu_check.py runs it there): CUDA's fp16 and bf16 kernels and
their numbers (the CPU's autocast runs other kernels), the overflow pattern of a real model at real
sizes, TF32, pinned-memory copies overlapping compute, NCCL, memory and speed.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def fp16_on_cpu(monkeypatch, init_scale: float = 2.0**16, growth_interval: int = 2000):
    """While open, the train stage's Accelerator (``train.mixed_precision: fp16``) has a CPU
    GradScaler and fp16 autocast; yields the list of scalers made (one per ``train`` call)."""
    from ldm_vae.train import training

    real = training.make_accelerator
    scalers: list = []

    def make(tcfg):
        accelerator = real(tcfg)
        assert accelerator.state.mixed_precision == "fp16", "fp16_on_cpu imitates train.mixed_precision: fp16"
        assert accelerator.scaler is None, "a real GradScaler is there already: nothing to imitate"
        accelerator.native_amp = True  # what accelerate sets on CUDA: autocast() is fp16 autocast
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)
        scalers.append(accelerator.scaler)
        return accelerator

    monkeypatch.setattr(training, "make_accelerator", make)
    try:
        with fresh_precision():  # accelerate keeps one precision per process
            yield scalers
    finally:
        monkeypatch.setattr(training, "make_accelerator", real)


@contextlib.contextmanager
def fresh_precision():
    """accelerate's process-wide precision reset around a run in another one (bf16: CPU autocast)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    try:
        yield
    finally:
        AcceleratorState._reset_state()


def elsewhere(accelerator):
    """``accelerator``, naming as its device one the VAE was not loaded on (``meta``)."""

    class Elsewhere(type(accelerator)):
        @property
        def device(self):
            return torch.device("meta")

    accelerator.__class__ = Elsewhere
    return accelerator


def inject_overflows(monkeypatch, backwards: set[int]):
    """An inf gradient (the encoder's first weight) at the given backward passes of the next train
    runs, counted from 1: their scaled gradients overflow as float16 ones do. Returns what undoes it."""
    from ldm_vae.train import training

    real = training._Trainer
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return grad * float("inf") if calls["n"] in backwards else grad

    class Overflowing(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.inner.vae.encoder.conv_in.weight.register_hook(poison)

    monkeypatch.setattr(training, "_Trainer", Overflowing)
    return lambda: monkeypatch.setattr(training, "_Trainer", real)
