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

import pathlib
import runpy


def get_config(variant: str = ""):
    """The SD-digits config; `variant` is '' (default) or 'smoke'."""
    if variant not in ("", "smoke"):
        raise ValueError(
            f"configs/sd_digits.py variant {variant!r} is unknown: accepted '' or 'smoke'."
        )
    # configs/digits_dit.py's schedule of stages and evaluation (w = 0, 1, 4; teacher at 32,
    # 8 and 2 steps: diffusers' samples and twice the 4- and 1-step students'), on captions.
    dit = runpy.run_path(str(pathlib.Path(__file__).with_name("digits_dit.py")))
    c = dit["get_config"](variant)
    c.data.name = "digits_text"
    c.text.enabled = True
    c.model.kind = "sd_unet"  # replaced by the imported teacher's keys
    if variant == "smoke":
        c.eval.num_samples = 30  # a multiple of 30: balanced held-out prompts
    return c
