"""Samples as pictures: uint8 conversion, class-per-column image grids, 2-D scatters.

Used by `sample` (the PNG beside every .npz) and the evaluation (grids of every row). Figures are
`matplotlib.figure.Figure` objects rendered by the Agg canvas, never pyplot: they work without a
display and leave the caller's pyplot backend alone (a notebook keeps its inline plots). Every
file is written through `files.atomic_path`.
"""

from __future__ import annotations

import numpy as np
from etils import epath
from matplotlib.figure import Figure
from PIL import Image

from distill_jax import files


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] to uint8 in 0..255 (the inverse of the data preprocessing)."""
    return np.clip(np.round((np.asarray(x) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def from_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 images to float32 in [-1, 1]."""
    return np.asarray(images, np.float32) / 127.5 - 1.0


def displayable(x: np.ndarray) -> np.ndarray:
    """Samples as uint8 images [N, H, W, C] for pictures, or vectors [N, D] unchanged."""
    return to_uint8(x) if np.ndim(x) == 4 else np.asarray(x)


TILE_PIXELS = 32  # small images are scaled up (nearest) to at least this size per tile


def image_grid(images: np.ndarray, labels: np.ndarray, num_classes: int, rows: int) -> np.ndarray:
    """A uint8 [rows * H', K * W', C] grid: column k holds samples of class k (H' scaled up).

    Args:
      images: uint8 [N, H, W, C].
      labels: int [N].
      num_classes: K, the number of columns.
      rows: samples shown per class; missing ones are left black.
    """
    _, height, width, channels = images.shape
    scale = max(1, -(-TILE_PIXELS // max(height, width)))
    tile_h, tile_w = height * scale + 2, width * scale + 2  # a 1-pixel border around each
    grid = np.zeros((rows * tile_h, num_classes * tile_w, channels), np.uint8)
    for k in range(num_classes):
        members = np.flatnonzero(np.asarray(labels) == k)[:rows]
        for r, index in enumerate(members):
            tile = images[index].repeat(scale, axis=0).repeat(scale, axis=1)
            grid[r * tile_h + 1 : (r + 1) * tile_h - 1, k * tile_w + 1 : (k + 1) * tile_w - 1] = (
                tile
            )
    return grid


def save_samples_png(
    path: files.PathLike,
    x: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    rows: int = 8,
    title: str = "",
) -> epath.Path:
    """Save a picture of samples: an image grid for images, a scatter for vector data.

    Args:
      path: the .png file.
      x: uint8 images [N, H, W, C], or float vectors [N, D] (the first two coordinates are
        drawn, coloured by label).
      labels: int [N].
      num_classes: K.
      rows: image grid rows (samples per class).
      title: scatter title.
    """
    if np.ndim(x) == 4:
        grid = image_grid(np.asarray(x), labels, num_classes, rows)
        with files.atomic_path(path) as tmp, tmp.open("wb") as handle:
            Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(handle, "png")
        return epath.Path(path)
    x = np.asarray(x, np.float32)
    fig = Figure(figsize=(4, 4))
    ax = fig.subplots()
    second = x[:, 1] if x.shape[1] > 1 else np.zeros(len(x))
    ax.scatter(x[:, 0], second, c=labels, s=4, cmap="tab10", vmin=0, vmax=max(num_classes, 10))
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=8)
    return save_figure(fig, path, dpi=120)


def save_figure(fig, path: files.PathLike, *, dpi: int = 110) -> epath.Path:
    """Save a matplotlib Figure as PNG atomically."""
    fig.tight_layout()
    with files.atomic_path(path) as tmp, tmp.open("wb") as handle:
        fig.savefig(handle, format="png", dpi=dpi)
    return epath.Path(path)
