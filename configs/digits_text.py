"""Text-conditioned digits: captions through a frozen MiniLM encoder, cross-attention U-Net.

Usage: --config=configs/digits_text.py (full run) or --config=configs/digits_text.py:smoke
(a tiny end-to-end run for CI). The dataset ('digits_text', distill_jax/data/captions.py) is
prepared on first use from the bundled digits and the pinned encoder weights (about 10 s).
Guidance is against the empty prompt; the evaluation prompts come from held-out templates.
"""

import pathlib
import runpy


def get_config(variant: str = ""):
    """The text config; `variant` is '' (default) or 'smoke' (as configs/digits.py's)."""
    if variant not in ("", "smoke"):
        raise ValueError(
            f"configs/digits_text.py variant {variant!r} is unknown: accepted '', 'smoke'."
        )
    digits = runpy.run_path(str(pathlib.Path(__file__).with_name("digits.py")))
    c = digits["get_config"](variant)
    c.data.name = "digits_text"
    c.text.enabled = True
    c.text.max_tokens = 16  # the length the dataset's conditions were encoded with
    if not variant:
        # Budget: about 25 minutes on the 2-core CPU (19 min 38 s measured with digits.py's
        # earlier stage-one and round settings: lr 5e-4, uniform w, rounds 16 and 8 of 300
        # steps, batch 128; stage one's batch of 256 adds about 4 minutes, not re-timed). A
        # text teacher step costs about 1.2x a class one in FLOPs (bench/bench_teacher.py:
        # 12.5 against 10.5 GFLOP at batch 128; cross-attention, 16 tokens). Stage one carried
        # most of the students' distance to the teacher on the first text run (600 steps: its
        # 32-step student 1.9 FD-to-teacher at w = 2, the 4-step student 3.4), so it gets 1,000
        # steps (issue 12's ablation: longer stage one helps most in the middle of the range),
        # paid for by a shorter teacher (2,000 steps; prompt accuracy was 0.99-1.0 at 2,500)
        # and one round fewer: stage one's student samples in 16 steps, rounds 16 -> 8 -> 4 ->
        # 2 -> 1 (the full-step teacher of the evaluation still takes 32 guided steps).
        c.teacher.num_steps = 2000
        c.stage1.num_steps = 1000
        c.stage2.n_start = 16
    c.eval.teacher_steps = (32,) if not variant else (8,)
    c.eval.student_steps = (8, 4, 1) if not variant else ()
    c.eval.num_samples = 300 if not variant else 60  # multiples of 30: balanced prompts
    c.eval.guidance_weights = (0.0, 1.0, 2.0, 4.0) if not variant else (0.0, 2.0)
    return c
