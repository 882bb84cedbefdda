"""The evaluation table as CSV, JSON and Markdown, written atomically (`files.atomic_write`).

A row is one (sampler, steps N, guidance weight w) with the mean and seed spread (standard
deviation over seeds) of FD (to real data), IS, conditional accuracy and within-class diversity
(on a text run: prompt accuracy, and the thickness adherence too), FD to the full-step guided
teacher's samples at the same w (on every seed's samples at once; the per-seed figures' mean
and spread beside it), the network evaluations per sample and the sampling time per image.
"""

from __future__ import annotations

import csv
import io
import json

from etils import epath

from distill_jax import files

COLUMNS = (
    "sampler",
    "steps",
    "w",
    "evaluations",
    "fd",
    "fd_std",
    "fd_teacher",
    "fd_teacher_per_seed",
    "fd_teacher_per_seed_std",
    "inception_score",
    "inception_score_std",
    "accuracy",
    "accuracy_std",
    "diversity",
    "diversity_std",
    "thickness",
    "thickness_std",
    "seconds_per_image",
    "num_samples",
    "seeds",
    "grid",
)


def csv_text(rows: list[dict]) -> str:
    """The rows as CSV with the `COLUMNS` header."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _pm(row: dict, key: str, digits: int) -> str:
    spread = row.get(f"{key}_std", 0.0) or 0.0
    text = f"{row[key]:.{digits}f}"
    return f"{text} ± {spread:.{digits}f}" if spread else text


def _fd_teacher(row: dict) -> str:
    """Pooled FD to teacher, with the per-seed mean ± spread in brackets when seeds > 1."""
    if "fd_teacher" not in row:
        return "-"
    if row.get("seeds", 1) > 1 and "fd_teacher_per_seed" in row:
        return f"{row['fd_teacher']:.3f} ({_pm(row, 'fd_teacher_per_seed', 3)})"
    return f"{row['fd_teacher']:.3f}"


def markdown_table(rows: list[dict], data_row: dict | None = None, *, link_grids: str = "") -> str:
    """A Markdown table of the rows (mean ± seed spread), the real-data row first if given.

    FD to teacher is the figure on every seed's samples at once; in brackets, with more than
    one seed, the mean ± spread of the per-seed figures (each on fewer samples, so higher).

    Args:
      rows: result rows (see `COLUMNS`).
      data_row: the classifier's metrics on real eval-split data, shown as a reference.
      link_grids: a path prefix; when given, each row links its sample grid.
    """
    text = any("thickness" in row for row in rows)
    header = (
        "| sampler | N | w | evals/sample | FD ↓ | FD to teacher ↓ (per seed) | IS ↑ | "
        "accuracy ↑ | diversity |" + (" thickness ρ ↑ |" if text else "") + " ms/image |"
    ) + (" grid |" if link_grids else "")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    if data_row is not None:
        lines.append(
            f"| real data ({data_row['split']}) | - | - | - | {data_row['fd']:.3f} | - | "
            f"{data_row['inception_score']:.3f} | {data_row['accuracy']:.3f} | "
            f"{data_row.get('diversity', float('nan')):.3f} |"
            + (" - |" if text else "")
            + " - |"
            + (" |" if link_grids else "")
        )
    for row in rows:
        line = (
            f"| {row['sampler']} | {row['steps']} | {row['w']:g} | {row['evaluations']} | "
            f"{_pm(row, 'fd', 3)} | {_fd_teacher(row)} | "
            f"{_pm(row, 'inception_score', 3)} | "
            f"{_pm(row, 'accuracy', 3)} | {_pm(row, 'diversity', 3)} | "
            + (f"{_pm(row, 'thickness', 3)} | " if text else "")
            + f"{1000 * row['seconds_per_image']:.3f} |"
        )
        if link_grids:
            line += f" [png]({link_grids}{row['grid']}) |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def write_tables(
    directory: epath.PathLike, rows: list[dict], payload: dict, data_row: dict | None
) -> dict[str, epath.Path]:
    """Write results.csv, results.json (`payload`) and results.md into `directory`."""
    directory = epath.Path(directory)
    return dict(
        csv=files.atomic_write(directory / "results.csv", csv_text(rows)),
        json=files.atomic_write(directory / "results.json", json.dumps(payload, indent=2)),
        markdown=files.atomic_write(
            directory / "results.md", markdown_table(rows, data_row, link_grids="")
        ),
    )
