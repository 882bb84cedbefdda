"""Latent runs: the autoencoder stage, latent teacher and students, decoding, refusals.

The finished latent run these tests read is the session's text smoke run (`text_workdir`:
configs/digits_latent_text.py:smoke, an autoencoder, then teacher, stage one, rounds,
evaluation and report on its latents): a class-conditional latent smoke run of its own added
about 100 s and no code path. Class-conditional latent runs are trained here by the
`other_run` fixture (configs/digits_latent.py:smoke through the CLI, autoencoder and teacher)
and by the ImageNet-256 test (every stage, in bfloat16). Decoded sampling and export of a
latent run are tested on the text run in tests/test_text.py.
"""

import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import SMOKE_RUNS, background_workdir, snapshot

from distill_jax import sampling
from distill_jax.config import load_config
from distill_jax.data import loader
from distill_jax.run import Run
from distill_jax.training import drivers

ROOT = pathlib.Path(__file__).resolve().parents[1]
LATENT_SMOKE = str(ROOT / "configs" / "digits_latent.py") + ":smoke"


def _cli(*args, env=None, wait=True):
    cmd = [sys.executable, "-m", "distill_jax", *args]
    if not wait:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_latent_smoke_run_writes_a_report_with_the_autoencoder_floor(text_workdir):
    run = Run.open(text_workdir)
    assert run.info.shape == (8, 8, 4) and run.image_info.shape == (32, 32, 1)
    latents = run.latents()
    for spec in run.stages[1:]:  # every diffusion stage learnt on the autoencoder's latents
        record = run.finished(spec)
        assert record["latents"] == {"scale": latents.scale, "shape": [8, 8, 4]}, spec.name
    report = (text_workdir / "report.md").read_text()
    assert "## Autoencoder" in report and "reconstructions" in report
    results = json.loads((text_workdir / "eval" / "results.json").read_text())
    floor = results["autoencoder"]
    assert floor["latent_shape"] == [8, 8, 4] and floor["recon_mse"] > 0
    assert floor["latent_scale"] == latents.scale
    assert (text_workdir / "eval" / floor["grid"]).is_file()
    samplers_seen = {(row["sampler"], row["steps"]) for row in results["rows"]}
    assert ("student_ddim", 1) in samplers_seen and ("teacher_ddim", 8) in samplers_seen


def test_latent_scale_makes_the_encoded_train_split_unit_variance(text_workdir):
    run = Run.open(text_workdir)
    x, _ = loader.make_eval_arrays(run.config.data, split=run.config.data.train_split)
    encode, _ = run.codec()
    z = sampling.apply_in_batches(encode, x, 256)
    assert z.shape == (len(x), 8, 8, 4)
    assert abs(float(np.var(z)) - 1.0) < 0.1, float(np.var(z))
    # The teacher's training data: the cache, scaled, equals what the encoder gives.
    source = run.train_source(run.stage("teacher"))
    cached = np.stack([source[i]["x"] for i in range(16)])
    np.testing.assert_allclose(cached, z[:16], rtol=1e-5, atol=1e-5)


def _autoencoder_mse(run: Run, which: str, x: np.ndarray) -> float:
    spec = run.stage("autoencoder")
    if which:
        params = run.load_params(spec, which=which)
    else:
        params = run.init_params(spec, jax.random.PRNGKey(spec.seed))
    recon, _, _ = run.model(spec).apply({"params": params}, x)
    return float(np.mean(np.square(np.asarray(recon) - x)))


# A second latent run: another seed (so another autoencoder), 120 autoencoder steps, a 1-step
# teacher (conftest.SMOKE_RUNS). Trained once straight through by the `other_run` fixture (in
# the background from the start of the session), and once killed and resumed.
OTHER = list(SMOKE_RUNS["other_run"][1:])


@pytest.fixture(scope="module")
def other_run():
    """`distill-jax train` of OTHER (autoencoder and a 1-step teacher), uninterrupted."""
    return background_workdir("other_run")


def test_autoencoder_training_lowers_the_reconstruction_error(other_run):
    run = Run.open(other_run)
    x, _ = loader.make_eval_arrays(run.config.data, split=run.config.data.eval_split)
    before, after = _autoencoder_mse(run, "", x[:64]), _autoencoder_mse(run, "ema_params", x[:64])
    # A fresh decoder outputs about 0 for images that are mostly -1 (background): MSE ~ 0.8.
    # 120 steps of the 8-channel smoke autoencoder bring it to about 0.11 (EMA weights).
    assert before > 0.5, before
    assert after < 0.2 and after < before / 4, (before, after)


def test_a_killed_autoencoder_stage_resumes_to_the_same_weights(other_run, tmp_path):
    killed = tmp_path / "killed"
    proc = _cli("train", *OTHER, f"--workdir={killed}", wait=False)
    deadline = time.time() + 300
    while not (killed / "autoencoder" / "40").is_dir() and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "autoencoder" / "FINISHED.json").exists()
    resumed = _cli("train", *OTHER, f"--workdir={killed}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[autoencoder] resumed from step" in resumed.stderr
    a, b = Run.open(other_run), Run.open(killed)
    for which in ("params", "ema_params"):
        left = jax.tree.leaves(a.load_params(a.stage("autoencoder"), which=which))
        right = jax.tree.leaves(b.load_params(b.stage("autoencoder"), which=which))
        for x, y in zip(left, right, strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert a.latents() == b.latents()
    np.testing.assert_array_equal(
        np.load(other_run / "autoencoder" / "latents.npy"),
        np.load(killed / "autoencoder" / "latents.npy"),
    )


def _refused(result, *phrases):
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    for phrase in phrases:
        assert phrase in last, last
    return last


def test_a_latent_that_does_not_fit_the_unet_is_refused_before_anything_is_written(tmp_path):
    workdir = tmp_path / "run"
    result = _cli(
        "train",
        f"--config={LATENT_SMOKE}",
        f"--workdir={workdir}",
        "--config.autoencoder.channel_mult=(1,2,2,2)",
        "--config.model.channel_mult=(1,2,2,2)",
    )
    _refused(result, "latent", "4x4", "model.channel_mult")
    assert not workdir.exists()


def test_distilling_without_a_finished_autoencoder_is_refused(tmp_path, text_workdir):
    workdir = tmp_path / "run"
    result = _cli("distill", f"--config={LATENT_SMOKE}", f"--workdir={workdir}")
    _refused(result, "no finished autoencoder")
    assert not workdir.exists()
    # A run whose autoencoder lost its FINISHED record cannot be sampled or evaluated.
    copy = tmp_path / "copy"
    shutil.copytree(text_workdir, copy)
    (copy / "autoencoder" / "FINISHED.json").unlink()
    before = snapshot(copy)
    out = tmp_path / "s.npz"
    sampled = _cli("sample", f"--workdir={copy}", "--steps=2", "--guidance=1", f"--out={out}")
    _refused(sampled, "no finished autoencoder")
    evaluated = _cli("evaluate", f"--workdir={copy}")
    _refused(evaluated, "no finished autoencoder")
    assert not out.exists() and snapshot(copy) == before


def test_a_teacher_trained_on_other_latents_is_refused(other_run, text_workdir, smoke_workdir):
    # other_run's autoencoder has the text run's latent shape but another scale. The latents
    # are checked before anything else of the teacher (its text conditioning included).
    assert Run.open(other_run).latents() != Run.open(text_workdir).latents()
    before = snapshot(other_run)
    for teacher, phrase in (
        (text_workdir / "teacher", "was trained on latents"),
        (smoke_workdir / "teacher", "was trained on pixels"),
    ):
        result = _cli("distill", *OTHER, f"--workdir={other_run}", f"--teacher={teacher}")
        _refused(result, phrase, "this run's autoencoder gives latents")
    assert snapshot(other_run) == before


def _saved_float_dtypes(stage_dir: pathlib.Path) -> set[str]:
    """The dtypes of the floating-point leaves (params, EMA, optimiser state) of the stage's
    last checkpoint, from Orbax's metadata."""
    import orbax.checkpoint as ocp

    last = max(int(p.name) for p in stage_dir.iterdir() if p.name.isdigit())
    metadata = ocp.PyTreeCheckpointer().metadata(stage_dir / str(last) / "state")
    tree = getattr(metadata, "item_metadata", metadata)
    leaves = jax.tree.leaves(getattr(tree, "tree", tree))
    return {str(leaf.dtype) for leaf in leaves if np.issubdtype(np.dtype(leaf.dtype), np.floating)}


def test_imagenet256_latent_smoke_runs_on_mock_data_in_bfloat16(tmp_path):
    # USE_CODE: imagenet2012's features come from its builder class and as_data_source yields
    # random examples of them (no files, no download): every stage, then decoded samples.
    config = load_config(str(ROOT / "configs" / "imagenet256_latent.py") + ":smoke")
    config.data.data_dir = str(tmp_path / "tfds")
    config.stage2.n_start = 2  # one halving round is enough to show the chain
    config.model.dtype = "bfloat16"  # the full config's compute dtype, on every stage
    workdir = tmp_path / "run"
    with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
        drivers.train_teacher(config, workdir)
        trained = drivers.distill_stages(config, workdir)
        run = Run.open(workdir)
        assert run.info.shape == (8, 8, 4) and run.image_info.shape == (16, 16, 3)
        assert trained == ["stage1", "stage2/steps_0001"]
        labels = np.array([0, 999], np.int32)
        x = sampling.sample(run, model="student", steps=1, w=14.0, conditions=labels, seed=0)
    assert x.shape == (2, 16, 16, 3) and np.all(np.isfinite(x))
    # bfloat16 is the compute dtype only: every stage keeps float32 weights and optimiser state.
    for stage in ("teacher", "stage1", "stage2/steps_0001"):
        assert _saved_float_dtypes(workdir / stage) == {"float32"}, stage
