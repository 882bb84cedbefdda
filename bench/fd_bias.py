"""How much of an FD-to-teacher figure is the finite-sample bias of the Frechet distance.

The evaluation scores each sampler by the FD between its samples and the full-step guided
teacher's samples from the same noise (`distill-jax evaluate`: on all seeds' samples at once,
`eval.seeds` x `eval.num_samples`, 2 x 300 on digits, and per seed of 300). FD estimated
from n samples is biased upwards by roughly k / n (Chong and Forsyth 2020, "Effectively
unbiased FID and Inception Score and where to find them"), so a small distance measured on
few samples is mostly bias. This draws `--num` samples per row (paired noise, seed 1000,
balanced labels), and prints for each row and w:

- the FD-to-teacher on all `--num` samples,
- the mean and spread of it over disjoint subsets of `--subset` samples (the evaluation's n),
- FD extrapolated to infinitely many samples from those two (FD(n) = FD_inf + k / n).

Usage:

    python bench/fd_bias.py --workdir runs/digits [--num 1500] [--subset 300] [--w 0,4]
        [--rows teacher:16,student:32,student:4,student:1]
"""

import argparse
import sys

import numpy as np

from distill_jax import sampling
from distill_jax.evaluation import classifier as classifier_lib
from distill_jax.evaluation import metrics
from distill_jax.evaluation.plan import teacher_step_counts
from distill_jax.run import Run


def _parse_rows(text: str) -> list[tuple[str, int]]:
    rows = []
    for spec in text.split(","):
        model, _, steps = spec.partition(":")
        if model not in ("teacher", "student") or not steps.isdigit():
            sys.exit(
                f"fd_bias: --rows entry {spec!r} is invalid: accepted MODEL:STEPS, "
                "MODEL 'teacher' or 'student', e.g. student:4."
            )
        rows.append((model, int(steps)))
    return rows


def _fd(a: np.ndarray, b: np.ndarray) -> float:
    return metrics.frechet_distance(metrics.feature_statistics(a), metrics.feature_statistics(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num", type=int, default=1500, help="samples per row")
    parser.add_argument("--subset", type=int, default=300, help="the evaluation's n")
    parser.add_argument("--w", default="0,4", help="comma-separated guidance weights")
    parser.add_argument("--rows", default="teacher:16,student:32,student:4,student:1")
    args = parser.parse_args()
    if args.subset < 2 or args.num < 2 * args.subset:
        sys.exit(
            f"fd_bias: --num {args.num} and --subset {args.subset} are invalid: "
            "accepted --subset >= 2 and --num at least twice --subset."
        )
    rows = _parse_rows(args.rows)
    run = Run.open(args.workdir)
    if run.text:
        sys.exit("fd_bias: a text-conditioned run is not supported: accepted class-label runs.")
    classifier = classifier_lib.load_or_train_classifier(run.config)
    labels = sampling.class_labels(args.num, run.info.num_classes)
    reference = max(teacher_step_counts(run.config))  # as `evaluate`'s FD-to-teacher

    def features(model: str, steps: int, w: float) -> np.ndarray:
        x = sampling.sample(run, model=model, steps=steps, w=w, conditions=labels, seed=1000)
        return classifier.features_and_probs(np.clip(x, -1.0, 1.0))[0]

    subsets = [slice(i, i + args.subset) for i in range(0, args.num - args.subset + 1, args.subset)]
    print(
        f"FD to the {reference}-step guided teacher; {args.num} samples per row, "
        f"{len(subsets)} disjoint subsets of {args.subset}"
    )
    print(f"| w | sampler | FD, n={args.num} | FD, n={args.subset} | FD extrapolated to n=inf |")
    print("|---|---|---|---|---|")
    for w in (float(v) for v in args.w.split(",")):
        teacher = features("teacher", reference, w)
        for model, steps in rows:
            f = features(model, steps, w)
            full = _fd(f, teacher)
            small = [_fd(f[s], teacher[s]) for s in subsets]
            # FD(n) = FD_inf + k / n through the two points (n = num, n = subset).
            k = (np.mean(small) - full) / (1 / args.subset - 1 / args.num)
            print(
                f"| {w:g} | {model} {steps} steps | {full:.3f} | {np.mean(small):.3f} ± "
                f"{np.std(small):.3f} | {full - k / args.num:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
