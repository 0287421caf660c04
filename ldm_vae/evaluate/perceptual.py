"""Optional perceptual metrics: LPIPS (VGG) and rFID (Inception features, as torch-fidelity).

Both need pretrained networks. LPIPS is the project's own (lpips.py, the training loss's net): it
needs only its two weight files. rFID needs ``torch-fidelity``, which pulls torchvision and
downloads Inception on first use: the ``metrics`` extra, ``pip install -e '.[metrics]'``. Asked for
but unavailable, the evaluate stage stops at once saying how to get them, before the decode.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..lpips import WeightsUnavailable, load_lpips, require_weights

HOW_TO_GET = "install the metrics extra: pip install -e '.[metrics]' (torch-fidelity; Inception downloads on first use)"


class MetricUnavailable(RuntimeError):
    pass


def check_available(cfg) -> None:
    """Raise MetricUnavailable naming the param when a requested metric cannot run."""
    if cfg.lpips:
        try:
            require_weights("evaluate.lpips")  # downloads them when missing and online
        except WeightsUnavailable as e:
            raise MetricUnavailable(str(e)) from None
    if cfg.rfid and importlib.util.find_spec("torch_fidelity") is None:
        raise MetricUnavailable(
            f"evaluate.rfid: true needs the 'torch_fidelity' package, which is not installed; {HOW_TO_GET}"
        )


class Lpips:
    """LPIPS with the VGG backbone (the LDM/SD papers' choice), per image, inputs in [0, 1]."""

    def __init__(self, device: torch.device):
        try:
            self.net = load_lpips("evaluate.lpips", device, download=False)
        except WeightsUnavailable as e:
            raise MetricUnavailable(str(e)) from None
        self.device = device

    @torch.inference_mode()
    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # a, b: [N, 3, H, W] in [0, 1]; LPIPS wants [-1, 1]
        d = self.net(a.to(self.device) * 2 - 1, b.to(self.device) * 2 - 1)  # [N]
        return d.float().cpu()


class RFid:
    """Reconstruction FID: Inception-v3 pool features of originals vs reconstructions.

    Images are kept as PNG files in a temporary folder (a large validation split never sits in
    memory) and scored by torch-fidelity, the reference implementation of the standard FID.
    """

    def __init__(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="rfid-")
        self.dirs = {name: Path(self._tmp.name) / name for name in ("ref", "rec")}
        for d in self.dirs.values():
            d.mkdir()
        self.count = 0

    def add(self, ref: torch.Tensor, rec: torch.Tensor) -> None:
        # ref, rec: [N, 3, H, W] in [0, 1]
        for name, batch in (("ref", ref), ("rec", rec)):
            arr = (batch.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
            for i, img in enumerate(arr):
                Image.fromarray(img).save(self.dirs[name] / f"{self.count + i:08d}.png")
        self.count += ref.shape[0]

    def compute(self) -> float:
        try:
            import torch_fidelity

            m = torch_fidelity.calculate_metrics(input1=str(self.dirs["rec"]), input2=str(self.dirs["ref"]),
                                                 fid=True, cuda=torch.cuda.is_available(), verbose=False)
        except Exception as e:
            raise MetricUnavailable(
                f"evaluate.rfid: torch-fidelity failed ({type(e).__name__}: {e}); {HOW_TO_GET}"
            ) from e
        finally:
            self._tmp.cleanup()
        return float(m["frechet_inception_distance"])
