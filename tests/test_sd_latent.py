"""A latent text-to-image pipeline (unet/ + vae/) as a run: its VAE becomes the finished
autoencoder stage, the train split is cached as VAE latents at the VAE's scaling_factor, and the
imported teacher samples, through the run, what diffusers' StableDiffusionPipeline samples.

The teacher is tests/data/diffusers/sd_latent_tiny (scripts/golden_pipeline.py): a tiny random
gray-scale AutoencoderKL (8x8x1 images -> 4x4x4 latents), a U-Net on its latents with epsilon
prediction and SD 1.5's scheduler, the tiny BERT text encoder; sd_latent_golden.npz holds the
pipeline's images from fixed latents at guidance_scale 3.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, snapshot
from test_dit_cli import _cli, _refused

from distill_jax import sampling
from distill_jax.data import sources
from distill_jax.diffusion import samplers
from distill_jax.interop import pipeline
from distill_jax.interop import vae as vae_reader
from distill_jax.models import autoencoder
from distill_jax.run import Run, imported

DATA = ROOT / "tests" / "data" / "diffusers"
TEACHER = DATA / "sd_latent_tiny"
CONFIG = str(ROOT / "configs" / "sd_digits.py") + ":smoke"


@pytest.fixture(scope="module")
def latent_workdir(tmp_path_factory):
    """`train --teacher=diffusers:sd_latent_tiny`: the import (autoencoder and teacher done)."""
    workdir = tmp_path_factory.mktemp("sd_latent") / "w"
    result = _cli(
        "train", f"--config={CONFIG}", f"--workdir={workdir}", f"--teacher=diffusers:{TEACHER}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_the_vae_is_the_runs_autoencoder_and_caches_the_split(latent_workdir):
    record = json.loads((latent_workdir / "autoencoder" / "FINISHED.json").read_text())
    assert record["latents"] == {"scale": 0.18215, "shape": [4, 4, 4]}
    assert record["imported"]["source"] == str(TEACHER / "vae")
    run = Run.open(latent_workdir)
    assert run.latent and run.config.autoencoder.pipeline == str(latent_workdir / "imported")
    assert tuple(run.info.shape) == (4, 4, 4) and tuple(run.image_info.shape) == (8, 8, 1)
    # The cached split is the VAE's posterior means, scaled by its scaling_factor, beside the
    # captions as the pipeline's own text encoder encodes them.
    model, params, _ = vae_reader.read_vae_folder(str(TEACHER / "vae"))
    encode, _ = autoencoder.make_codec(model, params, 0.18215)
    data, _ = sources.load_source(run.config.data, split=run.config.data.train_split)
    rows = np.array([0, 7, 500])
    images = sources.read_examples(data, rows, image_size=int(run.config.data.image_size))["x"]
    cached = run.train_source(run.stage("stage1")).take(rows)
    np.testing.assert_allclose(cached["x"], jax.jit(encode)(images), rtol=0, atol=1e-5)
    captions = list(np.asarray(data.arrays["caption"])[rows].astype(str))
    want, _ = pipeline.text_encoder(str(TEACHER)).encode(captions)
    np.testing.assert_array_equal(cached["condition"], want)


def test_imported_teacher_samples_what_the_pipeline_samples(latent_workdir):
    """The run's guided teacher, text encoder, timestep grid and VAE decoder (at the recorded
    scale) reproduce StableDiffusionPipeline's images from the same latents."""
    golden = np.load(DATA / "sd_latent_golden.npz")
    run = Run.open(latent_workdir)
    steps = int(golden["steps"])
    conditions, _ = run.text_encoder().encode([str(p) for p in golden["prompts"]])
    w = jnp.full(len(conditions), float(golden["guidance_scale"]) - 1.0)
    guided = run.guided_teacher_fn()

    @jax.jit
    def step(z, t, s):
        xhat = guided(z, t, jnp.asarray(conditions), w)
        # set_alpha_to_one=False: diffusers' last step lands on timestep 0's noise level (t = 0
        # of the clipped schedule): an ordinary DDIM step there, not x-hat.
        return samplers.ddim_step(xhat, z, t, s, last=jnp.zeros(len(w), bool), **run.bounds)

    times = imported.teacher_times(run, steps)[::-1]
    z = jnp.asarray(golden["latents"])
    for j in range(steps):
        z = step(z, jnp.full(len(w), times[j]), jnp.full(len(w), times[j + 1]))
    images = np.clip(np.asarray(jax.jit(lambda f, x: f(x))(run.codec()[1], z)) / 2 + 0.5, 0, 1)
    np.testing.assert_allclose(images, golden["images"], rtol=0, atol=1e-5)


def test_sample_from_prompts_with_a_negative_prompt(latent_workdir, tmp_path, caplog):
    """Samples from prompts decode to images (a long prompt is cut, saying so); a negative
    prompt replaces the empty one in the teacher's guidance (the empty negative prompt is no
    change); a student refuses one. The --negative_prompt flag: tests/test_bad_inputs.py."""
    long = "a thick right-leaning handwritten seven " * 4
    kw = dict(
        model="teacher", steps=2, w=2.0, num=2, grid="teacher", prompts=["the digit three", long]
    )
    images = {}
    for name, negative in (("plain", None), ("empty", ""), ("neg", "a thin four")):
        out = tmp_path / f"{name}.npz"
        sampling.sample_to_files(latent_workdir, out=out, negative_prompt=negative, **kw)
        images[name] = np.load(out)["images"]
    assert "longer than the 16 tokens" in caplog.text and "as diffusers does" in caplog.text
    assert images["plain"].shape == (2, 8, 8, 1)
    np.testing.assert_array_equal(images["empty"], images["plain"])
    assert np.any(images["neg"] != images["plain"])
    with pytest.raises(ValueError, match="applies to --model=teacher only"):
        sampling.sample_to_files(
            latent_workdir,
            out=tmp_path / "s.npz",
            negative_prompt="blurry",
            **dict(kw, model="student"),
        )


def test_latent_pipelines_that_do_not_fit_refused(latent_workdir, tmp_path):
    fresh = tmp_path / "fresh"
    # sd_tiny's VAE takes RGB images; the captioned digits are gray.
    _refused(
        _cli(
            "train",
            f"--config={CONFIG}",
            f"--workdir={fresh}",
            f"--teacher=diffusers:{DATA / 'sd_tiny'}",
        ),
        "images have 1 channels, the VAE takes 3",
    )
    assert snapshot(fresh) is None
    # Another pipeline into the workdir that holds this one: refused, nothing changed.
    before = snapshot(latent_workdir)
    _refused(
        _cli(
            "train",
            f"--config={CONFIG}",
            f"--workdir={latent_workdir}",
            f"--teacher=diffusers:{DATA / 'sd_digits_tiny'}",
        ),
        "already has another teacher",
    )
    assert snapshot(latent_workdir) == before
