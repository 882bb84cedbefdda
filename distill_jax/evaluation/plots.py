"""The evaluation's metric plots: FD against network evaluations, metrics against w.

Sample grids live in `distill_jax.images` (sampling draws them too), whose `save_figure` writes
these plots atomically; figures are `matplotlib.figure.Figure`s, never pyplot's.
"""

from __future__ import annotations

import matplotlib
import numpy as np
from etils import epath
from matplotlib.figure import Figure

from distill_jax import images


def _series(rows: list[dict], key_fields: tuple[str, ...]) -> dict[tuple, list[dict]]:
    series: dict[tuple, list[dict]] = {}
    for row in rows:
        series.setdefault(tuple(row[k] for k in key_fields), []).append(row)
    return series


def plot_fd_vs_evaluations(
    rows: list[dict], path: epath.PathLike, data_fd: float | None = None
) -> epath.Path:
    """FD (with seed spread) against network evaluations per sample: a line per sampler and w.

    The colour says w, the line style and marker the sampler.
    """
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    weights = sorted({r["w"] for r in rows})
    colours = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.9, len(weights)))
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
    return images.save_figure(fig, path)


def plot_metrics_vs_guidance(rows: list[dict], path: epath.PathLike) -> epath.Path:
    """Accuracy and FD against w: a line per (sampler, steps)."""
    fig = Figure(figsize=(10, 4))
    acc_ax, fd_ax = fig.subplots(1, 2)
    for (sampler, steps), points in sorted(_series(rows, ("sampler", "steps")).items()):
        points = sorted(points, key=lambda r: r["w"])
        ws = [r["w"] for r in points]
        label = f"{sampler}, N={steps}"
        style = "-" if sampler.startswith("teacher") else "--"
        for ax, key in ((acc_ax, "accuracy"), (fd_ax, "fd")):
            ax.errorbar(
                ws,
                [r[key] for r in points],
                yerr=[r[f"{key}_std"] for r in points],
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
    return images.save_figure(fig, path)
