"""The digits DiTs that diffusers trained (scripts/train_diffusers_dit.py: v-prediction, and
epsilon with learned variance as DiT-XL/2): after import, our guided DDIM on diffusers' own
timesteps gives the images diffusers' DDIM gave from that noise."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import imported_dit

from distill_jax.diffusion import discrete, guidance, samplers
from distill_jax.models import denoiser

DATA = os.path.join(os.path.dirname(__file__), "data", "diffusers")


@pytest.mark.parametrize("folder", ["dit_digits", "dit_digits_eps"])
@pytest.mark.parametrize("w", [0.0, 1.0, 4.0])
def test_same_images_as_diffusers_ddim(folder, w):
    golden = np.load(os.path.join(DATA, folder, "ddim_golden.npz"))
    imported, model = imported_dit(os.path.join(DATA, folder))
    lo, hi = imported.logsnr_range
    guided = guidance.make_guided_denoise_fn(
        denoiser.make_denoise_fn(model, imported.params), null_condition=imported.num_classes
    )
    steps = int(golden["steps"])
    times = discrete.times_of_timesteps(
        discrete.scheduler_timesteps(steps, num_timesteps=1000),
        np.asarray(model.timestep_logsnrs),
        logsnr_min=lo,
        logsnr_max=hi,
    )
    ours = samplers.run_sampler(
        "ddim",
        guided,
        jnp.asarray(golden["noise"]),
        jnp.asarray(golden["labels"]),
        w,
        steps=steps,
        times=times,
        logsnr_min=lo,
        logsnr_max=hi,
    )
    theirs = golden[f"w={w:g}"]
    assert ours.shape == theirs.shape == (20, 8, 8, 1)
    # Relative to the images' scale: the epsilon teacher's w = 4 samples reach 8.9, and its
    # x-hat at t = 1 multiplies float32 rounding by 1/alpha = 157.
    scale = max(1.0, float(np.max(np.abs(theirs))))
    assert float(np.max(np.abs(np.asarray(ours) - theirs))) <= 1e-3 * scale
