"""`--teacher=diffusers:DIR` end to end: import once, distil, sample, export; refusals."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, snapshot

from distill_jax.interop import dit as reader
from distill_jax.run import Run
from distill_jax.trees import named_leaves

DATA = ROOT / "tests" / "data" / "diffusers"
CONFIG = str(ROOT / "configs" / "digits_dit.py") + ":smoke"


def _cli(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "distill_jax", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ),
    )


def _files(directory):
    """The workdir's snapshot without the lock file, which every command rewrites."""
    return {k: v for k, v in (snapshot(directory) or {}).items() if k != ".lock"}


def _refused(result, *needles):
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("distill-jax") and "error:" in lines[-1]
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def test_imported_run_has_every_stage(dit_workdir):
    record = json.loads((dit_workdir / "teacher" / "FINISHED.json").read_text())
    imported = record["imported"]
    assert imported["source"] == str(DATA / "dit_tiny_legacy")
    assert imported["schedule"]["prediction_type"] == "v_prediction"
    run = Run.open(dit_workdir)
    assert run.config.model.kind == "dit" and run.config.model.parameterisation == "v"
    lo, hi = imported["logsnr_range"]
    assert run.bounds == dict(logsnr_min=lo, logsnr_max=hi)
    assert sorted(run.students()) == [1, 2, 4]
    # The teacher read back through its Orbax manager is the folder's weights, unchanged.
    ours = named_leaves(run.load_params(run.stage("teacher")))
    theirs = named_leaves(reader.read_dit_folder(DATA / "dit_tiny_legacy").params)
    assert set(ours) == set(theirs)
    for name, leaf in theirs.items():
        np.testing.assert_array_equal(np.asarray(ours[name]), leaf)
    assert (dit_workdir / "report.md").exists()


def test_sample_export_and_import_once(dit_workdir, tmp_path):
    before = _files(dit_workdir)
    again = _cli(
        "distill",
        f"--config={CONFIG}",
        f"--workdir={dit_workdir}",
        f"--teacher=diffusers:{DATA / 'dit_tiny_legacy'}",
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert _files(dit_workdir) == before  # imported once: nothing rewritten
    out = tmp_path / "teacher.npz"
    sampled = _cli(
        "sample",
        f"--workdir={dit_workdir}",
        "--model=teacher",
        "--grid=teacher",
        "--steps=4",
        "--guidance=1",
        "--num=4",
        f"--out={out}",
    )
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert np.load(out)["images"].shape == (4, 8, 8, 1)
    exported = _cli("export", f"--workdir={dit_workdir}", "--steps=1", f"--out={tmp_path / 'x'}")
    assert exported.returncode == 0, exported.stderr[-3000:]


def test_refusals_write_nothing(dit_workdir, tmp_path):
    fresh = tmp_path / "fresh"
    _refused(
        _cli("distill", f"--config={CONFIG}", f"--workdir={fresh}", f"--teacher=diffusers:{DATA}"),
        "is not a diffusers pipeline folder distill_jax reads",
    )
    # dit_tiny takes 8x8x4 latents; the digits are 8x8x1.
    _refused(
        _cli(
            "run",
            f"--config={CONFIG}",
            f"--workdir={fresh}",
            f"--teacher=diffusers:{DATA / 'dit_tiny'}",
        ),
        "(8, 8, 4)",
        "(8, 8, 1)",
    )
    assert snapshot(fresh) is None
    before = _files(dit_workdir)
    _refused(
        _cli(
            "distill",
            f"--config={CONFIG}",
            f"--workdir={dit_workdir}",
            f"--teacher=diffusers:{DATA / 'dit_tiny'}",
        ),
        "already has another teacher",
    )
    assert _files(dit_workdir) == before


def _killed_when(command, path, timeout=300):
    """Start `distill-jax command...`, SIGKILL it as soon as `path` exists; its exit code."""
    process = subprocess.Popen(
        [sys.executable, "-m", "distill_jax", *command],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout
    while process.poll() is None and not path.exists() and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    return process.wait()


def test_an_interrupted_import_restarts_and_conventions_stay_as_imported(tmp_path):
    """A SIGKILL while the teacher is written: the same command imports again by itself. Then
    the folder's scheduler changes (same weights): refused, even with --allow_config_change,
    since the teacher was converted under the old conventions."""
    folder = tmp_path / "dit"
    shutil.copytree(DATA / "dit_tiny_legacy", folder)
    workdir = tmp_path / "w"
    command = (
        "train",
        f"--config={CONFIG}",
        f"--workdir={workdir}",
        f"--teacher=diffusers:{folder}",
    )
    assert _killed_when(command, workdir / "teacher" / "IMPORTING.json") == -signal.SIGKILL
    assert not (workdir / "teacher" / "FINISHED.json").exists()
    again = _cli(*command)
    assert again.returncode == 0, again.stderr[-3000:]
    record = json.loads((workdir / "teacher" / "FINISHED.json").read_text())["imported"]
    assert record["model"]["parameterisation"] == "v"
    assert not (workdir / "teacher" / "IMPORTING.json").exists()
    assert (workdir / "imported" / "transformer" / "config.json").exists()
    scheduler = folder / "scheduler" / "scheduler_config.json"
    scheduler.write_text(scheduler.read_text().replace("v_prediction", "epsilon"))
    before = _files(workdir)
    _refused(
        _cli(*command, "--allow_config_change"),
        "other conventions",
        "parameterisation: 'v' -> 'eps'",
        "a new --workdir",
    )
    assert _files(workdir) == before


def test_run_takes_only_imports(tmp_path):
    """run's --teacher is an import; a teacher stage directory belongs to distill."""
    _refused(
        _cli("run", f"--config={CONFIG}", f"--workdir={tmp_path / 'w'}", "--teacher=elsewhere"),
        "distill --teacher=DIR",
    )
    assert snapshot(tmp_path / "w") is None


def test_dit_xl2_config_smoke_on_mock_data(tmp_path):
    """configs/dit_xl2_imagenet256.py:smoke: a tiny random latent DiT in diffusers layout with
    ImageNet's 1000 classes, learned variance and a vae/ (as DiT-XL-2-256), imported (the VAE
    as the run's autoencoder) and distilled on mock ImageNet."""
    import tensorflow_datasets as tfds

    from distill_jax import sampling
    from distill_jax.config import load_config
    from distill_jax.run import imported
    from distill_jax.training import drivers

    config = load_config(str(ROOT / "configs" / "dit_xl2_imagenet256.py") + ":smoke")
    config.data.data_dir = str(tmp_path / "tfds")
    workdir = tmp_path / "run"
    teacher = f"diffusers:{DATA / 'dit_tiny_imagenet'}"
    # A vae/ that does not take the data's images: refused before anything is written.
    gray = tmp_path / "gray_vae"
    shutil.copytree(DATA / "dit_tiny_imagenet", gray)
    shutil.copytree(DATA / "sd_latent_tiny" / "vae", gray / "vae", dirs_exist_ok=True)
    with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
        with pytest.raises(ValueError, match="images have 3 channels, the VAE takes 1"):
            imported.import_teacher(config, tmp_path / "other", f"diffusers:{gray}")
        assert not (tmp_path / "other").exists()
        config = imported.import_teacher(config, workdir, teacher)
        # An epsilon teacher: fine-tuned to v first (config.finetune.to='auto'), on the latents.
        trained = drivers.distill_stages(config, workdir)
        assert trained == ["teacher_v", "stage1", "stage2/steps_0001"]
        run = Run.open(workdir)
        assert run.config.model.dit_learned_sigma and run.info.num_classes == 1000
        assert run.model(run.stage("teacher")).parameterisation == "eps"
        assert run.model(run.stage("teacher_v")).parameterisation == "v"
        assert run.model(run.student(1)).parameterisation == "v"
        assert run.stage("stage1").teacher == "teacher_v"
        assert run.latent and tuple(run.info.shape) == (4, 4, 4)
        x = sampling.sample(
            run, model="student", steps=1, w=14.0, conditions=np.array([0, 999]), seed=0
        )
    assert x.shape == (2, 8, 8, 3) and np.all(np.isfinite(x))


def test_class_count_mismatch_refused(tmp_path):
    """A config whose classes differ from the network's label table is refused, naming both."""
    import tensorflow_datasets as tfds

    from distill_jax.config import load_config
    from distill_jax.run import imported

    config = load_config(CONFIG)
    config.data.name, config.data.image_size = "cifar10", 8  # 8x8x3 as the teacher, 10 classes
    config.data.data_dir = str(tmp_path / "tfds")
    with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
        with pytest.raises(ValueError, match="has 1000 classes .* 'cifar10' has 10"):
            imported.import_teacher(
                config, tmp_path / "run", f"diffusers:{DATA / 'dit_tiny_imagenet'}"
            )
    assert not (tmp_path / "run").exists()
