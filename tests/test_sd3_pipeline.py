"""An SD3 pipeline folder read as a whole: StableDiffusion3Pipeline's own sampling reproduced,
and folders whose parts are missing or do not fit each other refused.

Golden files: scripts/golden_sd3.py, golden_sd3_text.py, golden_sd3_pipeline.py (PyTorch,
diffusers and transformers; CI never installs them).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.diffusion import flow, guidance, samplers
from distill_jax.interop import core, sd3_pipeline
from distill_jax.interop import pipeline as reader
from distill_jax.interop import vae as vae_reader
from distill_jax.models import autoencoder, denoiser

DATA = os.path.join(os.path.dirname(__file__), "data", "diffusers")
TINY = os.path.join(DATA, "sd3_tiny")
PROMPTS = ["a photo of a cat", "a thick, right-leaning seven", ""]
NEGATIVE = ["blurry", "", "a dog"]


@pytest.fixture(scope="module")
def tiny():
    golden = np.load(os.path.join(DATA, "sd3_pipeline_golden.npz"))
    imported = reader.read_teacher_folder(TINY)
    record = imported.record
    max_tokens = record["text"]["clip_tokens"] + int(golden["t5_tokens"]) + 1
    return imported, reader.sd_model(imported), reader.text_encoder(TINY, None, max_tokens), golden


def test_record_of_the_tiny_pipeline(tiny):
    imported, model, encoder, _ = tiny
    record = imported.record
    assert imported.data_shape == (8, 8, 4)
    assert record["pipeline"] == "StableDiffusion3Pipeline"
    assert record["schedule"] == dict(
        kind="flow", num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False
    )
    assert imported.model["parameterisation"] == "flow"
    assert imported.model["flow_schedule"] == {"num_train_timesteps": 1000}
    assert record["text"]["width"] == encoder.width == model.text_dim == 48
    assert record["vae"]["shift_factor"] == pytest.approx(0.0609)
    # The trained range: from the noise end to the least noisy of the shifted sigmas.
    sigma_min = 3.0 * 0.001 / (1 + 2.0 * 0.001)
    assert imported.logsnr_range[1] == pytest.approx(2 * np.log((1 - sigma_min) / sigma_min))


@pytest.mark.parametrize("case", ["plain", "negative"])
def test_guided_ddim_equals_stable_diffusion_3_pipeline(tiny, case):
    """StableDiffusion3Pipeline (prompts through both CLIPs and T5, guidance_scale s = 1 + w
    on the velocity, the empty or the negative prompt as the unconditional input, flow Euler
    steps with shift 3, VAE decode with SD3's shift and scale) against our guided teacher
    taking DDIM steps between the same noise levels: every step's latents and the images."""
    imported, model, encoder, golden = tiny
    lo, hi = imported.logsnr_range
    steps = int(golden["steps"])
    sigmas = flow.scheduler_sigmas(steps, num_train_timesteps=1000, shift=3.0)
    np.testing.assert_allclose(sigmas, golden["sigmas"], rtol=1e-6)
    times = flow.times_of_flow_sigmas(sigmas, logsnr_min=lo, logsnr_max=hi)[::-1]
    conditions, _ = encoder.encode(PROMPTS)
    null, _ = encoder.encode(NEGATIVE if case == "negative" else [""] * len(PROMPTS))
    guided = guidance.make_guided_denoise_fn(
        denoiser.make_denoise_fn(model, imported.params), null_condition=jnp.asarray(null)
    )
    w = float(golden[f"{case}_guidance_scale"]) - 1.0
    kw = dict(logsnr_min=lo, logsnr_max=hi)

    @jax.jit
    def step(z, t, s):
        return samplers.ddim_step(guided(z, t, conditions, jnp.full(3, w)), z, t, s, **kw)

    z = jnp.asarray(golden["latents"])  # s = 1: the flow's z is the VP z
    worst = 0.0
    for j, want in enumerate(golden[f"{case}_states"]):
        z = step(z, jnp.full(3, times[j]), jnp.full(3, times[j + 1]))
        # The VP z at s is the flow's z_fm / r(s): compare in the pipeline's coordinates.
        s = float(sigmas[j + 1])
        r = np.sqrt((1 - s) ** 2 + s**2)
        worst = max(worst, float(jnp.max(jnp.abs(z * r - want))))
    assert worst <= 1e-5, worst  # measured 1.4e-6 (plain), 3.3e-6 (negative)
    vae_model, vae_params, record = vae_reader.read_vae_folder(os.path.join(TINY, "vae"))
    _, decode = autoencoder.make_codec(
        vae_model, vae_params, record["scaling_factor"], record["shift_factor"]
    )
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


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: shutil.rmtree(os.path.join(f, "tokenizer_2")), r"tokenizer_2/ missing"),
        (
            lambda f: shutil.rmtree(os.path.join(f, "tokenizer_3")),
            "text_encoder_3/ without tokenizer_3/",
        ),
        (
            lambda f: _edit(os.path.join(f, "vae", "config.json"), latent_channels=16),
            "latents have 16 channels but the transformer takes 4",
        ),
        (
            lambda f: _edit(
                os.path.join(f, "transformer", "config.json"), pooled_projection_dim=64
            ),
            "pooled_projection_dim=64 but the CLIP encoders' projection_dim sum is 32",
        ),
        (
            lambda f: _edit(os.path.join(f, "transformer", "config.json"), out_channels=8),
            "out_channels=8: accepted in_channels",
        ),
        (
            lambda f: _edit(os.path.join(f, "scheduler", "scheduler_config.json"), shift="3"),
            "shift='3'",
        ),
        (  # diffusers refuses it even where no dynamic shifting uses it
            lambda f: _edit(
                os.path.join(f, "scheduler", "scheduler_config.json"), time_shift_type="cubic"
            ),
            "time_shift_type='cubic': accepted 'exponential', 'linear'",
        ),
        (
            lambda f: _edit(os.path.join(f, "model_index.json"), controlnet=["x", "ControlNet"]),
            "has parts distill_jax cannot read: controlnet",
        ),
        (
            lambda f: pathlib.Path(f, "model_index.json").write_text("[]"),
            "model_index.json holds no JSON object",
        ),
        (
            lambda f: _edit(
                os.path.join(f, "transformer", "config.json"), _class_name="FluxTransformer2DModel"
            ),
            r"accepted 'DiTTransformer2DModel', 'Transformer2DModel' \(a DiT pipeline\) or "
            "'SD3Transformer2DModel'",
        ),
    ],
)
def test_damaged_pipelines_refused_in_one_line(tmp_path, damage, message):
    folder = _copy(tmp_path)
    damage(folder)
    with pytest.raises(core.FolderError, match=message) as error:
        reader.read_teacher_folder(folder, weights=False)
    assert "\n" not in str(error.value)


def test_configs_only_read_needs_no_weights(tmp_path):
    folder = _copy(tmp_path)
    for part in ("transformer", "vae"):
        for name in os.listdir(os.path.join(folder, part)):
            if name.endswith(".safetensors"):
                os.remove(os.path.join(folder, part, name))
    imported = reader.read_teacher_folder(folder, weights=False, configs_only=True)
    assert imported.model["kind"] == "mmdit" and imported.record["weights_sha256"] is None
    assert sd3_pipeline.is_sd3_folder(folder) and not sd3_pipeline.is_sd3_folder(DATA)
