"""LPIPS (VGG, v0.1) in plain torch: the perceptual term of the LDM loss and the evaluate metric.

The network is the one of Zhang et al. (the `lpips` package): ImageNet VGG16 features at relu1_2,
relu2_2, relu3_3, relu4_3 and relu5_3, each unit-normalised over channels, squared differences
weighted per channel by the learned 1x1 "lin" layers, averaged over space and summed over layers.
It is written here so that neither training nor evaluation needs torchvision (whose PyPI build
cannot import beside a CPU torch). The weights are the published ones, in their original files:

- ``vgg16-397923af.pth``: torchvision's ImageNet VGG16 (528 MB), in torch hub's checkpoint folder;
- ``lpips_vgg_v0.1.pth``: the lpips package's ``weights/v0.1/vgg.pth`` (7 KB), in the same folder,
  or read from an installed ``lpips`` package (``pip install --no-deps lpips`` is enough).

Both load with ``torch.load(weights_only=True)``. :func:`fetch_weights` downloads them (the stage
does this when they are missing and the network is there); :func:`require_weights` fails at once,
naming the param and how to get them, when they are not there.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from pathlib import Path

import torch
from torch import nn

from .files import atomic_path

VGG_FILE = "vgg16-397923af.pth"
VGG_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LIN_FILE = "lpips_vgg_v0.1.pth"
LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
# Downloads are checked before they are kept: VGG's file name carries the start of its sha256
# (torch hub's convention); the linear layers' file does not, so its digest is pinned here (the
# file in the lpips 0.1.4 wheel, identical to the repository's v0.1 weights).
LIN_SHA256 = "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"
# torchvision's VGG16 "D" layout; "M" is a 2x2 max-pool. Indices of nn.Sequential match its
# `features.N` state-dict keys, so the published file loads as is.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (3, 8, 15, 22, 29)  # the ReLU after conv1_2, conv2_2, conv3_3, conv4_3, conv5_3
TAP_CHANNELS = (64, 128, 256, 512, 512)


class WeightsUnavailable(RuntimeError):
    pass


def weights_dir() -> Path:
    """torch hub's checkpoint folder ($TORCH_HOME/hub/checkpoints): where torchvision keeps VGG16."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _lin_path() -> Path | None:
    local = weights_dir() / LIN_FILE
    if local.exists():
        return local
    spec = importlib.util.find_spec("lpips")  # located, never imported (it imports torchvision)
    if spec is not None and spec.origin:
        packaged = Path(spec.origin).parent / "weights" / "v0.1" / "vgg.pth"
        if packaged.exists():
            return packaged
    return None


def how_to_get() -> str:
    return (f"LPIPS needs two weight files in {weights_dir()}: {VGG_FILE} ({VGG_URL}) and {LIN_FILE} "
            f"({LIN_URL}, also inside `pip install --no-deps lpips`). Online, `python -m ldm_vae.lpips` "
            "downloads both; offline, copy them there (TORCH_HOME moves the folder).")


def missing_weights() -> list[str]:
    missing = [] if (weights_dir() / VGG_FILE).exists() else [VGG_FILE]
    return missing + ([] if _lin_path() else [LIN_FILE])


def fetch_weights(timeout: float = 10.0) -> None:
    """Download whichever weight file is missing (http(s) only, to a temporary name, then renamed)."""
    import requests

    weights_dir().mkdir(parents=True, exist_ok=True)
    for name, url in ((VGG_FILE, VGG_URL), (LIN_FILE, LIN_URL)):
        if name not in missing_weights():
            continue
        if not url.lower().startswith(("https://", "http://")):
            raise ValueError(f"{url}: only http(s) downloads")
        digest = hashlib.sha256()
        with atomic_path(weights_dir() / name) as tmp:  # kept only if the block ends without an error
            with requests.get(url, stream=True, timeout=(timeout, 60)) as r:
                r.raise_for_status()
                with open(tmp, "wb") as f:
                    for chunk in r.iter_content(1 << 20):
                        digest.update(chunk)
                        f.write(chunk)
            expected = expected_sha256(name)
            if not digest.hexdigest().startswith(expected):
                raise ValueError(f"{url}: sha256 {digest.hexdigest()} does not match the expected {expected}: "
                                 "not the published file (a proxy's page, a changed or tampered file); not kept")


def expected_sha256(name: str) -> str:
    """The digest (or, torch hub style, its start) a weight file must have."""
    if name == LIN_FILE:
        return LIN_SHA256
    found = re.search(r"-([a-f0-9]{8,})\.", name)
    if not found:
        raise ValueError(f"{name}: no hash in the file name to check a download against")
    return found.group(1)


def require_weights(param: str, download: bool = True) -> None:
    """Make sure LPIPS can load, or raise WeightsUnavailable naming ``param`` and how to get it."""
    if not missing_weights():
        return
    if download and os.environ.get("HF_HUB_OFFLINE") != "1":
        try:
            fetch_weights()
        except Exception as e:  # offline, proxy, 404: explain instead of a network traceback
            raise WeightsUnavailable(f"{param}: LPIPS weights missing and the download failed "
                                     f"({type(e).__name__}: {e}). {how_to_get()}") from None
        if not missing_weights():
            return
    raise WeightsUnavailable(f"{param}: LPIPS weights missing: {', '.join(missing_weights())}. {how_to_get()}")


def _vgg16_features() -> nn.Sequential:
    layers, c_in = [], 3
    for v in VGG16_LAYOUT:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=False)]
            c_in = v
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """LPIPS distance per image between two batches in [-1, 1]: ``[B, 3, H, W] x 2 -> [B]``.

    Frozen (``requires_grad`` off, eval mode) but differentiable: as a loss it passes gradients to
    its inputs, so never call it under ``no_grad`` when training.
    """

    def __init__(self):
        super().__init__()
        self.features = _vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in TAP_CHANNELS)
        # The lpips ScalingLayer: inputs in [-1, 1] mapped to ImageNet-normalised values.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # always eval: no dropout, whatever the parent module does

    def load_published(self, vgg_path: Path, lin_path: Path) -> "LPIPS":
        vgg = torch.load(vgg_path, map_location="cpu", weights_only=True)
        self.features.load_state_dict({k[len("features."):]: v for k, v in vgg.items() if k.startswith("features.")})
        lin = torch.load(lin_path, map_location="cpu", weights_only=True)
        # The lpips file names the 1x1 convs `lin<i>.model.1.weight` (index 0 is a dropout).
        for i, conv in enumerate(self.lins):
            conv.weight.data.copy_(lin[f"lin{i}.model.1.weight"])
        return self

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features[: TAPS[-1] + 1]):
            x = layer(x)
            if i in TAPS:
                out.append(x)
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # a, b: [B, 3, H, W] in [-1, 1]; both go through VGG in one batch of 2B
        x = (torch.cat([a, b]) - self.shift) / self.scale
        dist = 0
        for lin, f in zip(self.lins, self._taps(x)):
            f = f.float()
            f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit norm over channels
            fa, fb = f.chunk(2)  # [B, c, h, w] each
            dist = dist + lin((fa - fb).pow(2)).mean((1, 2, 3))  # [B]
        return dist


def load_lpips(param: str, device: torch.device | str = "cpu", download: bool = True) -> LPIPS:
    """The published LPIPS-VGG, frozen, on ``device``; WeightsUnavailable naming ``param`` if it cannot be."""
    require_weights(param, download=download)
    return LPIPS().load_published(weights_dir() / VGG_FILE, _lin_path()).to(device)


if __name__ == "__main__":
    fetch_weights()
    print(f"LPIPS weights in {weights_dir()}: {VGG_FILE}, {_lin_path()}")
