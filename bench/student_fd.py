"""Students against their guided teacher: FD ratios on held-out samples with paired noise.

For each workdir and each w, draws --num samples from the guided teacher (DDIM, --teacher_steps
steps, two network calls each) and from each student (--student_steps), all from the same
noise and the same balanced labels (a text run: the evaluation's held-out prompts), and prints
the FD to the train split (the evaluation's classifier features) of each, the ratio of each
student's FD to the teacher's, and its FD to the teacher's own samples. 'teacher' is the
workdir's teacher stage: an imported teacher as it was imported (not a fine-tune of it), so
the ratios say how well the students reproduce the teacher the user brought. Where the run
fine-tuned that teacher (an epsilon teacher's teacher_v stage), the fine-tune is sampled the
same way and printed beside it: the students' own teacher.

Usage:

    python bench/student_fd.py runs/dit_eps_ft runs/dit_eps_both --num 1000
"""

import argparse
import time

import numpy as np

from distill_jax import sampling
from distill_jax.data import loader
from distill_jax.diffusion import guidance
from distill_jax.evaluation import classifier as classifier_lib
from distill_jax.evaluation import metrics
from distill_jax.run import Run
from distill_jax.run import prompts as run_prompts
from distill_jax.run import stages as stages_lib


def _fd(classifier, reference, x: np.ndarray, other=None) -> float:
    feats, _ = classifier.features_and_probs(np.clip(x, -1.0, 1.0))
    stats = metrics.feature_statistics(feats)
    return metrics.frechet_distance(stats, reference if other is None else other)


def _finetuned_teacher_fn(run: Run):
    """The guided fine-tuned teacher (teacher_v) of `run`, or None where it has none."""
    if stages_lib.FINETUNE_STAGE not in [spec.name for spec in run.stages]:
        return None
    cond_fn = run.denoise_fn(run.stage(stages_lib.FINETUNE_STAGE))
    return guidance.make_guided_denoise_fn(cond_fn, null_condition=run.null_condition)


def evaluate_workdir(workdir: str, args) -> None:
    """Print one table for `workdir`."""
    run = Run.open(workdir)
    classifier = classifier_lib.load_or_train_classifier(run.config)
    x_ref, _ = loader.make_eval_arrays(run.config.data, split=run.config.data.train_split)
    reference = metrics.feature_statistics(classifier.features_and_probs(x_ref)[0])
    if run.text:  # the evaluation's held-out prompts, balanced over the digits
        prompts, _, _ = run_prompts.evaluation_prompts(args.num)
        labels = run_prompts.encode_prompts(run, prompts)
    else:
        labels = np.arange(args.num, dtype=np.int32) % run.info.num_classes
    finetuned = _finetuned_teacher_fn(run)
    print(f"\n{workdir}: {args.num} samples per cell, seed {args.seed}; FD to the train split")
    header = " | ".join(f"{n}-step student: FD, ratio, FD to teacher" for n in args.student_steps)
    tuned = "" if finetuned is None else f" fine-tuned teacher, {args.teacher_steps} steps: FD |"
    print(f"| w | teacher, {args.teacher_steps} steps: FD |{tuned} {header} |")
    print("|---|---|" + "---|" * (len(args.student_steps) + (finetuned is not None)))
    for w in args.weights:
        start = time.perf_counter()
        common = dict(w=w, conditions=labels, seed=args.seed)
        teacher = sampling.sample(run, model="teacher", steps=args.teacher_steps, **common)
        feats, _ = classifier.features_and_probs(np.clip(teacher, -1.0, 1.0))
        teacher_stats = metrics.feature_statistics(feats)
        teacher_fd = metrics.frechet_distance(teacher_stats, reference)
        cells = []
        if finetuned is not None:
            x = sampling.sample(
                run, model="teacher", steps=args.teacher_steps, fn=finetuned, **common
            )
            cells.append(f"{_fd(classifier, reference, x):.2f}")
        for steps in args.student_steps:
            x = sampling.sample(run, model="student", steps=steps, **common)
            fd = _fd(classifier, reference, x)
            to_teacher = _fd(classifier, reference, x, teacher_stats)
            cells.append(f"{fd:.2f}, {fd / teacher_fd:.3f}, {to_teacher:.2f}")
        print(f"| {w:g} | {teacher_fd:.2f} | {' | '.join(cells)} |", flush=True)
        print(f"  (w={w:g}: {time.perf_counter() - start:.0f}s)", flush=True)


def main() -> None:
    """Parse the flags and print a table per workdir."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+")
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--teacher_steps", type=int, default=64)
    parser.add_argument("--student_steps", type=int, nargs="+", default=[4, 1])
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0, 4.0])
    args = parser.parse_args()
    for workdir in args.workdirs:
        evaluate_workdir(workdir, args)


if __name__ == "__main__":
    main()
