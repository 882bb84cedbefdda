"""Distil a DiT that diffusers trained on the bundled digits (a teacher trained elsewhere).

Usage (the teacher folder comes from scripts/train_diffusers_dit.py; the committed one is
tests/data/diffusers/dit_digits):

  distill-jax run --config=configs/digits_dit.py --workdir=runs/dit \
      --teacher=diffusers:tests/data/diffusers/dit_digits

The network (a DiT and its discrete schedule) comes from the import, not from this file: the
model section below only says what the import replaces. The log-SNR range is clipped to the
teacher's trained range on import. ':smoke' is a tiny end-to-end run for CI with any 8x8x1,
10-class diffusers DiT folder (the tests use tests/data/diffusers/dit_tiny_legacy).
"""

from distill_jax.config import base_config


def get_config(variant: str = ""):
    """The digits-DiT config; `variant` is '' (default) or 'smoke'."""
    c = base_config()
    c.data.name = "digits"
    c.model.kind = "dit"  # replaced by the imported teacher's keys
    c.model.from_import = True  # commands without --teacher=diffusers:DIR are refused
    c.guidance.w_min, c.guidance.w_max = 0.0, 4.0  # pixel-space range of Meng et al.
    # Shorter than configs/digits.py (whose stage one and rounds are tuned for its U-Net): the
    # import, distillation and evaluation take 7.5 minutes on the 2-core CPU (docs/teachers.md).
    # Stage one at 1e-3, a transformer's learning rate; rounds 8 -> 1 from a 16-step start.
    # An epsilon teacher (finetune.to='auto') is first fine-tuned to v on the digits: 2,000
    # steps at 1e-3 (600 at 3e-4 left a worse teacher), 9 minutes here; a v teacher skips it
    # (docs/teachers.md: the routes measured).
    c.finetune.num_steps = 2000
    c.finetune.optimizer.learning_rate = 1e-3
    c.finetune.optimizer.warmup_steps = 200
    c.stage1.batch_size = 128
    c.stage1.num_steps = 800
    c.stage1.optimizer.learning_rate = 1e-3
    c.stage1.w_beta = 0.5
    c.stage2.batch_size = 64
    c.stage2.n_start = 16
    c.stage2.n_end = 1
    c.stage2.steps_per_round = 400
    c.stage2.final_rounds = 2
    c.stage2.final_steps_per_round = 400
    c.stage2.final_learning_rate = 1e-3
    c.eval.num_samples = 300
    c.eval.seeds = 2
    c.eval.guidance_weights = (0.0, 1.0, 4.0)
    # 32: the students' start and diffusers' samples (bench/dit_import.py); 8 and 2: the
    # teacher at twice the 4- and 1-step students' evaluations.
    c.eval.teacher_steps = (32, 8, 2)
    c.eval.student_steps = (4, 1)
    if variant == "smoke":
        c.finetune.batch_size = 32
        c.finetune.num_steps = 5
        c.stage1.batch_size = 32
        c.stage1.num_steps = 10
        c.stage2.batch_size = 32
        c.stage2.n_start = 4
        c.stage2.steps_per_round = 5
        c.stage2.final_rounds = 1
        c.stage2.final_steps_per_round = 5
        c.train.log_every = 5
        c.train.checkpoint_every = 10
        c.eval.num_samples = 32
        c.eval.seeds = 1
        c.eval.guidance_weights = (0.0, 2.0)
        c.eval.teacher_steps = (4,)
        c.eval.student_steps = (1,)
    elif variant:
        raise ValueError(
            f"configs/digits_dit.py variant {variant!r} is unknown: accepted '' or 'smoke'."
        )
    return c
