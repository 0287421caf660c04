"""Image grids a person looks at: sample reconstructions during training, evaluation grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .files import atomic_path

# Tiles are enlarged (nearest neighbour, whole pixels) to at least this many pixels a side: a
# 64 px reconstruction at its native size is too small to judge by eye.
MIN_TILE = 192
FONT_SIZE = 14


def save_grid(columns: list, path: Path, *, titles: list[str], captions: list[list[str]] | None = None,
              unit: bool = False, pad: int = 4) -> None:
    """Save images as a labelled grid: one *column* per entry, one row per image.

    Each column is a tensor [N, 3, H, W] or a list of N tensors [3, H_i, W_i] (images of several
    shapes: each is shown whole, centred in a cell as large as the largest), in [-1, 1] (or
    [0, 1] with ``unit=True``); column j is headed by ``titles[j]``, so [originals,
    reconstructions, errors] reads left to right. ``captions[j][i]`` (optional, "" for none) is
    printed under tile i of column j: a tile's PSNR, a key. Tiles are enlarged by a whole factor
    to at least ``MIN_TILE`` pixels.
    """
    from PIL import ImageDraw, ImageFont

    cols = [[(t.float() if unit else (t.float().clamp(-1, 1) + 1) / 2).clamp(0, 1) for t in col] for col in columns]
    n = len(cols[0])
    h, w = max(t.shape[-2] for c in cols for t in c), max(t.shape[-1] for c in cols for t in c)  # the cell
    scale = max(1, -(-MIN_TILE // max(h, w)))  # ceil
    th, tw = h * scale, w * scale
    font = ImageFont.load_default(size=FONT_SIZE)
    line = FONT_SIZE + 6
    cap = line if captions else 0
    canvas = Image.new("RGB", (len(cols) * (tw + pad) + pad, line + n * (th + cap + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for j, col in enumerate(cols):
        x = pad + j * (tw + pad)
        draw.text((x + tw // 2, line // 2), titles[j], fill="black", font=font, anchor="mm")
        for i, tile in enumerate(col):
            y = line + pad + i * (th + cap + pad)
            arr = (tile.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)  # [H, W, 3]
            ih, iw = arr.shape[0] * scale, arr.shape[1] * scale
            canvas.paste(Image.fromarray(arr).resize((iw, ih), Image.NEAREST), (x + (tw - iw) // 2, y + (th - ih) // 2))
            text = captions[j][i] if captions and captions[j] else ""
            if text:
                draw.text((x + tw // 2, y + th + cap // 2), _fit(text, font, tw), fill="black", font=font, anchor="mm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def _fit(text: str, font, width: int) -> str:
    """``text``, its middle cut out ("url-3f2a...9c1d") until it fits ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    keep = len(text)
    while keep > 2 and font.getlength(f"{text[:(keep + 1) // 2]}...{text[len(text) - keep // 2:]}") > width:
        keep -= 1
    return f"{text[:(keep + 1) // 2]}...{text[len(text) - keep // 2:]}"


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


def save_curves(panels: list[tuple[str, list[int], list[float]]], path: Path) -> None:
    """One panel per (title, steps, values), side by side: the key training curves as a PNG, which
    shows offline (``dvc plots show`` embeds images; its vega charts load from a CDN)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (title, steps, values) in zip(axes[0], panels):
        ax.plot(steps, values, lw=1.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def save_scatter(x: list[float], y: list[float], path: Path, *, xlabel: str, ylabel: str, title: str) -> None:
    """One point per item, with the line y = x: points above it are items where y wins."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.scatter(x, y, s=12, alpha=0.7)
    lo, hi = min(min(x), min(y)), max(max(x), max(y))
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--", label="y = x")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
