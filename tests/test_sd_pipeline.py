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
        denoiser.make_denoise_fn(model, imported.params), null_condition=jnp.asarray(null)
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


# Config values of every part that are malformed, or that claim more layers than the weights
# hold: each refused in one line naming the file and the key, before any model is built.
BAD_CONFIGS = [
    ("unet", "config.json", {"layers_per_block": "two"}, "layers_per_block='two': accepted an"),
    ("unet", "config.json", {"layers_per_block": 1_000_000}, "but the weights hold 2"),
    ("unet", "config.json", {"sample_size": 0}, "sample_size=0: accepted an integer >= 1"),
    ("unet", "config.json", {"in_channels": 4.5}, "in_channels=4.5"),
    ("unet", "config.json", {"attention_head_dim": None}, "attention_head_dim=None"),
    ("unet", "config.json", {"down_block_types": None}, "block types None"),
    ("unet", "config.json", {"norm_num_groups": 7}, "norm_num_groups=7, which does not divide"),
    ("unet", "config.json", {"cross_attention_dim": -5}, "cross_attention_dim=-5"),
    ("vae", "config.json", {"layers_per_block": 1_000_000}, "but the weights hold 1"),
    ("vae", "config.json", {"scaling_factor": float("nan")}, "scaling_factor=nan"),
    ("scheduler", "scheduler_config.json", {"num_train_timesteps": "many"}, "=many"),
    ("scheduler", "scheduler_config.json", {"beta_start": "x"}, "beta_start='x'"),
    ("scheduler", "scheduler_config.json", {"steps_offset": "x"}, "steps_offset='x'"),
    ("scheduler", "scheduler_config.json", {"timestep_spacing": "sideways"}, "'sideways'"),
    ("text_encoder", "config.json", {"hidden_size": -32}, "hidden_size=-32"),
    ("text_encoder", "config.json", {"layer_norm_eps": "x"}, "layer_norm_eps='x'"),
]


@pytest.mark.parametrize("part, file, change, message", BAD_CONFIGS)
def test_malformed_configs_refused_by_file_and_key(tmp_path, part, file, change, message):
    folder = _copy(tmp_path)
    _edit(os.path.join(folder, part, file), **change)
    with pytest.raises(core.FolderError) as error:
        reader.read_sd_folder(folder, weights=False)
    assert message.replace("=many", "='many'") in str(error.value), str(error.value)
    assert "\n" not in str(error.value)


def test_text_encoders_claiming_more_layers_than_their_weights_refused(tmp_path):
    """Read at import (`run.imported`): a million layers are refused from the header."""
    folder = _copy(tmp_path)
    _edit(os.path.join(folder, "text_encoder", "config.json"), num_hidden_layers=1_000_000)
    with pytest.raises(core.FolderError, match="num_hidden_layers=1000000 but the weights hold"):
        reader.text_encoder(folder)
