"""workdir/report.md: the run's stage times, the evaluation table, plots and sample grids.

Stage times come from two records: workdir/timings.json, the wall time of each phase
(teacher, distillation, evaluation) in the latest command that did work in it (written by
`record_timing`; a phase resumed after an interruption shows the resumed part), and
metrics.jsonl, from which each stage's training-loop time is summed over its log intervals
((step - previous step) / steps_per_s; the first interval includes compilation, set-up before
the first step is not counted).
"""

from __future__ import annotations

import json
import os
import platform

import jax
from etils import epath

from distill_jax import files
from distill_jax.evaluation import table
from distill_jax.run import workdir as workdir_lib

TIMINGS_FILE = workdir_lib.TIMINGS_FILE


def record_timing(workdir: epath.PathLike, phase: str, seconds: float) -> None:
    """Set `phase`'s wall time in workdir/timings.json (other phases are kept)."""
    path = epath.Path(workdir) / TIMINGS_FILE
    timings = json.loads(path.read_text()) if path.exists() else {}
    timings[phase] = round(float(seconds), 2)
    files.atomic_write(path, json.dumps(timings, indent=2))


def stage_training_seconds(workdir: epath.PathLike) -> dict[str, float]:
    """{stage: seconds of its training loop} summed from metrics.jsonl (see module doc)."""
    path = epath.Path(workdir) / workdir_lib.METRICS_FILE
    if not path.exists():
        return {}
    totals: dict[str, float] = {}
    previous: dict[str, int] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        stage, step, rate = record.get("stage"), record.get("step"), record.get("steps_per_s")
        if stage is None or step is None or not rate:
            continue
        last = previous.get(stage, 0)
        if step > last:
            totals[stage] = totals.get(stage, 0.0) + (step - last) / rate
        previous[stage] = step
    return totals


def _machine() -> str:
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return (
        f"{platform.platform()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"JAX {jax.__version__}, {len(devices)} x {', '.join(kinds)} ({jax.default_backend()})"
    )


def _times_section(workdir: epath.Path) -> list[str]:
    lines = ["## Time of each stage", ""]
    path = workdir / TIMINGS_FILE
    if path.exists():
        timings = json.loads(path.read_text())
        lines += ["| phase | wall time (s) |", "|---|---|"]
        lines += [f"| {phase} | {seconds:.1f} |" for phase, seconds in timings.items()]
        lines.append("")
    stages = stage_training_seconds(workdir)
    if stages:
        lines += ["| stage | training loop (s), from metrics.jsonl |", "|---|---|"]
        lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in stages.items()]
        lines.append("")
    if len(lines) == 2:
        lines += ["No timing records in this workdir.", ""]
    return lines


def _autoencoder_section(row: dict | None, data_row: dict) -> list[str]:
    """A latent run's autoencoder: reconstruction error and the FD floor of its samples."""
    if not row:
        return []
    return [
        "## Autoencoder",
        "",
        f"Latents {'x'.join(str(d) for d in row['latent_shape'])}, scale "
        f"{row['latent_scale']:.5f} (1 / std of the encoded train split). Every sample is a "
        "decoding, so the reconstructions' FD is the floor of every latent sampler's FD.",
        "",
        "| images | reconstruction MSE | FD ↓ | IS ↑ | accuracy ↑ |",
        "|---|---|---|---|---|",
        f"| real data | - | {data_row['fd']:.3f} | {data_row['inception_score']:.3f} | "
        f"{data_row['accuracy']:.3f} |",
        f"| reconstructions | {row['recon_mse']:.5f} | {row['fd']:.3f} | "
        f"{row['inception_score']:.3f} | {row['accuracy']:.3f} |",
        "",
        f"![reconstructions](eval/{row['grid']})",
        "",
    ]


def write_report(workdir: epath.PathLike) -> epath.Path:
    """Write workdir/report.md from eval/results.json and the timing records; return its path."""
    workdir = epath.Path(workdir).absolute()
    results_path = workdir / workdir_lib.EVAL_DIR / "results.json"
    if not results_path.exists():
        raise FileNotFoundError(f"{results_path} is missing: run `distill-jax evaluate` first.")
    results = json.loads(results_path.read_text())
    config = workdir_lib.read_config(workdir)
    rows, data_row = results["rows"], results["data"]
    clf = results["classifier"]
    lines = [
        f"# Guided distillation report: {workdir.name}",
        "",
        f"- dataset: `{results['dataset']}`; guidance range [{config['guidance']['w_min']}, "
        f"{config['guidance']['w_max']}]; stage two from {config['stage2']['n_start']} to "
        f"{config['stage2']['n_end']} steps (stochastic students: "
        f"{config['stage2']['stochastic']})",
        f"- machine: {_machine()}",
        f"- feature classifier `{clf['id']}`: test accuracy {clf['test_accuracy']:.4f}; FD "
        f"against the `{results['reference_split']}` split; {config['eval']['num_samples']} "
        f"samples per row, mean ± standard deviation over {config['eval']['seeds']} seed(s)",
        "",
    ]
    lines += _times_section(workdir)
    lines += _autoencoder_section(results.get("autoencoder"), data_row)
    lines += [
        "## Results",
        "",
        "Files: [CSV](eval/results.csv), [JSON](eval/results.json), "
        "[Markdown](eval/results.md). Teacher: guided DDIM, 2 network evaluations per step "
        "(1 where w = 0); students: one per step.",
        "",
        table.markdown_table(rows, data_row, link_grids="eval/"),
    ]
    for name, title in (
        ("fd_vs_evaluations.png", "FD against network evaluations"),
        ("metrics_vs_guidance.png", "Accuracy and FD against the guidance weight"),
    ):
        if (workdir / "eval" / name).exists():
            lines += [f"### {title}", "", f"![{title}](eval/{name})", ""]
    lines += ["## Sample grids", "", "One column per class.", ""]
    if (workdir / "eval" / "grids" / "data.png").exists():
        lines += ["Real data:", "", "![real data](eval/grids/data.png)", ""]
    for row in rows:
        title = f"{row['sampler']}, N={row['steps']}, w={row['w']:g}"
        lines += [
            f"**{title}** ([png]({'eval/' + row['grid']}))",
            "",
            f"![{title}](eval/{row['grid']})",
            "",
        ]
    return files.atomic_write(workdir / workdir_lib.REPORT_FILE, "\n".join(lines))
