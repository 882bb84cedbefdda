"""A Stable-Diffusion-family pipeline folder read as a whole: diffusers' own sampling reproduced,
and folders whose parts are missing or do not fit each other refused.

Golden files: scripts/golden_unet.py, golden_text.py, golden_vae.py, golden_pipeline.py
(PyTorch, diffusers and transformers; CI never installs them).
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.diffusion import discrete, guidance, samplers
from distill_jax.interop import core
from distill_jax.interop import pipeline as reader
from distill_jax.interop import vae as vae_reader
from distill_jax.models import autoencoder, denoiser, kinds

DATA = os.path.join(os.path.dirname(__file__), "data", "diffusers")
TINY = os.path.join(DATA, "sd_tiny")
PROMPTS = ["a photo of a cat", "a thick, right-leaning seven", ""]
NEGATIVE = ["blurry", "", "a dog"]


@pytest.fixture(scope="module")
def tiny():
    imported = reader.read_sd_folder(TINY)
    return imported, reader.sd_model(imported), reader.text_encoder(TINY)


def test_record_of_the_tiny_pipeline(tiny):
    imported, _, encoder = tiny
    record = imported.record
    assert imported.data_shape == (16, 16, 4)  # the U-Net's latents
    assert sorted(record["parts"]) == ["scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    assert record["text"]["width"] == encoder.width == 32
    assert record["text"]["max_tokens"] == encoder.max_tokens == 77
    assert record["vae"]["scaling_factor"] == pytest.approx(0.18215)
    assert record["schedule"]["set_alpha_to_one"] is False
    assert imported.model["parameterisation"] == "eps"


@pytest.mark.parametrize("case", ["plain", "negative"])
def test_guided_ddim_equals_stable_diffusion_pipeline(tiny, case):
    """StableDiffusionPipeline (prompts encoded by its CLIP, guidance_scale s = 1 + w, the
    empty or the negative prompt as the unconditional input, DDIMScheduler, VAE decode) against
    our guided teacher stepping on the same timesteps: every step's latents and the images."""
    imported, model, encoder = tiny
    golden = np.load(os.path.join(DATA, "sd_pipeline_golden.npz"))
    lo, hi = imported.logsnr_range
    schedule = imported.record["schedule"]
    steps = int(golden["steps"])
    timesteps = discrete.scheduler_timesteps(
        steps, num_timesteps=1000, spacing="leading", steps_offset=schedule["steps_offset"]
    )
    np.testing.assert_array_equal(timesteps, golden["timesteps"])
    table = np.asarray(kinds.discrete_logsnrs(core.model_config(imported.model)))
    times = discrete.times_of_timesteps(timesteps, table, logsnr_min=lo, logsnr_max=hi)[::-1]
    conditions, _ = encoder.encode(PROMPTS)
    null, _ = encoder.encode(NEGATIVE if case == "negative" else [""] * len(PROMPTS))
    guided = guidance.make_guided_denoise_fn(
        denoiser.make_denoise_fn(model, imported.params), null_label=jnp.asarray(null)
    )
    w = float(golden[f"{case}_guidance_scale"]) - 1.0
    kw = dict(logsnr_min=lo, logsnr_max=hi)

    @jax.jit
    def step(z, t, s):
        xhat = guided(z, t, conditions, jnp.full(3, w))
        # set_alpha_to_one=False: diffusers' last step lands on timestep 0's noise level, which
        # is t = 0 of the clipped schedule; an ordinary DDIM step there, not x-hat.
        return samplers.ddim_step(xhat, z, t, s, last=jnp.zeros(3, bool), **kw)

    z = jnp.asarray(golden["latents"])
    for j, want in enumerate(golden[f"{case}_states"]):
        z = step(z, jnp.full(3, times[j]), jnp.full(3, times[j + 1]))
        assert float(jnp.max(jnp.abs(z - want))) <= 1e-5 * max(1.0, np.abs(want).max()), j
    vae_model, vae_params, record = vae_reader.read_vae_folder(os.path.join(TINY, "vae"))
    _, decode = autoencoder.make_codec(vae_model, vae_params, record["scaling_factor"])
    images = np.clip(np.asarray(jax.jit(decode)(z)) / 2 + 0.5, 0, 1)
    np.testing.assert_allclose(images, golden[f"{case}_images"], rtol=0, atol=1e-5)


def _copy(tmp_path) -> str:
    folder = tmp_path / "pipe"
    shutil.copytree(TINY, folder)
    return str(folder)


def _edit(path: str, **changes) -> None:
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)


def test_missing_part_refused(tmp_path):
    folder = _copy(tmp_path)
    shutil.rmtree(os.path.join(folder, "tokenizer"))
    with pytest.raises(core.FolderError, match=r"not a complete .*tokenizer/ missing"):
        reader.read_sd_folder(folder, weights=False)
    folder = _copy(tmp_path / "b")
    shutil.rmtree(os.path.join(folder, "vae"))  # model_index.json names it
    with pytest.raises(core.FolderError, match=r"vae/ missing"):
        reader.read_sd_folder(folder, weights=False)


def test_parts_that_do_not_fit_refused(tmp_path):
    folder = _copy(tmp_path)
    _edit(os.path.join(folder, "vae", "config.json"), latent_channels=8)
    with pytest.raises(core.FolderError, match="latents have 8 channels but the U-Net takes 4"):
        reader.read_sd_folder(folder, weights=False)
    folder = _copy(tmp_path / "b")
    _edit(os.path.join(folder, "unet", "config.json"), cross_attention_dim=48)
    with pytest.raises(
        core.FolderError, match="states are 32 wide but .*cross_attention_dim is 48"
    ):
        reader.read_sd_folder(folder, weights=False)
    folder = _copy(tmp_path / "c")
    _edit(os.path.join(folder, "text_encoder", "config.json"), vocab_size=500)
    with pytest.raises(
        core.FolderError, match="tokenizer .* has 756 tokens but .*vocab_size is 500"
    ):
        reader.text_encoder(folder)
