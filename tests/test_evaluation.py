"""Evaluation: the feature classifier, FD / IS / accuracy, and `evaluate` on the smoke run."""

import json
import logging
import pathlib
import re
import time

import numpy as np
import pytest

from distill_jax.config import load_config
from distill_jax.data import loader
from distill_jax.evaluation import classifier as classifier_lib
from distill_jax.evaluation import evaluate, metrics

SMOKE_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "digits.py") + ":smoke"


@pytest.fixture(scope="session")
def digits_classifier(classifier_cache):
    config = load_config(SMOKE_CONFIG)
    config.eval.classifier.cache_dir = str(classifier_cache)
    return classifier_lib.load_or_train_classifier(config), config


def test_classifier_reaches_97_percent_on_digits_and_is_cached(digits_classifier):
    clf, config = digits_classifier
    x_test, labels_test = loader.make_eval_arrays(config.data, split="test")
    assert len(x_test) == 300
    accuracy = classifier_lib.accuracy(clf, x_test, labels_test)
    assert accuracy >= 0.97
    assert accuracy == pytest.approx(clf.test_accuracy)
    # The second call reads the cache: same folder, same predictions, no training.
    start = time.perf_counter()
    again = classifier_lib.load_or_train_classifier(config)
    assert time.perf_counter() - start < 10
    assert again.directory == clf.directory and (clf.directory / "info.json").exists()
    np.testing.assert_allclose(
        again.features_and_probs(x_test[:20])[1], clf.features_and_probs(x_test[:20])[1]
    )
    # Real test data: accuracy equals the classifier's, IS close to the 10 classes.
    feats, probs = clf.features_and_probs(x_test)
    assert metrics.conditional_accuracy(probs, labels_test) == pytest.approx(accuracy)
    assert metrics.inception_score(probs) > 8.0


def test_fd_is_zero_on_the_same_set_and_grows_with_noise(digits_classifier):
    clf, config = digits_classifier
    x, _ = loader.make_eval_arrays(config.data, split="train")
    reference = metrics.feature_statistics(clf.features_and_probs(x)[0])
    assert metrics.frechet_distance(reference, reference) == pytest.approx(0.0, abs=1e-6)
    rng = np.random.default_rng(0)
    fds = []
    for scale in (0.1, 0.3, 0.6):
        noisy = np.clip(x + scale * rng.standard_normal(x.shape), -1, 1).astype(np.float32)
        stats = metrics.feature_statistics(clf.features_and_probs(noisy)[0])
        fds.append(metrics.frechet_distance(stats, reference))
    assert 0 < fds[0] < fds[1] < fds[2]


def test_frechet_distance_matches_gaussians_in_closed_form():
    dim = 5
    a = metrics.FeatureStatistics(np.zeros(dim), np.eye(dim) * 4.0)
    b = metrics.FeatureStatistics(np.full(dim, 2.0), np.eye(dim))
    # |mu_a - mu_b|^2 + d (sigma_a - sigma_b)^2 for isotropic Gaussians.
    assert metrics.frechet_distance(a, b) == pytest.approx(dim * 4.0 + dim * 1.0)
    assert metrics.frechet_distance(a, b) == pytest.approx(metrics.frechet_distance(b, a))
    samples = np.random.default_rng(1).standard_normal((20000, dim))
    stats = metrics.feature_statistics(samples)
    assert (
        metrics.frechet_distance(stats, metrics.FeatureStatistics(np.zeros(dim), np.eye(dim)))
        < 0.01
    )


def test_inception_score_and_accuracy_extremes():
    k = 10
    one_hot = np.eye(k)[np.arange(100) % k]
    assert metrics.inception_score(one_hot) == pytest.approx(k, rel=1e-6)
    assert metrics.inception_score(np.tile(one_hot[:1], (100, 1))) == pytest.approx(1.0)
    assert metrics.inception_score(np.full((50, k), 1.0 / k)) == pytest.approx(1.0)
    labels = np.arange(100) % k
    assert metrics.conditional_accuracy(one_hot, labels) == 1.0
    assert metrics.conditional_accuracy(one_hot, (labels + 1) % k) == 0.0
    assert metrics.mean_and_spread([1.0, 3.0]) == (2.0, pytest.approx(np.sqrt(2.0)))
    assert metrics.mean_and_spread([1.0]) == (1.0, 0.0)


def test_within_class_diversity_measures_spread_inside_each_label():
    labels = np.array([0, 0, 1, 1, 1])
    features = np.array([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    # Class 0: one pair at distance 5; class 1: collapsed onto one point.
    assert metrics.within_class_diversity(features, labels) == pytest.approx(2.5)
    rng = np.random.default_rng(0)
    wide = rng.normal(size=(200, 8))
    labels = np.arange(200) % 10
    narrow = metrics.within_class_diversity(0.5 * wide, labels)
    assert narrow == pytest.approx(0.5 * metrics.within_class_diversity(wide, labels))
    # Moving whole classes apart changes nothing: only the spread inside a class counts.
    shifted = wide + 10.0 * labels[:, None]
    assert metrics.within_class_diversity(shifted, labels) == pytest.approx(
        metrics.within_class_diversity(wide, labels)
    )


def test_pooled_fd_is_closer_to_the_true_distance_than_the_per_seed_figures():
    # FD from n samples is biased upwards by about k / n: two seeds' sets pooled halve it.
    rng = np.random.default_rng(0)
    sets = [rng.normal(size=(150, 16)) for _ in range(2)]
    same = [rng.normal(size=(150, 16)) for _ in range(2)]  # the same distribution: FD 0
    pooled, pairs = metrics.pooled_frechet_distance(sets, same)
    assert len(pairs) == 2 and min(pairs) > 0.0
    assert pooled < 0.6 * np.mean(pairs)
    shifted = [x + 0.5 for x in same]  # FD between the distributions: 16 * 0.25 = 4
    pooled, pairs = metrics.pooled_frechet_distance(sets, shifted)
    assert abs(pooled - 4.0) < abs(np.mean(pairs) - 4.0)
    with pytest.raises(ValueError, match="as many sets as references"):
        metrics.pooled_frechet_distance(sets, same[:1])


def test_run_wrote_the_evaluation_and_a_report_whose_links_exist(smoke_workdir):
    out = smoke_workdir / "eval"
    for name in (
        "results.csv",
        "results.json",
        "results.md",
        "fd_vs_evaluations.png",
        "metrics_vs_guidance.png",
        "grids/data.png",
    ):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    got = {(r["sampler"], r["steps"], r["w"]) for r in rows}
    weights = (0.0, 2.0)
    want = {("teacher_ddim", n, w) for n in (2, 8) for w in weights}
    want |= {("student_ddim", n, w) for n in (8, 4, 2, 1) for w in weights}
    assert got == want
    for row in rows:
        # The guided teacher needs both halves per step, except at w = 0: the conditional one.
        guided = row["sampler"] == "teacher_ddim" and row["w"] != 0
        assert row["evaluations"] == (2 if guided else 1) * row["steps"]
        assert np.isfinite(row["fd"]) and 1.0 <= row["inception_score"] <= 10.0 + 1e-6
        assert 0.0 <= row["accuracy"] <= 1.0 and row["seconds_per_image"] > 0
        assert (out / row["grid"]).is_file()
        assert np.isfinite(row["fd_teacher"]) and row["fd_teacher"] >= 0.0
        assert row["diversity"] > 0
    by_key = {(r["sampler"], r["steps"], r["w"]): r for r in rows}
    for w in weights:
        # FD to teacher compares with the 8-step teacher's own samples (same noise): zero there,
        # positive for its coarser 2-step samples.
        assert by_key[("teacher_ddim", 8, w)]["fd_teacher"] < 1e-3
        assert by_key[("teacher_ddim", 2, w)]["fd_teacher"] > 1e-2
    assert results["classifier"]["test_accuracy"] >= 0.97
    assert len((out / "results.csv").read_text().splitlines()) == len(rows) + 1

    report = (smoke_workdir / "report.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", report)
    assert len(links) >= 2 * len(rows) + 5
    for link in links:
        assert (smoke_workdir / link).is_file(), link
    timings = json.loads((smoke_workdir / "timings.json").read_text())
    assert {"teacher", "distillation", "evaluation"} <= set(timings)
    for stage in ("teacher", "stage1", "stage2/steps_0001"):
        assert f"| {stage} |" in report


def test_evaluate_resumes_from_finished_rows(smoke_workdir, tmp_path, classifier_cache, caplog):
    # A copy, so the shared workdir stays as the run left it.
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(smoke_workdir, workdir)
    progress = workdir / "eval" / "progress.jsonl"
    lines = progress.read_text().splitlines()
    progress.write_text("\n".join(lines[:-1]) + "\n")  # the last row was interrupted
    (workdir / "eval" / "results.csv").unlink()
    config = load_config(SMOKE_CONFIG)
    config.eval.classifier.cache_dir = str(classifier_cache)
    caplog.set_level(logging.INFO, logger="absl")
    evaluate.evaluate_run(workdir, eval_config=config.eval)
    measured = [r for r in caplog.records if r.getMessage().startswith("[evaluate]")]
    assert len(measured) == 1  # only the interrupted row ran again
    assert len(progress.read_text().splitlines()) == len(lines)
    assert (workdir / "eval" / "results.csv").is_file()


def _eval_context(smoke_workdir, tmp_path, classifier_cache, seeds: int = 1):
    """(run, evaluation context) on a copy of the smoke run (_context writes the data grid)."""
    import shutil

    from distill_jax.run import Run

    workdir = tmp_path / "run"
    shutil.copytree(smoke_workdir, workdir)
    config = load_config(SMOKE_CONFIG)
    config.eval.classifier.cache_dir = str(classifier_cache)
    config.eval.seeds = seeds
    run = Run.open(workdir, eval_config=config.eval)
    return run, evaluate._context(run)[0]


def test_samples_are_scored_as_images_clipped_to_the_data_range(
    smoke_workdir, tmp_path, classifier_cache
):
    from distill_jax import sampling
    from distill_jax.evaluation.plan import EVALUATORS, Entry

    run, ctx = _eval_context(smoke_workdir, tmp_path, classifier_cache)
    entry = Entry(EVALUATORS[0], 2, 4.0)  # the 2-step guided teacher at w = 4
    fn = sampling.denoise_fn(run, "teacher", 2)
    drawn = ctx.draw(entry, 0, fn)
    raw = sampling.sample(
        run,
        model="teacher",
        steps=2,
        batch_size=ctx.batch_size,
        w=4.0,
        conditions=ctx.conditions,
        seed=1000,
        fn=fn,
        schedule=entry.schedule,
    )
    assert np.abs(raw).max() > 1.05  # guidance overshoots the data range
    np.testing.assert_array_equal(drawn, np.clip(raw, -1.0, 1.0))


def test_fd_to_teacher_is_measured_on_every_seed_at_once(smoke_workdir, tmp_path, classifier_cache):
    from distill_jax import sampling
    from distill_jax.evaluation.plan import EVALUATORS, Entry

    run, ctx = _eval_context(smoke_workdir, tmp_path, classifier_cache, seeds=2)
    reference = Entry(EVALUATORS[0], ctx.reference_steps, 2.0)
    row = evaluate._measure(
        ctx, reference, sampling.denoise_fn(run, "teacher", ctx.reference_steps)
    )
    assert row["seeds"] == 2 and row["fd_teacher"] < 1e-6 and row["fd_teacher_per_seed"] < 1e-6
    coarse = Entry(EVALUATORS[0], 2, 2.0)
    fn = sampling.denoise_fn(run, "teacher", 2)
    row = evaluate._measure(ctx, coarse, fn)
    features = [ctx.classifier.features_and_probs(ctx.draw(coarse, s, fn))[0] for s in (0, 1)]
    teacher = [ctx.teacher_reference(2.0, s) for s in (0, 1)]
    pooled = metrics.frechet_distance(
        metrics.feature_statistics(np.concatenate(features)),
        metrics.feature_statistics(np.concatenate(teacher)),
    )
    assert row["fd_teacher"] == pytest.approx(pooled, rel=1e-9)
    assert row["fd_teacher"] < row["fd_teacher_per_seed"]  # half the finite-sample bias
    assert f"{row['fd_teacher']:.3f} ({row['fd_teacher_per_seed']:.3f} ± " in (
        evaluate.table.markdown_table([row])
    )
