"""Distil a text-to-image U-Net that diffusers trained on the captioned digits.

Usage (the teacher folder comes from scripts/train_diffusers_sd.py, a StableDiffusionPipeline
folder without vae/: unet/, scheduler/, text_encoder/ = all-MiniLM-L6-v2, tokenizer/):

  python scripts/train_diffusers_sd.py --out runs/sd_digits_teacher --samples
  distill-jax run --config=configs/sd_digits.py --workdir=runs/sd \
      --teacher=diffusers:runs/sd_digits_teacher

The network (a UNet2DConditionModel and its discrete schedule) and the text side come from the
import, not from this file: the U-Net's keys, the pipeline's text encoder
(config.text.pipeline, which encodes the captions again, as the pipeline's encode_prompt does)
and its prompt length. The log-SNR range is clipped to the teacher's trained range. ':smoke'
is a tiny end-to-end run for CI with any 8x8x1 pixel-space pipeline folder (the tests use
tests/data/diffusers/sd_digits_tiny).
"""

from distill_jax.config import base_config


def get_config(variant: str = ""):
    """The SD-digits config; `variant` is '' (default) or 'smoke'."""
    c = base_config()
    c.data.name = "digits_text"
    c.text.enabled = True
    c.model.kind = "sd_unet"  # replaced by the imported teacher's keys
    c.guidance.w_min, c.guidance.w_max = 0.0, 4.0  # pixel-space range of Meng et al.
    c.stage1.batch_size = 128
    c.stage1.num_steps = 800
    c.stage1.optimizer.learning_rate = 3e-4
    c.stage1.w_beta = 0.5
    c.stage2.batch_size = 64
    c.stage2.n_start = 16
    c.stage2.n_end = 1
    c.stage2.steps_per_round = 400
    c.stage2.final_rounds = 2
    c.stage2.final_steps_per_round = 400
    c.stage2.final_learning_rate = 3e-4
    c.eval.num_samples = 300  # a multiple of 30: balanced held-out prompts
    c.eval.seeds = 2
    c.eval.guidance_weights = (0.0, 1.0, 4.0)
    # 32: the students' start and diffusers' samples; 8 and 2: the teacher at twice the
    # 4- and 1-step students' evaluations.
    c.eval.teacher_steps = (32, 8, 2)
    c.eval.student_steps = (4, 1)
    if variant == "smoke":
        c.stage1.batch_size = 32
        c.stage1.num_steps = 10
        c.stage2.batch_size = 32
        c.stage2.n_start = 4
        c.stage2.steps_per_round = 5
        c.stage2.final_rounds = 1
        c.stage2.final_steps_per_round = 5
        c.train.log_every = 5
        c.train.checkpoint_every = 10
        c.eval.num_samples = 30
        c.eval.seeds = 1
        c.eval.guidance_weights = (0.0, 2.0)
        c.eval.teacher_steps = (4,)
        c.eval.student_steps = (1,)
    elif variant:
        raise ValueError(
            f"configs/sd_digits.py variant {variant!r} is unknown: accepted '' or 'smoke'."
        )
    return c
