"""Image grids a person looks at: sample reconstructions during training, evaluation grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .files import atomic_path


def save_grid(rows: list[torch.Tensor], path: Path, unit: bool = False, pad: int = 2) -> None:
    """Save images as a grid: one *column* per tensor in ``rows``, one row per image.

    Each tensor is [N, 3, H, W], in [-1, 1] (or [0, 1] with ``unit=True``); column i of the
    picture is rows[i], so [originals, reconstructions, errors] reads left to right.
    """
    cols = [(t.float() if unit else (t.float().clamp(-1, 1) + 1) / 2).clamp(0, 1) for t in rows]
    n, _, h, w = cols[0].shape
    grid = np.full((n * (h + pad) + pad, len(cols) * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for j, col in enumerate(cols):
        arr = (col.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)  # [N, H, W, 3]
        for i in range(n):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y : y + h, x : x + w] = arr[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (stages run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Save a matplotlib figure as PNG under a temporary name, then rename; close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    pyplot().close(fig)
