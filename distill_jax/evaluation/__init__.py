"""Evaluation: the feature classifier, FD / IS / accuracy, the table, plots and the report."""

from distill_jax.evaluation.classifier import TrainedClassifier, load_or_train_classifier
from distill_jax.evaluation.evaluate import evaluate_run, plan, teacher_step_counts
from distill_jax.evaluation.metrics import (
    FeatureStatistics,
    conditional_accuracy,
    feature_statistics,
    frechet_distance,
    inception_score,
)
from distill_jax.evaluation.report import record_timing, write_report

__all__ = [
    "FeatureStatistics",
    "TrainedClassifier",
    "conditional_accuracy",
    "evaluate_run",
    "feature_statistics",
    "frechet_distance",
    "inception_score",
    "load_or_train_classifier",
    "plan",
    "record_timing",
    "teacher_step_counts",
    "write_report",
]
