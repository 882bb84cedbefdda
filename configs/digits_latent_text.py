"""Latent text-conditioned digits: digits_latent.py's latents with digits_text.py's captions.

The autoencoder and latents of configs/digits_latent.py, with the captions, frozen MiniLM
encoder and cross-attention U-Net of configs/digits_text.py.

Usage: --config=configs/digits_latent_text.py (full run) or ...:smoke. The captioned digits are
upsampled to 32x32 and encoded to 8x8x4 latents once; each cached latent keeps its caption's
text condition (float16 [16, 384]) beside it. Guidance is against the empty prompt, in [0, 2]
as the latent class run's (guidance acts about twice as strongly in this latent space).
The full run took 24 min 38 s on the 2-core CPU with stage one at batch 128 (digits.py's
batch of 256 since adds about 4 minutes; not re-timed); its figures are in the README.
"""

import pathlib
import runpy


def _config(name: str, variant: str):
    """`get_config(variant)` of the config file `name` beside this one."""
    return runpy.run_path(str(pathlib.Path(__file__).with_name(name)))["get_config"](variant)


def get_config(variant: str = ""):
    """The latent text config; `variant` is '' (default) or 'smoke'."""
    if variant not in ("", "smoke"):
        raise ValueError(
            f"configs/digits_latent_text.py variant {variant!r} is unknown: accepted '', 'smoke'."
        )
    c = _config("digits_latent.py", variant)
    text = _config("digits_text.py", variant)
    c.data.name = text.data.name
    c.text = text.text
    c.teacher.num_steps = text.teacher.num_steps
    c.stage1.num_steps = text.stage1.num_steps
    c.stage2.n_start = text.stage2.n_start
    c.eval.teacher_steps = text.eval.teacher_steps
    c.eval.student_steps = text.eval.student_steps
    c.eval.num_samples = text.eval.num_samples
    c.eval.guidance_weights = (0.0, 1.0, 2.0) if not variant else (0.0, 2.0)
    return c
