"""`distill-jax sample` and the sampling library on the smoke run: files, errors, modes."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from distill_jax import sampling

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _sample_cli(workdir, *flags):
    return subprocess.run(
        [sys.executable, "-m", "distill_jax", "sample", f"--workdir={workdir}", *flags],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_sample_cli_writes_npz_and_png(smoke_workdir, tmp_path):
    out = tmp_path / "student.npz"
    result = _sample_cli(
        smoke_workdir,
        "--model=student",
        "--steps=2",
        "--guidance=1.5",
        "--num=12",
        "--labels=3,7",
        "--seed=4",
        f"--out={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "student N=2: 100%" in result.stderr and "12/12" in result.stderr  # the progress bar
    with np.load(out) as data:
        assert data["images"].dtype == np.uint8 and data["images"].shape == (12, 8, 8, 1)
        assert data["labels"].dtype == np.int32
        np.testing.assert_array_equal(data["labels"], [3, 7] * 6)
    assert out.with_suffix(".png").is_file()
    # The stochastic sampler: same shapes, other images than the deterministic one.
    stochastic, _ = sampling.sample_to_files(
        smoke_workdir,
        model="student",
        steps=2,
        w=1.5,
        num=12,
        labels=[3, 7],
        seed=4,
        stochastic=True,
        out=tmp_path / "stochastic.npz",
    )
    with np.load(stochastic) as data, np.load(out) as deterministic:
        assert data["images"].shape == (12, 8, 8, 1) and data["images"].dtype == np.uint8
        assert np.any(data["images"] != deterministic["images"])


def test_sample_cli_names_existing_steps_and_the_guidance_range(smoke_workdir, tmp_path):
    result = _sample_cli(
        smoke_workdir, "--model=student", "--steps=3", "--guidance=1", f"--out={tmp_path}/a.npz"
    )
    assert result.returncode == 2
    assert "No finished student samples in 3 steps" in result.stderr
    assert "1, 2, 4, 8" in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(ValueError, match=r"outside the student's trained range \[0, 4\]"):
        sampling.sample_to_files(
            smoke_workdir, model="student", steps=2, w=5.0, num=2, out=tmp_path / "b.npz"
        )
    assert not (tmp_path / "a.npz").exists() and not (tmp_path / "b.npz").exists()


def test_teacher_image_to_image_and_inpainting(smoke_workdir, tmp_path):
    # Start images: the teacher's own samples, saved the way `sample` saves them.
    init, _ = sampling.sample_to_files(
        smoke_workdir, model="teacher", steps=2, w=1.0, num=6, out=tmp_path / "init.npz"
    )
    with np.load(init) as data:
        images, labels = data["images"], data["labels"]
    # Inpainting keeps the known (left) half exactly.
    inpainted, png = sampling.sample_to_files(
        smoke_workdir,
        model="student",
        steps=2,
        w=1.0,
        num=0,
        out=tmp_path / "inpaint.npz",
        init=str(init),
        mask="left",
        seed=1,
    )
    with np.load(inpainted) as data:
        np.testing.assert_array_equal(data["images"][:, :, :4], images[:, :, :4])
        np.testing.assert_array_equal(data["labels"], labels)
    assert png.is_file()
    # Image-to-image from a small t_start stays close to the start images.
    near, _ = sampling.sample_to_files(
        smoke_workdir,
        model="teacher",
        steps=2,
        w=0.0,
        num=0,
        out=tmp_path / "near.npz",
        init=str(init),
        t_start=0.02,
    )
    with np.load(near) as data:
        diff = np.abs(data["images"].astype(int) - images.astype(int))
    assert diff.mean() < 8
    with pytest.raises(ValueError, match="needs --init"):
        sampling.sample_to_files(
            smoke_workdir, model="student", steps=2, w=1.0, num=2, out=tmp_path / "c", mask="top"
        )


def test_second_identical_sample_command_compiles_nothing(smoke_workdir, tmp_path):
    # Every program of a sample command goes to the persistent cache (even those that compile
    # in milliseconds), so the same command again only reads it back.
    flags = ["--model=student", "--steps=2", "--guidance=1", "--num=4", f"--out={tmp_path}/s.npz"]
    env = {"DISTILL_JAX_COMPILATION_CACHE": str(tmp_path / "cache"), "JAX_LOG_COMPILES": "1"}
    logs = []
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-m", "distill_jax", "sample", f"--workdir={smoke_workdir}", *flags],
            cwd=ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        logs.append(result.stderr)
    compiled = [line for line in logs[1].splitlines() if "Compiling jit(" in line]
    hits = [line for line in logs[1].splitlines() if "Persistent compilation cache hit" in line]
    assert compiled and "jit(_sample)" in "".join(compiled)
    assert len(hits) == len(compiled), "\n".join(compiled)
    # The first command had nothing to read: it compiled and stored every program.
    assert "Persistent compilation cache hit" not in logs[0]


def test_samples_that_would_not_fit_are_refused_with_their_size(
    smoke_workdir, tmp_path, monkeypatch
):
    """The disk check of --num (the memory one is a case of tests/test_bad_inputs.py)."""
    from distill_jax import files
    from distill_jax.run import Run

    run = Run.open(smoke_workdir)
    monkeypatch.setattr(files, "free_disk", lambda path: 60_000)
    # 1,000 uint8 images of 8x8x1 and their int32 labels: 68,000 bytes.
    with pytest.raises(
        ValueError, match=r"num=1000 \(samples of 8x8x1\) needs about 68.0 kB of disk"
    ):
        sampling.check_output_fits(run, 1000, tmp_path / "s.npz")
    monkeypatch.setattr(files, "free_disk", lambda path: 70_000)
    sampling.check_output_fits(run, 1000, tmp_path / "s.npz")
