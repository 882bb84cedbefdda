"""Pictures of an evaluation: sample grids (or 2-D scatters) and the metric plots.

Plots use matplotlib's non-interactive Agg backend, so they work without a display. Every file
is written to a temporary name and renamed, so a crash never leaves half a picture.
"""

from __future__ import annotations

import os
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

TILE_PIXELS = 32  # small images are scaled up (nearest) to at least this size per tile


def _replace(tmp: pathlib.Path, path: pathlib.Path) -> None:
    os.replace(tmp, path)


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
    path: str | pathlib.Path,
    x: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    rows: int = 8,
    title: str = "",
) -> pathlib.Path:
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
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    if np.ndim(x) == 4:
        grid = image_grid(np.asarray(x), labels, num_classes, rows)
        Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(tmp, format="png")
    else:
        x = np.asarray(x, np.float32)
        fig, ax = plt.subplots(figsize=(4, 4))
        second = x[:, 1] if x.shape[1] > 1 else np.zeros(len(x))
        ax.scatter(x[:, 0], second, c=labels, s=4, cmap="tab10", vmin=0, vmax=max(num_classes, 10))
        ax.set_aspect("equal")
        ax.set_title(title, fontsize=8)
        fig.tight_layout()
        fig.savefig(tmp, format="png", dpi=120)
        plt.close(fig)
    _replace(tmp, path)
    return path


def _save_figure(fig, path: pathlib.Path) -> pathlib.Path:
    tmp = path.with_name(path.name + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    _replace(tmp, path)
    return path


def _series(rows: list[dict], key_fields: tuple[str, ...]) -> dict[tuple, list[dict]]:
    series: dict[tuple, list[dict]] = {}
    for row in rows:
        series.setdefault(tuple(row[k] for k in key_fields), []).append(row)
    return series


def plot_fd_vs_evaluations(
    rows: list[dict], path: str | pathlib.Path, data_fd: float | None = None
) -> pathlib.Path:
    """FD (with seed spread) against network evaluations per sample: a line per sampler and w.

    The colour says w, the line style and marker the sampler.
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    weights = sorted({r["w"] for r in rows})
    colours = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, len(weights)))
    styles = {"teacher_ddim": ("-", "o"), "student_ddim": ("--", "s")}
    for (sampler, w), points in sorted(_series(rows, ("sampler", "w")).items()):
        linestyle, marker = styles.get(sampler, (":", "^"))
        points = sorted(points, key=lambda r: r["evaluations"])
        ax.errorbar(
            [r["evaluations"] for r in points],
            [r["fd"] for r in points],
            yerr=[r["fd_std"] for r in points],
            marker=marker,
            linestyle=linestyle,
            color=colours[weights.index(w)],
            capsize=2,
            label=f"{sampler}, w={w:g}",
        )
    if data_fd is not None:
        ax.axhline(data_fd, color="grey", linestyle=":", label="real test data")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")  # one-step teachers sit orders of magnitude above the rest
    ax.set_xlabel("network evaluations per sample")
    ax.set_ylabel("FD (classifier features)")
    ax.legend(fontsize=6, ncol=2)
    return _save_figure(fig, pathlib.Path(path))


def plot_metrics_vs_guidance(rows: list[dict], path: str | pathlib.Path) -> pathlib.Path:
    """Accuracy and FD against w: a line per (sampler, steps)."""
    fig, (acc_ax, fd_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for (sampler, steps), points in sorted(_series(rows, ("sampler", "steps")).items()):
        points = sorted(points, key=lambda r: r["w"])
        ws = [r["w"] for r in points]
        label = f"{sampler}, N={steps}"
        style = "-" if sampler.startswith("teacher") else "--"
        acc_ax.errorbar(
            ws,
            [r["accuracy"] for r in points],
            yerr=[r["accuracy_std"] for r in points],
            linestyle=style,
            marker="o",
            capsize=2,
            label=label,
        )
        fd_ax.errorbar(
            ws,
            [r["fd"] for r in points],
            yerr=[r["fd_std"] for r in points],
            linestyle=style,
            marker="o",
            capsize=2,
            label=label,
        )
    acc_ax.set_xlabel("guidance weight w")
    acc_ax.set_ylabel("conditional accuracy")
    fd_ax.set_yscale("log")
    fd_ax.set_xlabel("guidance weight w")
    fd_ax.set_ylabel("FD (classifier features)")
    fd_ax.legend(fontsize=6, ncol=2)
    return _save_figure(fig, pathlib.Path(path))
