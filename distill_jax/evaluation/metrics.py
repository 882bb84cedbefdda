"""Sample-quality metrics in the feature classifier's space: FD, IS analogue, accuracy.

- Frechet distance (FD): ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians
  fitted to the penultimate features of two sets (as FID does with Inception pool features).
  Like FID it is biased upwards for small sets, so compare numbers made with equal counts.
- Inception-Score analogue (IS): exp(E_x KL(p(y | x) || p(y))) of the classifier's softmax;
  between 1 and the number of classes, higher for confident and diverse samples.
- Conditional accuracy: fraction of samples classified as the label they were generated for.
- Thickness adherence (text runs): Spearman's rank correlation between the thickness word of
  each sample's prompt (thin < none < thick) and the sample's ink mass standardised within the
  digit its prompt names (a 1 has less ink than an 8 whatever the prompt says).
- Within-class diversity: the mean distance between the features of two samples of the same
  label, averaged over labels; it falls when a sampler collapses onto few modes per class
  (which FD and accuracy can miss at high guidance). Compare it with the real-data row's.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class FeatureStatistics:
    """Mean [F] and covariance [F, F] of a set of features."""

    mean: np.ndarray
    cov: np.ndarray


def feature_statistics(features: np.ndarray) -> FeatureStatistics:
    """Mean and (unbiased) covariance of features [N, F], N >= 2, in float64."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"features must be [N >= 2, F]; got shape {features.shape}.")
    return FeatureStatistics(features.mean(axis=0), np.cov(features, rowvar=False))


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """Frechet distance between N(a.mean, a.cov) and N(b.mean, b.cov).

    tr((S_a S_b)^(1/2)) is computed as tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), a symmetric PSD
    matrix, so no complex square roots appear. Clipped at 0 against rounding.
    """
    root_a = _sqrt_psd(a.cov)
    cross = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ b.cov @ root_a), 0.0, None)))
    diff = a.mean - b.mean
    value = diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2.0 * cross
    return float(max(value, 0.0))


def pooled_frechet_distance(
    sets: list[np.ndarray], references: list[np.ndarray]
) -> tuple[float, list[float]]:
    """FD between all of `sets` and all of `references` pooled, and FD of each pair.

    `sets[k]` and `references[k]` are the features [N_k, F] of one seed. FD's upward bias from
    a finite sample falls like 1 / n, so the pooled figure, on every seed's samples at once,
    estimates the distance between the two distributions with less of it than any pair (or
    their mean) does.
    """
    if len(sets) != len(references) or not sets:
        raise ValueError(
            f"need as many sets as references, at least one; got {len(sets)}, {len(references)}."
        )
    pairs = [
        frechet_distance(feature_statistics(a), feature_statistics(b))
        for a, b in zip(sets, references, strict=True)
    ]
    pooled = frechet_distance(
        feature_statistics(np.concatenate(sets)), feature_statistics(np.concatenate(references))
    )
    return pooled, pairs


def inception_score(probs: np.ndarray, eps: float = 1e-12) -> float:
    """exp(mean_x KL(p(y | x) || p(y))) of softmax probabilities [N, K]."""
    probs = np.asarray(probs, np.float64)
    marginal = probs.mean(axis=0, keepdims=True)
    kl = np.sum(probs * (np.log(probs + eps) - np.log(marginal + eps)), axis=1)
    return float(np.exp(kl.mean()))


def conditional_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows of probs [N, K] whose argmax equals labels [N]."""
    return float(np.mean(np.argmax(probs, axis=1) == np.asarray(labels)))


def within_class_diversity(features: np.ndarray, labels: np.ndarray) -> float:
    """Mean pairwise Euclidean distance of features [N, F] within each label.

    Averaged over the labels with at least two samples (NaN if none has).
    """
    features, labels = np.asarray(features, np.float64), np.asarray(labels)
    per_class = []
    for label in np.unique(labels):
        group = features[labels == label]
        if len(group) < 2:
            continue
        squared = np.sum(group**2, axis=1)
        d2 = squared[:, None] + squared[None, :] - 2.0 * group @ group.T
        distances = np.sqrt(np.clip(d2, 0.0, None))
        per_class.append(distances.sum() / (len(group) * (len(group) - 1)))
    return float(np.mean(per_class)) if per_class else float("nan")


def sample_metrics(
    features: np.ndarray,
    probs: np.ndarray,
    labels: np.ndarray,
    reference: FeatureStatistics,
) -> dict[str, float]:
    """{'fd', 'inception_score', 'accuracy', 'diversity'} of one sample set.

    FD is against the reference statistics; diversity is `within_class_diversity`.
    """
    return dict(
        fd=frechet_distance(feature_statistics(features), reference),
        inception_score=inception_score(probs),
        accuracy=conditional_accuracy(probs, labels),
        diversity=within_class_diversity(features, labels),
    )


def thickness_adherence(ink: np.ndarray, digits: np.ndarray, ranks: np.ndarray) -> float:
    """Spearman correlation of thickness ranks [N] with ink [N] standardised per digit [N]."""
    from scipy.stats import spearmanr

    ink, digits = np.asarray(ink, np.float64), np.asarray(digits)
    standard = np.zeros_like(ink)
    for digit in np.unique(digits):
        group = digits == digit
        spread = ink[group].std()
        standard[group] = (ink[group] - ink[group].mean()) / (spread if spread > 0 else 1.0)
    return float(spearmanr(np.asarray(ranks), standard).statistic)


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """Mean and the standard deviation over seeds (ddof = 1; 0 for a single seed)."""
    values = np.asarray(values, np.float64)
    spread = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return float(values.mean()), spread
