"""Latent digits: the bundled digits upsampled to 32x32, diffused in a factor-4 KL latent.

Usage: --config=configs/digits_latent.py (full run) or --config=configs/digits_latent.py:smoke.
The autoencoder (32x32x1 -> 8x8x4, L1 + 1e-6 KL as LDM's KL models) trains first; the teacher,
stage one and the halving rounds then run on its scaled latents with the default digits U-Net
(an 8x8 input, as in pixel space), and sampling decodes. Budget: the whole run in about
30 minutes on a 2-core CPU (stage one's batch of 256, from digits.py, adds about 4.5 of them;
not re-timed as a whole).
"""

import importlib.util
import pathlib


def digits_config(variant: str):
    """configs/digits.py's config (this file changes only what latents need)."""
    path = pathlib.Path(__file__).with_name("digits.py")
    spec = importlib.util.spec_from_file_location("distill_jax_digits_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def get_config(variant: str = ""):
    """The latent digits config; `variant` is '' (default) or 'smoke'."""
    if variant not in ("", "smoke"):
        raise ValueError(
            f"configs/digits_latent.py variant {variant!r} is unknown: accepted '', 'smoke'."
        )
    c = digits_config(variant)
    c.data.image_size = 32
    ae = c.autoencoder
    ae.enabled = True
    ae.channels = 16
    ae.channel_mult = (1, 2, 2)  # factor 4: 32x32 -> 8x8
    ae.num_res_blocks = 1
    ae.latent_channels = 4
    # About 3 minutes here: the L1 error is flat after ~600 steps at batch 32.
    ae.batch_size = 32
    ae.num_steps = 1000
    # Guidance range [0, 2], from the latent teacher's FD-vs-w curve (32 guided DDIM steps,
    # first run with [0, 4]): FD 14.3, 24.4, 73.2, 142.1, 253.4 at w = 0, 0.3, 1, 2, 4, and
    # accuracy 1.000 from w = 1 on. Guidance in this latent acts about twice as strongly as in
    # pixel space (pixel teacher: 10.5 ... 61.8 at w = 2), so w > 2 only trades away diversity.
    c.guidance.w_min, c.guidance.w_max = 0.0, 2.0
    if variant != "smoke":  # the smoke variant keeps digits.py's short evaluation
        c.eval.guidance_weights = (0.0, 0.3, 1.0, 2.0)
        # Teacher rows at 4 and 8 steps (8 and 16 evaluations, the students' neighbours) and
        # the full 32-step reference; the whole 1..32 sweep costs minutes and adds little.
        c.eval.teacher_steps = (4, 8, 32)
    # FD, IS and accuracy are measured at the digits' own 8x8 (the classifier resizes its
    # inputs): the same scale as the pixel run's figures, and 16x cheaper than at 32x32.
    c.eval.classifier.image_size = 8
    if variant == "smoke":
        ae.channels = 8
        ae.batch_size = 32
        ae.num_steps = 20
        # A third of the classifier's training (measured on the pixel digits' classifier:
        # test accuracy 0.977 against 0.987, 6 s against 17 s). The pixel smoke keeps the
        # default's classifier, whose accuracy tests/test_evaluation.py checks.
        c.eval.classifier.num_steps = 500
    return c
