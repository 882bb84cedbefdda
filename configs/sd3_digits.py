"""Distil an SD3-layout flow-matching teacher that diffusers trained on the captioned digits.

Usage (the teacher folder comes from scripts/train_diffusers_sd3.py, a StableDiffusion3Pipeline
folder without vae/: transformer/ (SD3Transformer2DModel on 8x8x1 pixels), scheduler/
(FlowMatchEulerDiscreteScheduler, shift 3), the two CLIPs with projection and T5 with their
tokenizers):

  python scripts/train_diffusers_sd3.py --out runs/sd3_digits_teacher --samples
  distill-jax run --config=configs/sd3_digits.py --workdir=runs/sd3 \
      --teacher=diffusers:runs/sd3_digits_teacher

The network (an MMDiT on the flow's velocity), its schedule and the text side come from the
import: the pipeline's three encoders encode the captions as encode_prompt does, T5 padded to
text.max_sequence_length = 16 tokens (the teacher was trained so). Stages, evaluation and
guidance range are configs/digits_dit.py's (w in [0, 4]; the teacher at 32, 8 and 2 Euler
steps of its own shifted sigmas beside the 4- and 1-step students). ':smoke' is a tiny
end-to-end run for CI with any 8x8x1 pixel-space SD3 pipeline folder.
"""

import pathlib
import runpy


def get_config(variant: str = ""):
    """The SD3-digits config; `variant` is '' (default) or 'smoke'."""
    if variant not in ("", "smoke"):
        raise ValueError(
            f"configs/sd3_digits.py variant {variant!r} is unknown: accepted '' or 'smoke'."
        )
    dit = runpy.run_path(str(pathlib.Path(__file__).with_name("digits_dit.py")))
    c = dit["get_config"](variant)
    c.data.name = "digits_text"
    c.text.enabled = True
    c.text.max_sequence_length = 16
    c.model.kind = "mmdit"  # replaced by the imported teacher's keys
    c.model.from_import = True
    # The flow's noise end (s = 1) is in its trained range: t = 1 reaches it within 1e-7
    # (configs/sd35_medium.py, docs/teachers.md).
    c.diffusion.logsnr_min = -33.0
    if variant == "smoke":
        c.eval.num_samples = 30  # a multiple of 30: balanced held-out prompts
    return c
