"""A teacher that diffusers trained, sampled by diffusers and by distill_jax after import.

Prints, for each w, the FD to the real data (the evaluation's classifier features, the train
split as reference) and the classifier's accuracy (for a text teacher: prompt accuracy, the
digit its held-out prompt names) of:
- diffusers' own guided DDIM (`ddim_samples.npz` written by scripts/train_diffusers_dit.py:
  DiTPipeline's loop, or scripts/train_diffusers_sd.py: StableDiffusionPipeline's loop, with
  diffusers' DDIMScheduler and its timesteps);
- the imported teacher sampled by distill_jax on diffusers' timestep grid (--grid=teacher);
- the imported teacher on distill_jax's default grid t = i / N of the run's clipped cosine
  schedule;
and the ratio of the last to diffusers' FD. Same step count and number of samples throughout,
balanced labels; the noise differs between diffusers and distill_jax (tests/test_dit_digits.py
compares them on the same noise).

Usage:

    python bench/dit_import.py --workdir runs/dit \
        --samples tests/data/diffusers/dit_digits/ddim_samples.npz
    python bench/dit_import.py --workdir runs/sd \
        --samples runs/sd_digits_teacher/ddim_samples.npz
"""

import argparse
import time

import numpy as np

from distill_jax import sampling
from distill_jax.data import loader
from distill_jax.evaluation import classifier as classifier_lib
from distill_jax.evaluation import metrics
from distill_jax.run import Run
from distill_jax.run import prompts as run_prompts


def main() -> None:
    """Sample, score, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--samples", required=True, help="ddim_samples.npz of diffusers")
    parser.add_argument("--seed", type=int, default=1000)
    args = parser.parse_args()
    run = Run.open(args.workdir)
    theirs = np.load(args.samples)
    steps = int(theirs["steps"])
    classifier = classifier_lib.load_or_train_classifier(run.config)
    x_ref, _ = loader.make_eval_arrays(run.config.data, split=run.config.data.train_split)
    reference = metrics.feature_statistics(classifier.features_and_probs(x_ref)[0])

    def score(x: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
        feats, probs = classifier.features_and_probs(np.clip(x, -1.0, 1.0))
        fd = metrics.frechet_distance(metrics.feature_statistics(feats), reference)
        return fd, metrics.conditional_accuracy(probs, labels)

    if "prompts" in theirs.files:  # a text teacher: the held-out prompts, in order
        texts = [str(p) for p in theirs["prompts"]]
        prompts, digits, _ = run_prompts.evaluation_prompts(len(texts))
        assert prompts == texts, "the samples' prompts are not the evaluation's"
        labels, conditions = digits, run_prompts.encode_prompts(run, texts)
    else:
        labels = conditions = np.asarray(theirs["labels"], np.int32)
    print(
        f"{steps}-step guided DDIM, {len(labels)} samples per row; FD to the train split / accuracy"
    )
    print(
        "| w | diffusers DDIM | distill_jax, diffusers' grid | distill_jax, default grid | "
        "FD ratio (default grid / diffusers) |"
    )
    print("|---|---|---|---|---|")
    for key in (k for k in theirs.files if k.startswith("w=")):
        w = float(key[2:])
        cells = [score(theirs[key], labels)]
        for grid in ("teacher", "uniform"):
            start = time.perf_counter()
            x = sampling.sample(
                run,
                model="teacher",
                steps=steps,
                w=w,
                conditions=conditions,
                seed=args.seed,
                grid=grid,
            )
            cells.append(score(x, labels))
            print(f"  (w={w:g}, grid={grid}: {time.perf_counter() - start:.1f}s)", flush=True)
        shown = " | ".join(f"{fd:.2f} / {acc:.3f}" for fd, acc in cells)
        print(f"| {w:g} | {shown} | {cells[2][0] / cells[0][0]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
