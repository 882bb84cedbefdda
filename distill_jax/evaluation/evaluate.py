"""`distill-jax evaluate`: the table of samplers x step counts x guidance weights of a run.

For each w in config.eval.guidance_weights it measures
- the teacher with guided DDIM at N in config.eval.teacher_steps (default 1, 2, 4, ..., n_start),
  2N network evaluations per sample;
- every finished student (or those in config.eval.student_steps), deterministic (DDIM) at its
  N (stage one's student at n_start);
- the students with the distilled stochastic sampler when config.stage2.stochastic is set;
with FD against real data, FD against the full-step guided teacher's samples at the same w and
seed ("FD to teacher": how faithfully a sampler reproduces the guided distribution, which FD to
data cannot say at large w, where guidance itself moves samples away from the data), IS and
conditional accuracy (mean and spread over config.eval.seeds sample sets of
config.eval.num_samples; every sampler sees the same noise and labels for a seed, so
differences between samplers are paired) and the sampling time per image (after a warm-up call,
so compilation is excluded).

Outputs in workdir/eval/: results.csv, results.json, results.md, fd_vs_evaluations.png,
metrics_vs_guidance.png, grids/<sampler>_N<steps>_w<w>.png, grids/data.png. Finished rows are
appended to eval/progress.jsonl as they complete, so an interrupted evaluation resumes where it
stopped; a row is reused only if its settings, classifier and model checkpoint are unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import ml_collections
import numpy as np

from distill_jax import checkpoints, sampling
from distill_jax.data import loader
from distill_jax.evaluation import classifier as classifier_lib
from distill_jax.evaluation import metrics, plots, table

SAMPLERS = ("teacher_ddim", "student_ddim", "student_stochastic")
_MODEL = {"teacher_ddim": "teacher", "student_ddim": "student", "student_stochastic": "student"}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One row of the table: a sampler, its step count and a guidance weight."""

    sampler: str
    steps: int
    w: float

    @property
    def grid_name(self) -> str:
        """The file name of its sample grid."""
        return f"{self.sampler}_N{self.steps:04d}_w{self.w:g}.png"


def teacher_step_counts(config: ml_collections.ConfigDict) -> list[int]:
    """config.eval.teacher_steps, or 1, 2, 4, ..., stage2.n_start when empty."""
    if config.eval.teacher_steps:
        return sorted({int(n) for n in config.eval.teacher_steps})
    counts, n = [], 1
    while n <= int(config.stage2.n_start):
        counts.append(n)
        n *= 2
    return counts


def plan(run: sampling.Run) -> list[Entry]:
    """Every row to measure, grouped by (sampler, steps) so each compiles once."""
    weights = [float(w) for w in run.config.eval.guidance_weights]
    groups = [("teacher_ddim", n) for n in teacher_step_counts(run.config)]
    student_steps = sorted(sampling.student_directories(run), reverse=True)
    if run.config.eval.student_steps:
        wanted = {int(n) for n in run.config.eval.student_steps}
        student_steps = [n for n in student_steps if n in wanted]
    groups += [("student_ddim", n) for n in student_steps]
    if run.config.stage2.stochastic:
        groups += [("student_stochastic", n) for n in student_steps]
    low, high = float(run.config.guidance.w_min), float(run.config.guidance.w_max)
    return [
        Entry(sampler, steps, w)
        for sampler, steps in groups
        for w in weights
        if sampler.startswith("teacher") or low <= w <= high
    ]


def _model_identity(run: sampling.Run, entry: Entry) -> str:
    directory = sampling.model_directory(run, _MODEL[entry.sampler], entry.steps)
    if directory is None:
        return "exact_gmm"
    return f"{directory.name}:{json.dumps(checkpoints.stage_finished(directory), sort_keys=True)}"


def _row_key(run: sampling.Run, entry: Entry, classifier_id: str) -> dict:
    e = run.config.eval
    return dict(
        sampler=entry.sampler,
        steps=entry.steps,
        w=entry.w,
        num_samples=int(e.num_samples),
        seeds=int(e.seeds),
        classifier=classifier_id,
        model=_model_identity(run, entry),
        reference_split=e.reference_split or run.config.data.train_split,
        metrics_version=2,  # 2: rows carry fd_teacher
    )


def _load_progress(path: pathlib.Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by an interruption
            continue
    return records


def _display(x: np.ndarray, info_shape: tuple) -> np.ndarray:
    """Samples as uint8 images for grids, or unchanged vectors."""
    return sampling.to_uint8(x) if len(info_shape) == 3 else x


def evaluate_run(
    workdir: str | pathlib.Path,
    *,
    eval_config: ml_collections.ConfigDict | None = None,
    fresh: bool = False,
    log=print,
) -> dict[str, pathlib.Path]:
    """Measure every row of `plan`, write the tables, plots and grids, return their paths.

    Args:
      workdir: a run directory (config.json, teacher/, stage1/, stage2/).
      eval_config: replaces the recorded config.eval (sample counts, weights, ...).
      fresh: ignore eval/progress.jsonl and measure every row again.
      log: progress printer.
    """
    run = sampling.load_run(workdir, eval_config=eval_config)
    config, info = run.config, run.info
    out = run.workdir / "eval"
    grids = out / "grids"
    grids.mkdir(parents=True, exist_ok=True)
    classifier = classifier_lib.load_or_train_classifier(config, log=log)
    reference_split = config.eval.reference_split or config.data.train_split
    x_ref, _ = loader.make_eval_arrays(config.data, split=reference_split)
    reference = metrics.feature_statistics(classifier.features_and_probs(x_ref)[0])
    x_data, labels_data = loader.make_eval_arrays(
        config.data, split=config.data.eval_split, max_examples=int(config.eval.num_samples)
    )
    feats, probs = classifier.features_and_probs(x_data)
    data_row = dict(
        split=config.data.eval_split,
        num_samples=len(x_data),
        **metrics.sample_metrics(feats, probs, labels_data, reference),
    )
    rows_per_class = int(config.eval.grid_rows)
    plots.save_samples_png(
        grids / "data.png",
        _display(x_data, info.shape),
        labels_data,
        info.num_classes,
        rows=rows_per_class,
        title="real data",
    )

    progress_path = out / "progress.jsonl"
    if fresh and progress_path.exists():
        progress_path.unlink()
    done = {json.dumps(r["key"], sort_keys=True): r["row"] for r in _load_progress(progress_path)}
    entries = plan(run)
    num, seeds = int(config.eval.num_samples), int(config.eval.seeds)
    labels = sampling.class_labels(num, info.num_classes)
    batch_size = min(int(config.eval.batch_size), num)
    measured, loaded = {}, {}
    reference_steps = max(teacher_step_counts(config))
    teacher_refs: dict[tuple[float, int], metrics.FeatureStatistics] = {}
    teacher_fn = []  # the full-step teacher's denoise_fn, built on first use

    def teacher_reference(w: float, seed: int) -> metrics.FeatureStatistics:
        """Feature statistics of the full-step guided teacher's samples for (w, seed)."""
        if (w, seed) not in teacher_refs:
            if not teacher_fn:
                teacher_fn.append(sampling.denoise_fn(run, "teacher", reference_steps))
            x = sampling.sample(
                run,
                model="teacher",
                steps=reference_steps,
                stochastic=False,
                batch_size=batch_size,
                w=w,
                labels=labels,
                seed=1000 + seed,
                fn=teacher_fn[0],
            )
            teacher_refs[(w, seed)] = metrics.feature_statistics(
                classifier.features_and_probs(x)[0]
            )
        return teacher_refs[(w, seed)]

    # The full-step teacher goes first: its samples are every other row's FD-to-teacher
    # reference, so measuring it first avoids sampling it twice. The table keeps plan order.
    order = sorted(
        range(len(entries)),
        key=lambda k: entries[k] != Entry("teacher_ddim", reference_steps, entries[k].w),
    )
    for index in order:
        entry = entries[index]
        key = _row_key(run, entry, classifier.identity)
        key_text = json.dumps(key, sort_keys=True)
        if key_text in done and (grids / entry.grid_name).exists():
            measured[index] = done[key_text]
            continue
        model = _MODEL[entry.sampler]
        kwargs = dict(
            model=model,
            steps=entry.steps,
            stochastic=entry.sampler == "student_stochastic",
            batch_size=batch_size,
        )
        group = (entry.sampler, entry.steps)
        if group not in loaded:
            loaded.clear()  # keep one model in memory
            fn = sampling.denoise_fn(run, model, entry.steps)
            # Warm-up on one batch so the timing below excludes compilation.
            sampling.sample(run, w=entry.w, labels=labels[:batch_size], seed=0, fn=fn, **kwargs)
            loaded[group] = fn
        per_seed, seconds = [], 0.0
        for seed in range(seeds):
            start = time.perf_counter()
            x = sampling.sample(
                run, w=entry.w, labels=labels, seed=1000 + seed, fn=loaded[group], **kwargs
            )
            seconds += time.perf_counter() - start
            feats, probs = classifier.features_and_probs(x)
            per_seed.append(metrics.sample_metrics(feats, probs, labels, reference))
            if entry == Entry("teacher_ddim", reference_steps, entry.w):
                teacher_refs[(entry.w, seed)] = metrics.feature_statistics(feats)
            per_seed[-1]["fd_teacher"] = metrics.frechet_distance(
                metrics.feature_statistics(feats), teacher_reference(entry.w, seed)
            )
            if seed == 0:
                plots.save_samples_png(
                    grids / entry.grid_name,
                    _display(x, info.shape),
                    labels,
                    info.num_classes,
                    rows=rows_per_class,
                    title=f"{entry.sampler} N={entry.steps} w={entry.w:g}",
                )
        row = dict(
            sampler=entry.sampler,
            steps=entry.steps,
            w=entry.w,
            evaluations=sampling.evaluations_per_sample(model, entry.steps),
            seconds_per_image=seconds / (num * seeds),
            num_samples=num,
            seeds=seeds,
            grid=f"grids/{entry.grid_name}",
        )
        for name in ("fd", "fd_teacher", "inception_score", "accuracy"):
            row[name], row[f"{name}_std"] = metrics.mean_and_spread([m[name] for m in per_seed])
        measured[index] = row
        with progress_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(dict(key=key, row=row)) + "\n")
        log(
            f"[evaluate] {index + 1}/{len(entries)} {entry.sampler} N={entry.steps} "
            f"w={entry.w:g}: FD {row['fd']:.3f} FD-to-teacher {row['fd_teacher']:.3f} "
            f"IS {row['inception_score']:.2f} "
            f"acc {row['accuracy']:.3f}"
        )

    rows = [measured[index] for index in range(len(entries))]
    payload = dict(
        workdir=str(run.workdir),
        dataset=info.name,
        classifier=dict(
            id=classifier.identity,
            test_accuracy=classifier.test_accuracy,
            directory=str(classifier.directory),
        ),
        reference_split=reference_split,
        data=data_row,
        rows=rows,
    )
    paths = table.write_tables(out, rows, payload, data_row)
    if rows:
        paths["fd_plot"] = plots.plot_fd_vs_evaluations(
            rows, out / "fd_vs_evaluations.png", data_row["fd"]
        )
        paths["guidance_plot"] = plots.plot_metrics_vs_guidance(
            rows, out / "metrics_vs_guidance.png"
        )
    return paths
