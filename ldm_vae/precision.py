"""Numeric precision decided in one place: TF32 on NVIDIA GPUs, and the GradScaler's overflow rule.

- **TF32.** On Ampere and later GPUs PyTorch runs float32 convolutions in TF32 by default (a
  10-bit mantissa), so "fp32" would not mean fp32. The project's rule: off wherever a result is
  called fp32 (encode with ``encode.dtype: fp32``, evaluate's ``psnr_fp32`` and references, the
  exported latent moments), and in training only with ``train.tf32: true`` (it speeds up the
  float32 parts of a run; under bf16/fp16 autocast the convolutions are half precision anyway).
  A CPU has no TF32: these switches change nothing there.
- **fp16 overflows.** Under ``train.mixed_precision: fp16`` the loss is scaled up before backward
  (torch.amp.GradScaler) so small gradients do not underflow. A step whose scaled gradients
  overflow is skipped and the scale halved: that is how the scaler finds its scale, not a sign of
  divergence, so it does not count toward ``train.max_bad_steps`` (:func:`is_overflow`).
"""

from __future__ import annotations

import torch


def set_tf32(enabled: bool) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions, on or off (the process's setting)."""
    precision = "tf32" if enabled else "ieee"
    matmul, conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision") and conv is not None:  # torch >= 2.9: the per-backend API
        matmul.fp32_precision = precision
        conv.fp32_precision = precision
        torch.backends.cudnn.rnn.fp32_precision = precision  # one setting for cuDNN: no mixed-API warning
    else:
        matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def is_overflow(scaler, loss_finite: bool, scale: float) -> bool:
    """Whether a non-finite step is a GradScaler overflow, not a bad step: there is a scaler, every
    rank's forward loss was finite (only the scaled gradients were not), and the scale is still at
    least 1. Below 1 nothing is scaled up any more, so an overflow there is the model's own: a
    diverging run is stopped after ``train.max_bad_steps`` such steps instead of halving for ever."""
    return scaler is not None and loss_finite and scale >= 1.0
