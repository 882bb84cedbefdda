"""Text conditioning: the Flax MiniLM against its reference, captions, the text U-Net, prompts,
and a latent text smoke run through the real CLI (autoencoder, train, distil, evaluate,
sample; the `text_workdir` fixture)."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT

from distill_jax import text_encoder
from distill_jax.data import captions
from distill_jax.diffusion import guidance
from distill_jax.models import denoiser
from distill_jax.run import prompts as prompt_lib

REFERENCE = pathlib.Path(__file__).parent / "data" / "minilm_reference.json"


@pytest.fixture(scope="module")
def encoder():
    return text_encoder.load_text_encoder("", 32)


def test_flax_minilm_matches_the_reference_implementation(encoder):
    reference = json.loads(REFERENCE.read_text())
    sentences = reference["sentences"]
    ids, mask, truncated = encoder.tokenize(sentences)
    assert not any(truncated)
    assert [list(row[row != 0]) for row in ids] == reference["token_ids"]
    embeddings = encoder.sentence_embeddings(sentences)
    expected = np.asarray(reference["sentence_embeddings"])
    cosine = np.sum(embeddings * expected, axis=-1) / np.linalg.norm(expected, axis=-1)
    assert np.all(cosine > 0.999), cosine
    first = encoder.token_states(ids, mask)[:, 0]
    np.testing.assert_allclose(first, reference["first_token_states"], atol=1e-4)
    assert isinstance(encoder, text_encoder.TextConditioner)
    assert encoder.encode(sentences)[0].shape == (len(sentences), 32, encoder.width)


def test_conditions_are_zero_at_padding_and_long_prompts_are_cut(encoder):
    short = text_encoder.load_text_encoder("", 6)
    conditions, truncated = short.encode(["seven", "a thin, slanted, small handwritten seven"])
    assert truncated == [False, True]
    mask = np.asarray(text_encoder.text_mask(jnp.asarray(conditions)))
    assert mask[0].tolist() == [True, True, True, False, False, False]  # [CLS] seven [SEP]
    assert mask[1].all()
    ids, _, _ = short.tokenize(["a thin, slanted, small handwritten seven"])
    assert ids[0, -1] == short.tokenizer.token_to_id("[SEP]")  # [SEP] kept last
    # The pooled vector is the reference's mean pooling: equal to the unpadded encoding's.
    long_conditions, _ = encoder.encode(["seven"])
    np.testing.assert_allclose(
        text_encoder.pooled_text(jnp.asarray(conditions[:1])),
        text_encoder.pooled_text(jnp.asarray(long_conditions)),
        atol=1e-5,
    )


def _text_unet():
    import ml_collections

    from distill_jax.config import base_config

    model_config = ml_collections.ConfigDict(base_config().model.to_dict())
    # One resolution level (cross-attention at 8x8), as the smoke configs: a third of the
    # compile time of the default two levels, the same conditioning path.
    model_config.update(
        channels=16,
        channel_mult=(1,),
        num_res_blocks=1,
        attn_resolutions=(8,),
        num_heads=2,
        dropout=0.0,
    )
    model = denoiser.build_model(
        model_config, data_shape=(8, 8, 1), num_classes=10, use_guidance=False, text_dim=384
    )
    params = denoiser.init_params(model, jax.random.PRNGKey(0), data_shape=(8, 8, 1))
    # Zero-initialised output layers make a fresh network ignore its input: perturb them all.
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    leaves = [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    return model, jax.tree_util.tree_unflatten(treedef, leaves)


def test_text_unet_ignores_padding_and_reads_the_tokens(encoder):
    model, params = _text_unet()
    fn = jax.jit(denoiser.make_denoise_fn(model, params))
    conditions, _ = encoder.encode(["a thick seven", "a thin one"])
    z = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 1))
    t = jnp.array([0.3, 0.7])
    out = fn(z, t, conditions)
    # Cutting trailing padding (32 -> 8 positions) changes nothing: padding is masked out.
    np.testing.assert_allclose(fn(z, t, conditions[:, :8]), out, atol=1e-5)
    # Another prompt (a token changed) changes the output.
    other, _ = encoder.encode(["a thick eight", "a thin one"])
    changed = np.abs(np.asarray(fn(z, t, other) - out)).reshape(2, -1).max(axis=1)
    assert changed[0] > 1e-3 and changed[1] < 1e-6


def test_the_empty_prompt_is_the_null_condition_of_guidance(encoder):
    model, params = _text_unet()
    fn = jax.jit(denoiser.make_denoise_fn(model, params))
    null = encoder.encode([""])[0][0]
    z = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 1))
    t = jnp.array([0.5, 0.5])
    prompts, _ = encoder.encode(["a thick seven", "a thin one"])
    guided = guidance.make_guided_denoise_fn(fn, null_condition=null)
    # Guidance mixes the prompt's x-hat with the empty prompt's, one batched call.
    w = jnp.array([2.0, 0.5])
    expected = (1 + w[:, None, None, None]) * fn(z, t, prompts) - w[:, None, None, None] * fn(
        z, t, np.broadcast_to(null, prompts.shape)
    )
    np.testing.assert_allclose(guided(z, t, prompts, w), expected, atol=1e-5)
    # The empty prompt's samples are unconditional: w changes nothing.
    empty = np.broadcast_to(null, prompts.shape)
    np.testing.assert_allclose(guided(z, t, empty, w), guided(z, t, empty, 0.0 * w), atol=1e-5)


def test_teacher_loss_drops_prompts_to_the_empty_prompt(encoder):
    import ml_collections

    from distill_jax.training import teacher

    model, params = _text_unet()
    null = encoder.encode([""])[0][0]
    prompts, _ = encoder.encode(["a thick seven", "a thin one"])
    x = jax.random.uniform(jax.random.PRNGKey(4), (2, 8, 8, 1), minval=-1, maxval=1)
    diffusion = ml_collections.ConfigDict(
        dict(logsnr_min=-20.0, logsnr_max=20.0, loss_weighting="truncated_snr", p_uncond=1.0)
    )
    loss_fn = teacher.make_teacher_loss(model, null_condition=null, diffusion=diffusion)
    key = jax.random.PRNGKey(5)
    dropped, _ = loss_fn(params, {"x": x, "condition": prompts}, key, None)
    given_null, _ = loss_fn(
        params, {"x": x, "condition": np.broadcast_to(null, prompts.shape)}, key, None
    )
    assert float(dropped) == pytest.approx(float(given_null), rel=1e-6)
    diffusion.p_uncond = 0.0
    kept, _ = teacher.make_teacher_loss(model, null_condition=null, diffusion=diffusion)(
        params, {"x": x, "condition": prompts}, key, None
    )
    assert abs(float(kept) - float(dropped)) > 1e-6


def test_captions_describe_the_images_and_hold_out_templates():
    images, labels = captions.digits_arrays()
    words = captions.attribute_words(images, labels)
    ink = captions.ink_mass(images)
    for digit in range(10):
        group = np.flatnonzero(labels == digit)
        thin = [ink[i] for i in group if "thin" in words[i]]
        thick = [ink[i] for i in group if "thick" in words[i]]
        assert max(thin) < min(thick)
    _, digits, texts = captions.split_captions("train")
    assert len(texts) == 2 * 1497
    names = [set(captions.number_forms(d)) for d in range(10)]
    assert all(
        any(form in text for form in names[d]) for d, text in zip(digits, texts, strict=True)
    )
    prompts, eval_digits, ranks = prompt_lib.evaluation_prompts(60)
    held_out_prefixes = {t.split("{a}")[0] for t in captions.HELD_OUT_TEMPLATES}
    assert all(any(p.startswith(h) for h in held_out_prefixes) for p in prompts)
    assert not any(any(c.startswith(h) for h in held_out_prefixes) for c in texts)
    assert np.bincount(eval_digits).tolist() == [6] * 10
    assert np.bincount(ranks).tolist() == [20] * 3
    assert all(("thick" in p) == (r == 2) for p, r in zip(prompts, ranks, strict=True))


def _cli(command, workdir, *flags):
    return subprocess.run(
        [sys.executable, "-m", "distill_jax", command, f"--workdir={workdir}", *flags],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_text_smoke_run_reports_prompt_metrics(text_workdir):
    results = json.loads((text_workdir / "eval" / "results.json").read_text())
    rows = results["rows"]
    assert {row["sampler"] for row in rows} >= {"teacher_ddim", "student_ddim"}
    for row in rows:
        assert np.isfinite(row["thickness"]) and -1 <= row["thickness"] <= 1
        assert 0 <= row["accuracy"] <= 1
    report = (text_workdir / "report.md").read_text()
    assert "thickness ρ" in report


def test_sample_from_prompts_writes_images(text_workdir, tmp_path):
    out = tmp_path / "prompts.npz"
    result = _cli(
        "sample",
        text_workdir,
        "--steps=4",
        "--guidance=2",
        "--num=6",
        f"--out={out}",
        "--prompt=a thick seven",
        "--prompt=",
        "--prompt=an image of a thin, left-leaning, small number seven drawn by hand",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = np.load(out)
    assert data["images"].shape == (6, 32, 32, 1)  # decoded from 8x8x4 latents
    assert data["prompt_index"].tolist() == [0, 1, 2, 0, 1, 2]
    assert data["prompts"][0] == "a thick seven"
    assert out.with_suffix(".png").exists()
    assert "the empty prompt is the null condition" in result.stderr
    assert "is longer than the 16 tokens" in result.stderr


def test_condition_kind_mismatches_are_one_clear_line(text_workdir, smoke_workdir, tmp_path):
    labels = _cli(
        "sample",
        text_workdir,
        "--steps=4",
        "--guidance=2",
        "--labels=3",
        f"--out={tmp_path / 'a.npz'}",
    )
    prompt = _cli(
        "sample",
        smoke_workdir,
        "--steps=4",
        "--guidance=2",
        "--prompt=a seven",
        f"--out={tmp_path / 'b.npz'}",
    )
    for result, words in (
        (labels, "takes prompts, not class labels"),
        (prompt, "conditions on class labels, not text"),
    ):
        assert result.returncode == 2
        assert words in result.stderr.strip().splitlines()[-1]
        assert "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())


def test_text_export_in_a_separate_process_matches_library_sampling(text_workdir, tmp_path):
    from conftest import sample_standalone

    from distill_jax import export, sampling
    from distill_jax.diffusion import samplers
    from distill_jax.run import Run

    artifact = tmp_path / "artifact"
    metadata = export.export_sampler(text_workdir, steps=4, out=artifact, platforms=("cpu",))
    assert metadata["condition_shape"] == [16, 384]
    assert metadata["inputs"][1]["name"] == "conditions"
    run = Run.open(text_workdir)
    labels = prompt_lib.encode_prompts(run, ["a thick seven", "the digit one", "this is a 4"])
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((3, *metadata["noise_shape"])).astype(np.float32)
    w = rng.uniform(0.0, run.config.guidance.w_max, 3).astype(np.float32)
    exported = sample_standalone(artifact, tmp_path, noise, labels, w)
    fn = sampling.denoise_fn(run, "student", 4)
    z = samplers.ddim_sample(fn, noise, labels, w, steps=4, **run.bounds)
    library = np.clip(np.asarray(run.codec()[1](z)), -1, 1)
    assert exported.shape == (3, 32, 32, 1)
    np.testing.assert_allclose(exported, library, atol=2e-5)
    # Its command line refuses class labels in one line and says what it takes.
    loader = subprocess.run(
        [sys.executable, str(artifact / "run_sampler.py"), str(artifact), "--label=3"],
        cwd=tmp_path,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert loader.returncode == 2 and "--conditions FILE.npy" in loader.stderr


def test_latent_text_smoke_run_caches_conditions_beside_the_latents(text_workdir):
    workdir = text_workdir
    conditions = np.load(workdir / "autoencoder" / "latent_labels.npy", mmap_mode="r")
    latents = np.load(workdir / "autoencoder" / "latents.npy", mmap_mode="r")
    assert conditions.dtype == np.float16 and conditions.shape == (len(latents), 16, 384)
    # Each cached latent keeps its own caption's condition, in the dataset's order.
    source = captions.prepare_digits_text("").as_data_source("train")
    np.testing.assert_array_equal(conditions[5], source[5]["condition"])
    # The teacher trains on those conditions (float32), not on class labels made of them.
    from distill_jax.data import loader
    from distill_jax.run import Run

    run = Run.open(workdir)
    teacher_source = run.train_source(run.stage("teacher"))
    batch = next(
        loader.make_train_loader(run.config.data, batch_size=8, seed=0, source=teacher_source)
    )
    assert batch["condition"].dtype == np.float32 and batch["condition"].shape == (8, 16, 384)
    cached = {conditions[i].astype(np.float32).tobytes() for i in range(len(conditions))}
    assert all(row.tobytes() in cached for row in batch["condition"])
    rows = json.loads((workdir / "eval" / "results.json").read_text())["rows"]
    assert all(np.isfinite(row["thickness"]) for row in rows)
