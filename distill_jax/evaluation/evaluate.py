"""`distill-jax evaluate`: the table of samplers x step counts x guidance weights of a run.

The rows are planned in `plan` (evaluators, step counts, weights and guidance schedules).
For each w in config.eval.guidance_weights every row gets FD against real data, FD against the
full-step guided teacher's samples at the same w and seeds ("FD to teacher": how faithfully a
sampler reproduces the guided distribution, which FD to data cannot say at large w, where
guidance itself moves samples away from the data), IS, conditional accuracy and within-class
diversity (mean and spread over config.eval.seeds sample sets of config.eval.num_samples; every
sampler sees the same noise and labels for a seed, so differences between samplers are paired)
and the sampling time per image (after a warm-up call, so compilation is excluded).

FD to teacher is measured on all of a row's seeds at once (seeds x num_samples samples against
as many of the teacher's), since FD's upward bias from a finite sample is about k / n and these
distances are small; the per-seed figures are kept beside it (`fd_teacher_per_seed`, mean and
spread over seeds, each on num_samples).

On a text run the samples are drawn from prompts of held-out templates
(`run.prompts.evaluation_prompts`: every digit with thin / no / thick thickness word), the
accuracy is the prompt accuracy (the classifier's digit is the one the prompt names), and each
row also gets the thickness adherence (`metrics.thickness_adherence`).

Outputs in workdir/eval/: results.csv, results.json, results.md, fd_vs_evaluations.png,
metrics_vs_guidance.png, grids/<sampler>_N<steps>_w<w>.png, grids/data.png. Finished rows are
appended to eval/progress.jsonl as they complete, so an interrupted evaluation resumes where it
stopped; a row is reused only if its settings, classifier and model checkpoint are unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import time

import ml_collections
import numpy as np
from absl import logging
from etils import epath

from distill_jax import images, sampling
from distill_jax.data import captions, loader
from distill_jax.evaluation import classifier as classifier_lib
from distill_jax.evaluation import metrics, plots, table
from distill_jax.evaluation.plan import EVALUATORS, Entry, plan, teacher_step_counts
from distill_jax.run import Run
from distill_jax.run import prompts as prompt_lib
from distill_jax.run import workdir as workdir_lib


@dataclasses.dataclass
class _Context:
    """What every row of one evaluation shares: the run, the classifier, conditions, references.

    `conditions` is what the samplers are conditioned on (class labels, or a text run's prompt
    conditions [N, L, 384]); `digits` the class each sample should show; `thickness` a text
    run's thickness-word ranks (None on a class run).
    """

    run: Run
    classifier: classifier_lib.TrainedClassifier
    reference: metrics.FeatureStatistics
    conditions: np.ndarray
    batch_size: int
    grids: epath.Path
    digits: np.ndarray | None = None
    thickness: np.ndarray | None = None
    teacher_features: dict[tuple[float, int], np.ndarray] = dataclasses.field(default_factory=dict)
    teacher_fn: object = None
    autoencoder_row: dict | None = None  # a latent run's reconstructions (`_autoencoder_row`)

    @property
    def reference_steps(self) -> int:
        """N of the full-step teacher, the FD-to-teacher reference."""
        return max(teacher_step_counts(self.run.config))

    def is_reference(self, entry: Entry) -> bool:
        """Whether `entry` is the full-step constant-w teacher row itself."""
        return (
            entry.evaluator.model == "teacher"
            and entry.steps == self.reference_steps
            and entry.schedule.kind == "constant"
        )

    def draw(self, entry: Entry, seed: int, fn, conditions=None) -> np.ndarray:
        """Samples of `entry`'s sampler with seed 1000 + seed (paired across samplers).

        They are scored as the images they are, clipped to the data range [-1, 1] as every
        saved or shown sample is: the feature classifier never saw values outside it, and
        guided samples have them (about a third of the pixels at w = 4 on digits, up to 1.5).
        """
        x = sampling.sample(
            self.run,
            model=entry.evaluator.model,
            steps=entry.steps,
            stochastic=entry.evaluator.stochastic,
            batch_size=self.batch_size,
            w=entry.w,
            conditions=self.conditions if conditions is None else conditions,
            seed=1000 + seed,
            fn=fn,
            schedule=entry.schedule,
        )
        return np.clip(np.asarray(x), -1.0, 1.0)

    def teacher_reference(self, w: float, seed: int) -> np.ndarray:
        """Features of the full-step guided teacher's samples for (w, seed)."""
        if (w, seed) not in self.teacher_features:
            if self.teacher_fn is None:
                self.teacher_fn = sampling.denoise_fn(self.run, "teacher", self.reference_steps)
            entry = Entry(EVALUATORS[0], self.reference_steps, w)
            x = self.draw(entry, seed, self.teacher_fn)
            self.teacher_features[(w, seed)] = self.classifier.features_and_probs(x)[0]
        return self.teacher_features[(w, seed)]


def _context(run: Run) -> tuple[_Context, dict]:
    """The shared context and the real-data row (its metrics and grid)."""
    config, info = run.config, run.info
    classifier = classifier_lib.load_or_train_classifier(config)
    reference_split = config.eval.reference_split or config.data.train_split
    x_ref, _ = loader.make_eval_arrays(config.data, split=reference_split)
    reference = metrics.feature_statistics(classifier.features_and_probs(x_ref)[0])
    num = int(config.eval.num_samples)
    x_data, labels_data = loader.make_eval_arrays(
        config.data, split=config.data.eval_split, max_examples=num
    )
    feats, probs = classifier.features_and_probs(x_data)
    data_row = dict(
        split=config.data.eval_split,
        num_samples=len(x_data),
        **metrics.sample_metrics(feats, probs, labels_data, reference),
    )
    grids = run.path(workdir_lib.EVAL_DIR) / "grids"
    images.save_samples_png(
        grids / "data.png",
        images.displayable(x_data),
        labels_data,
        info.num_classes,
        rows=int(config.eval.grid_rows),
        title="real data",
    )
    conditions = digits = sampling.class_labels(num, info.num_classes)
    thickness = None
    if run.text:
        prompts, digits, thickness = prompt_lib.evaluation_prompts(num)
        conditions = prompt_lib.encode_prompts(run, prompts)
    batch_size = min(int(config.eval.batch_size), num)
    ctx = _Context(run, classifier, reference, conditions, batch_size, grids, digits, thickness)
    if run.latent:
        ctx.autoencoder_row = _autoencoder_row(ctx, x_data, labels_data)
    return ctx, data_row


def _autoencoder_row(ctx: _Context, x: np.ndarray, labels: np.ndarray) -> dict:
    """A latent run's floor: the eval images encoded and decoded, measured like samples.

    Every latent sampler's samples are decodings, so the reconstructions' FD is (about) the
    best FD any of them can reach.
    """
    encode, decode = ctx.run.codec()
    latents = sampling.apply_in_batches(encode, x, ctx.batch_size)
    recon = np.clip(sampling.apply_in_batches(decode, latents, ctx.batch_size), -1.0, 1.0)
    feats, probs = ctx.classifier.features_and_probs(recon)  # scored as images, like `draw`
    images.save_samples_png(
        ctx.grids / "reconstructions.png",
        images.displayable(recon),
        labels,
        ctx.run.image_info.num_classes,
        rows=int(ctx.run.config.eval.grid_rows),
        title="autoencoder reconstructions",
    )
    latents = ctx.run.latents()
    return dict(
        recon_mse=float(np.mean(np.square(recon - x))),
        latent_scale=latents.scale,
        latent_shape=list(latents.shape),
        grid="grids/reconstructions.png",
        **metrics.sample_metrics(feats, probs, labels, ctx.reference),
    )


def _row_key(ctx: _Context, entry: Entry) -> dict:
    run, e = ctx.run, ctx.run.config.eval
    spec = run.stage("teacher") if entry.evaluator.model == "teacher" else run.student(entry.steps)
    model = f"{run.directory(spec).name}:{json.dumps(run.finished(spec), sort_keys=True)}"
    return dict(
        sampler=entry.sampler,
        steps=entry.steps,
        w=entry.w,
        num_samples=int(e.num_samples),
        seeds=int(e.seeds),
        classifier=ctx.classifier.identity,
        model=model,
        reference_split=e.reference_split or run.config.data.train_split,
        # 2: rows carry fd_teacher; 3: the teacher counts 1 evaluation per step at w = 0;
        # 4: rows carry the within-class diversity; 5: samples scored clipped to [-1, 1];
        # 6: fd_teacher on all seeds' samples at once, the per-seed figures beside it.
        metrics_version=6,
    )


def _measure(ctx: _Context, entry: Entry, fn) -> dict:
    """One row: every seed's metrics (mean and spread), timing, and the seed-0 grid."""
    per_seed, features, seconds = [], [], 0.0
    for seed in range(int(ctx.run.config.eval.seeds)):
        start = time.perf_counter()
        x = ctx.draw(entry, seed, fn)
        seconds += time.perf_counter() - start
        feats, probs = ctx.classifier.features_and_probs(x)
        per_seed.append(metrics.sample_metrics(feats, probs, ctx.digits, ctx.reference))
        if ctx.thickness is not None:
            ink = captions.ink_mass(x)
            per_seed[-1]["thickness"] = metrics.thickness_adherence(ink, ctx.digits, ctx.thickness)
        if ctx.is_reference(entry):
            ctx.teacher_features[(entry.w, seed)] = feats
        features.append(feats)
        if seed == 0:
            images.save_samples_png(
                ctx.grids / entry.grid_name,
                images.displayable(x),
                ctx.digits,
                ctx.run.info.num_classes,
                rows=int(ctx.run.config.eval.grid_rows),
                title=f"{entry.sampler} N={entry.steps} w={entry.w:g}",
            )
    row = dict(
        sampler=entry.sampler,
        steps=entry.steps,
        w=entry.w,
        evaluations=sampling.evaluations_per_sample(
            entry.evaluator.model, entry.steps, entry.weights
        ),
        seconds_per_image=seconds / (len(ctx.conditions) * len(per_seed)),
        num_samples=len(ctx.conditions),
        seeds=len(per_seed),
        grid=f"grids/{entry.grid_name}",
    )
    for name in ("fd", "inception_score", "accuracy", "diversity", "thickness"):
        if name in per_seed[0]:
            row[name], row[f"{name}_std"] = metrics.mean_and_spread([m[name] for m in per_seed])
    teacher = [ctx.teacher_reference(entry.w, seed) for seed in range(len(features))]
    row["fd_teacher"], by_seed = metrics.pooled_frechet_distance(features, teacher)
    row["fd_teacher_per_seed"], row["fd_teacher_per_seed_std"] = metrics.mean_and_spread(by_seed)
    return row


def _load_progress(path: epath.Path) -> dict[str, dict]:
    """{row key: row} of eval/progress.jsonl (a line cut short by an interruption is skipped)."""
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[json.dumps(record["key"], sort_keys=True)] = record["row"]
    return done


def _measure_all(ctx: _Context, entries: list[Entry], progress: epath.Path) -> list[dict]:
    """Rows in plan order; reused from `progress` when unchanged, else measured and appended.

    The full-step teacher goes first: its samples are every other row's FD-to-teacher
    reference, so measuring it first avoids sampling it twice.
    """
    done = _load_progress(progress)
    order = sorted(range(len(entries)), key=lambda k: not ctx.is_reference(entries[k]))
    measured, loaded = {}, {}
    for index in order:
        entry = entries[index]
        key = _row_key(ctx, entry)
        key_text = json.dumps(key, sort_keys=True)
        if key_text in done and (ctx.grids / entry.grid_name).exists():
            measured[index] = done[key_text]
            continue
        mode = sampling.unguided_steps(entry.weights)
        group = (entry.evaluator.name, entry.steps, mode)
        if group not in loaded:
            loaded.clear()  # keep one model in memory
            fn = sampling.denoise_fn(
                ctx.run, entry.evaluator.model, entry.steps, weights=entry.weights
            )
            # Warm-up on one batch so the timing excludes compilation.
            ctx.draw(entry, 0, fn, conditions=ctx.conditions[: ctx.batch_size])
            loaded[group] = fn
        row = measured[index] = _measure(ctx, entry, loaded[group])
        with progress.open("a") as handle:
            handle.write(json.dumps(dict(key=key, row=row)) + "\n")
        logging.info(
            "[evaluate] %d/%d %s N=%d w=%g: FD %.3f FD-to-teacher %.3f IS %.2f acc %.3f",
            index + 1,
            len(entries),
            entry.sampler,
            entry.steps,
            entry.w,
            row["fd"],
            row["fd_teacher"],
            row["inception_score"],
            row["accuracy"],
        )
    return [measured[index] for index in range(len(entries))]


def unlabelled_message(name: str) -> str:
    """Why a run on data without class labels is not evaluated (one line)."""
    return (
        f"the data {name!r} has no class labels, and FD, IS and accuracy here use a classifier "
        "trained on them: `evaluate` does not apply (sample and export do). FID and CLIP score "
        "need Inception and CLIP weights, which distill_jax does not bundle."
    )


def evaluate_run(
    workdir: epath.PathLike,
    *,
    eval_config: ml_collections.ConfigDict | None = None,
    fresh: bool = False,
) -> dict[str, epath.Path]:
    """Measure every row of `plan`, write the tables, plots and grids, return their paths.

    Args:
      workdir: a run directory (config.json, teacher/, stage1/, stage2/).
      eval_config: replaces the recorded config.eval (sample counts, weights, ...).
      fresh: ignore eval/progress.jsonl and measure every row again.
    """
    run = Run.open(workdir, eval_config=eval_config)
    if not run.info.num_classes:
        raise ValueError(unlabelled_message(run.info.name))
    run.codec()  # a latent run without its finished autoencoder is refused before any write
    with run.locked():
        return _evaluate(run, fresh=fresh)


def _evaluate(run: Run, *, fresh: bool) -> dict[str, epath.Path]:
    """`evaluate_run` once the workdir's lock is held."""
    out = run.path(workdir_lib.EVAL_DIR)
    ctx, data_row = _context(run)
    progress = out / "progress.jsonl"
    if fresh and progress.exists():
        progress.unlink()
    rows = _measure_all(ctx, plan(run), progress)
    payload = dict(
        workdir=str(run.workdir),
        dataset=run.info.name,
        classifier=dict(
            id=ctx.classifier.identity,
            test_accuracy=ctx.classifier.test_accuracy,
            directory=str(ctx.classifier.directory),
        ),
        reference_split=run.config.eval.reference_split or run.config.data.train_split,
        data=data_row,
        autoencoder=ctx.autoencoder_row,
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
