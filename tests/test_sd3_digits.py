"""The SD3-layout flow teacher that diffusers trained on the captioned digits
(scripts/train_diffusers_sd3.py): after import, our guided DDIM on the flow scheduler's own
shifted sigmas gives the images StableDiffusion3Pipeline's loop gave from that noise.

The committed folder (tests/data/diffusers/sd3_digits) holds transformer/, scheduler/ and the
pipeline's golden samples; its text parts are sd3_tiny's (the script copied them unchanged),
which the test links in.
"""

import os
import shutil

import numpy as np
from conftest import assert_same_guided_images

from distill_jax.diffusion import flow
from distill_jax.interop import pipeline as reader

DATA = os.path.join(os.path.dirname(__file__), "data", "diffusers")
TEXT_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3")
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")


def assemble(tmp_path) -> str:
    """The pipeline folder: the committed parts plus sd3_tiny's text encoders and tokenizers."""
    folder = tmp_path / "sd3_digits"
    shutil.copytree(os.path.join(DATA, "sd3_digits"), folder)
    for part in TEXT_PARTS + TOKENIZERS:
        os.symlink(os.path.join(DATA, "sd3_tiny", part), folder / part)
    return str(folder)


def test_same_images_as_the_stable_diffusion_3_loop(tmp_path):
    folder = assemble(tmp_path)
    golden = np.load(os.path.join(folder, "ddim_golden.npz"))
    imported = reader.read_teacher_folder(folder)
    assert imported.model["parameterisation"] == "flow" and imported.data_shape == (8, 8, 1)
    lo, hi = imported.logsnr_range
    model = reader.sd_model(imported)
    encoder = reader.text_encoder(folder, None, 77 + 16 + 1)  # the script's 16 T5 tokens
    sigmas = flow.scheduler_sigmas(int(golden["steps"]), num_train_timesteps=1000, shift=3.0)
    times = flow.times_of_flow_sigmas(sigmas, logsnr_min=lo, logsnr_max=hi)
    # Measured 1.6e-6, 1.7e-6 and 1.4e-5 at w = 0, 1, 4 (w = 4 amplifies float32 rounding).
    assert_same_guided_images(imported, model, encoder, golden, times, rtol=5e-5)
