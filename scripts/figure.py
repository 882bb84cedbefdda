"""The README's picture: the guided teacher beside its distilled students, at several w.

Usage:
  python scripts/figure.py --workdir=runs/digits --out=docs/figure.png
      [--weights=0,1,4] [--teacher_steps=32] [--students=4,2,1] [--per_class=2] [--seed=0]

One row per sampler (the teacher with guided DDIM, 2 network evaluations per step, then each
student), one column per guidance weight w; each cell holds `per_class` samples of every class
(one column of digits per class). Every sampler starts from the same noise (same seed and
labels), so a cell's digits can be compared across rows. Everything is drawn through the
project's own sampling API (`Run.open`, `sampling.sample`) from the run's finished stages.
The picture is written atomically; its caption (the run, the samplers) is printed.
"""

from __future__ import annotations

import argparse
import io
import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from distill_jax import files, images, sampling  # noqa: E402
from distill_jax.run import Run  # noqa: E402


def _numbers(text: str, kind=float) -> list:
    """'0,1,4' -> [0.0, 1.0, 4.0]; a bad list is one clear line."""
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        message = f"figure.py: error: {text!r} is not a comma-separated list of numbers."
        raise SystemExit(message) from None


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a run with finished students")
    parser.add_argument("--out", default="figure.png", help="the PNG to write")
    parser.add_argument("--weights", default="0,1,4", help="guidance weights, one column each")
    parser.add_argument("--teacher_steps", type=int, default=32, help="the teacher's DDIM steps")
    parser.add_argument("--students", default="4,2,1", help="student step counts, one row each")
    parser.add_argument("--per_class", type=int, default=2, help="samples per class per cell")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def cell(x: np.ndarray, num_classes: int, per_class: int) -> np.ndarray:
    """uint8 [N, H, W, C] samples with labels 0..K-1 cycled -> one [per_class*H, K*W, C] tile."""
    labels = np.resize(np.arange(num_classes), len(x))
    return images.image_grid(images.to_uint8(x), labels, num_classes, per_class)


def draw(run: Run, args: argparse.Namespace) -> tuple[plt.Figure, str]:
    """The figure and its caption."""
    weights = _numbers(args.weights)
    students = _numbers(args.students, int)
    num_classes = run.info.num_classes
    labels = sampling.class_labels(num_classes * args.per_class, num_classes)
    rows = [("teacher", args.teacher_steps)] + [("student", n) for n in students]
    fig, axes = plt.subplots(
        len(rows),
        len(weights),
        figsize=(2.7 * len(weights) + 0.7, 0.8 * len(rows) + 0.3),
        squeeze=False,
    )
    for i, (model, steps) in enumerate(rows):
        for j, w in enumerate(weights):
            x = sampling.sample(
                run, model=model, steps=steps, w=w, conditions=labels, seed=args.seed
            )
            axes[i, j].imshow(
                cell(x, num_classes, args.per_class).squeeze(), cmap="gray", vmin=0, vmax=255
            )
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(f"w = {w:g}", fontsize=10)
        # The guided teacher: 2 evaluations per step (1 at w = 0, its conditional half only).
        evaluations = sampling.evaluations_per_sample(model, steps)
        plural = "s" * (steps > 1)
        axes[i, 0].set_ylabel(
            f"{model}\n{steps} step{plural}\n{evaluations} eval{'s' * (evaluations > 1)}",
            fontsize=8,
            rotation=0,
            ha="right",
            va="center",
        )
    fig.tight_layout(pad=0.3)
    caption = (
        f"{run.workdir}: guided DDIM teacher ({args.teacher_steps} steps) and the "
        f"{'/'.join(map(str, students))}-step students at w = {', '.join(map(str, weights))}, "
        f"{args.per_class} samples per class, seed {args.seed}, the same noise in every row."
    )
    return fig, caption


def main(argv: list[str]) -> int:
    """Draw the figure from --workdir and write it to --out."""
    args = parse_args(argv)
    try:
        run = Run.open(args.workdir)
        fig, caption = draw(run, args)
    except (ValueError, OSError) as error:
        print(f"figure.py: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    files.atomic_write(args.out, buffer.getvalue())
    print(f"wrote {args.out} ({len(buffer.getvalue()) / 1000:.0f} kB): {caption}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
