"""The text-to-image U-Nets that diffusers trained on the captioned digits
(scripts/train_diffusers_sd.py: v-prediction, and epsilon as SD 1.x): after import, our guided
DDIM on diffusers' own timesteps gives the images StableDiffusionPipeline's loop gave from that
noise, for prompts the pipeline's MiniLM text encoder (run through our reader) encodes.

The committed folders (tests/data/diffusers/sd_digits, sd_digits_eps) hold unet/, scheduler/
and the tokenizer's config; their text_encoder/ and tokenizer.json are the pinned MiniLM
package's files, which the script copied, so the test assembles the folder from them.
"""

import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import text_encoder
from distill_jax.diffusion import discrete, guidance, samplers
from distill_jax.interop import core
from distill_jax.interop import pipeline as reader
from distill_jax.models import denoiser, kinds

DATA = os.path.join(os.path.dirname(__file__), "data", "diffusers")


def assemble(tmp_path, name: str = "sd_digits") -> str:
    """The pipeline folder: the committed parts plus MiniLM's files from the pinned package."""
    folder = tmp_path / name
    shutil.copytree(os.path.join(DATA, name), folder)
    minilm = text_encoder.default_encoder_dir()
    (folder / "text_encoder").mkdir()
    for name in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(minilm, name), folder / "text_encoder" / name)
    os.symlink(os.path.join(minilm, "tokenizer.json"), folder / "tokenizer" / "tokenizer.json")
    return str(folder)


@pytest.mark.parametrize("name", ["sd_digits", "sd_digits_eps"])
def test_same_images_as_diffusers_pipeline_loop(tmp_path, name):
    folder = assemble(tmp_path, name)
    golden = np.load(os.path.join(DATA, name, "ddim_golden.npz"))
    imported = reader.read_sd_folder(folder)
    lo, hi = imported.logsnr_range
    model = reader.sd_model(imported)
    encoder = reader.text_encoder(folder)
    prompts = [str(p) for p in golden["prompts"]]
    conditions, _ = encoder.encode(prompts)
    null, _ = encoder.encode([""])
    guided = guidance.make_guided_denoise_fn(
        denoiser.make_denoise_fn(model, imported.params), null_label=jnp.asarray(null[0])
    )
    steps = int(golden["steps"])
    table = np.asarray(kinds.discrete_logsnrs(core.model_config(imported.model)))
    times = discrete.times_of_timesteps(
        discrete.scheduler_timesteps(steps, num_timesteps=1000), table, logsnr_min=lo, logsnr_max=hi
    )
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
        scale = max(1.0, float(np.max(np.abs(theirs))))  # guided samples may leave [-1, 1]
        error = float(np.max(np.abs(np.asarray(ours[i * n : (i + 1) * n]) - theirs)))
        assert error <= 1e-4 * scale, (w, error)
