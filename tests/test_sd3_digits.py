"""The SD3-layout flow teacher that diffusers trained on the captioned digits
(scripts/train_diffusers_sd3.py): after import, our guided DDIM on the flow scheduler's own
shifted sigmas gives the images StableDiffusion3Pipeline's loop gave from that noise.

The committed folder (tests/data/diffusers/sd3_digits) holds transformer/, scheduler/ and the
pipeline's golden samples; its text parts are sd3_tiny's (the script copied them unchanged),
which the test links in.
"""

import os
import shutil

import jax.numpy as jnp
import numpy as np

from distill_jax.diffusion import flow, guidance, samplers
from distill_jax.interop import pipeline as reader
from distill_jax.models import denoiser

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
    prompts = [str(p) for p in golden["prompts"]]
    conditions, _ = encoder.encode(prompts)
    null, _ = encoder.encode([""])
    guided = guidance.make_guided_denoise_fn(
        denoiser.make_denoise_fn(model, imported.params), null_label=jnp.asarray(null[0])
    )
    steps = int(golden["steps"])
    sigmas = flow.scheduler_sigmas(steps, num_train_timesteps=1000, shift=3.0)
    times = flow.times_of_flow_sigmas(sigmas, logsnr_min=lo, logsnr_max=hi)
    weights = (0.0, 1.0, 4.0)
    n = len(prompts)
    ours = samplers.run_sampler(
        "ddim",
        guided,
        jnp.tile(jnp.asarray(golden["noise"]), (3, 1, 1, 1)),
        jnp.tile(jnp.asarray(conditions), (3, 1, 1)),
        jnp.repeat(jnp.asarray(weights), n),
        steps=steps,
        times=times,
        logsnr_min=lo,
        logsnr_max=hi,
    )
    for i, w in enumerate(weights):
        theirs = golden[f"w={w:g}"]
        assert theirs.shape == (n, 8, 8, 1)
        error = float(np.max(np.abs(np.asarray(ours[i * n : (i + 1) * n]) - theirs)))
        # Measured 1.6e-6, 1.7e-6 and 1.4e-5 (w = 4 amplifies float32 rounding 5-fold).
        assert error <= 5e-5 * max(1.0, float(np.max(np.abs(theirs)))), (w, error)
