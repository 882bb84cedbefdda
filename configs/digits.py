"""Default config: the bundled scikit-learn digits (8x8 grayscale, 10 classes).

Usage: --config=configs/digits.py (full default run) or --config=configs/digits.py:smoke
(a tiny end-to-end run for CI). Sizes are chosen so the whole pipeline fits a 2-core CPU.
"""

from distill_jax.config import base_config


def get_config(variant: str = ""):
    """The digits config; `variant` is '' (default) or 'smoke'."""
    c = base_config()
    c.data.name = "digits"
    c.model.kind = "unet"
    c.model.parameterisation = "v"
    c.model.channels = 32
    c.model.channel_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = (4,)
    c.model.num_heads = 2
    c.model.dropout = 0.1
    c.guidance.w_min, c.guidance.w_max = 0.0, 4.0  # pixel-space range of Meng et al.
    c.teacher.batch_size = 128
    c.teacher.num_steps = 3000
    c.stage1.num_steps = 800
    c.stage2.n_start = 256
    c.stage2.n_end = 1
    c.stage2.steps_per_round = 300
    c.stage2.final_rounds = 3
    c.stage2.final_steps_per_round = 600
    if variant == "smoke":
        c.model.channels = 16
        c.model.num_heads = 1
        c.teacher.batch_size = 32
        c.teacher.num_steps = 20
        c.stage1.batch_size = 32
        c.stage1.num_steps = 10
        c.stage2.batch_size = 32
        c.stage2.n_start = 8
        c.stage2.steps_per_round = 5
        c.stage2.final_rounds = 1
        c.stage2.final_steps_per_round = 5
        c.train.log_every = 5
        c.train.checkpoint_every = 10
        c.eval.num_samples = 64
        c.eval.seeds = 1
        c.eval.guidance_weights = (0.0, 2.0)
        c.eval.teacher_steps = (2, 8)
    elif variant:
        raise ValueError(f"configs/digits.py variant {variant!r} is unknown: accepted '', 'smoke'.")
    return c
