"""Sampler export: a separate process without distill_jax reproduces the library's images."""

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from conftest import NO_DISTILL_JAX

from distill_jax import export, sampling
from distill_jax.diffusion import samplers
from distill_jax.diffusion.guidance_schedule import CONSTANT, parse_schedule
from distill_jax.run import Run

INTERVAL = parse_schedule("interval:0.2,0.8")


@pytest.fixture(scope="module")
def artifacts(smoke_workdir, tmp_path_factory):
    """A DDIM 1-step export (symbolic batch, every platform) and a stochastic 2-step one with a
    guidance interval (its first step, at t = 1, unguided)."""
    root = tmp_path_factory.mktemp("exports")
    ddim = export.export_sampler(smoke_workdir, steps=1, out=root / "ddim")
    stochastic = export.export_sampler(
        smoke_workdir,
        steps=2,
        out=root / "stochastic",
        stochastic=True,
        batch_size=3,
        platforms=("cpu",),
        schedule=INTERVAL,
    )
    return {"ddim": (root / "ddim", ddim), "stochastic": (root / "stochastic", stochastic)}


def _shipped_loader(artifact: pathlib.Path):
    """The artifact's own run_sampler.py as a module (not distill_jax's copy)."""
    spec = importlib.util.spec_from_file_location(
        "shipped_run_sampler", artifact / "run_sampler.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _inputs(batch: int, seed: int):
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((batch, 8, 8, 1)).astype(np.float32)
    labels = rng.integers(0, 10, batch).astype(np.int32)
    w = rng.uniform(0.0, 4.0, batch).astype(np.float32)
    return noise, labels, w


def _library_images(workdir, steps, noise, labels, w, key=None, schedule=CONSTANT):
    run = Run.open(workdir)
    fn = sampling.denoise_fn(run, "student", steps)
    # Per step and example: the library's schedule at each example's w.
    w = np.stack([schedule.weights(float(v), steps=steps) for v in w], axis=1)
    if key is None:
        x = samplers.ddim_sample(fn, noise, labels, w, steps=steps, **run.bounds)
    else:
        x = samplers.stochastic_sample(fn, noise, labels, w, key, steps=steps, **run.bounds)
    return np.clip(np.asarray(x), -1.0, 1.0)


# Runs in a fresh interpreter: any attempt to import distill_jax fails, and at the end it must
# not have been imported at all.
STANDALONE = NO_DISTILL_JAX + textwrap.dedent(
    """
    import numpy as np
    ddim_dir, stochastic_dir, inputs, out = sys.argv[1:5]
    sys.path.insert(0, ddim_dir)
    from run_sampler import load_exported, main

    data = np.load(inputs)
    ddim = load_exported(ddim_dir)
    stochastic = load_exported(stochastic_dir)
    results = {
        "ddim5": ddim(data["noise"], data["labels"], data["w"]),
        "ddim2": ddim(data["noise"][:2], data["labels"][:2], data["w"][:2]),
        "stochastic": stochastic(data["noise"][:3], data["labels"][:3], data["w"][:3],
                                 rng=data["key"]),
    }
    main([ddim_dir, "--num=4", "--label=7", "--w=2.0", "--out=" + out + ".cli.npy"])
    np.savez(out, **results)
    assert "distill_jax" not in sys.modules, "distill_jax was imported"
    print("STANDALONE OK")
    """
)


def test_standalone_process_reproduces_library_samples(artifacts, smoke_workdir, tmp_path):
    ddim_dir, metadata = artifacts["ddim"]
    stochastic_dir, _ = artifacts["stochastic"]
    noise, labels, w = _inputs(5, seed=0)
    key = np.asarray(jax.random.PRNGKey(11), np.uint32)
    np.savez(tmp_path / "inputs.npz", noise=noise, labels=labels, w=w, key=key)
    (tmp_path / "standalone.py").write_text(STANDALONE)
    env = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [
            sys.executable,
            "standalone.py",
            str(ddim_dir),
            str(stochastic_dir),
            str(tmp_path / "inputs.npz"),
            str(tmp_path / "out.npz"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "STANDALONE OK" in result.stdout
    got = np.load(tmp_path / "out.npz")

    expected = _library_images(smoke_workdir, 1, noise, labels, w)
    np.testing.assert_allclose(got["ddim5"], expected, atol=1e-5)
    np.testing.assert_allclose(got["ddim2"], expected[:2], atol=1e-5)
    expected = _library_images(
        smoke_workdir, 2, noise[:3], labels[:3], w[:3], jax.numpy.asarray(key), INTERVAL
    )
    np.testing.assert_allclose(got["stochastic"], expected, atol=1e-5)
    constant = _library_images(smoke_workdir, 2, noise[:3], labels[:3], w[:3], key)
    assert not np.array_equal(got["stochastic"], constant)  # the schedule was applied
    cli_images = np.load(tmp_path / "out.npz.cli.npy")
    assert cli_images.shape == (4, 8, 8, 1) and np.abs(cli_images).max() <= 1.0

    assert metadata["image_shape"] == [8, 8, 1] and metadata["num_classes"] == 10
    assert metadata["guidance"] == {"w_min": 0.0, "w_max": 4.0}
    assert metadata["steps"] == 1 and metadata["batch_size"] is None
    assert metadata["platforms"] == ["cpu", "cuda", "tpu"]
    on_disk = json.loads((ddim_dir / "metadata.json").read_text())
    assert on_disk == json.loads(json.dumps(metadata))


@pytest.mark.parametrize(
    "damage, verify, message",
    [
        ("truncate_function", True, "sampler.jaxexport is damaged: its sha256"),
        ("truncate_function", False, "does not deserialize"),
        ("alter_weights", True, "weights.npz is damaged: its sha256"),
        ("alter_weights_shape", False, "metadata.json expects float32"),
        ("remove_weights", True, "missing weights.npz"),
        ("future_format", True, "this loader reads 'distill_jax.sampler' version 1"),
    ],
)
def test_damaged_artifact_gets_clear_error(artifacts, tmp_path, damage, verify, message):
    artifact = tmp_path / "artifact"
    shutil.copytree(artifacts["ddim"][0], artifact)
    loader = _shipped_loader(artifact)
    if damage == "truncate_function":
        data = (artifact / "sampler.jaxexport").read_bytes()
        (artifact / "sampler.jaxexport").write_bytes(data[: len(data) // 2])
    elif damage.startswith("alter_weights"):
        with np.load(artifact / "weights.npz") as archive:
            weights = {name: archive[name] for name in archive.files}
        name = sorted(weights)[0]
        weights[name] = weights[name] + 1.0
        if damage == "alter_weights_shape":
            weights[name] = weights[name][..., :1]
        np.savez(artifact / "weights.npz", **weights)
    elif damage == "remove_weights":
        (artifact / "weights.npz").unlink()
    else:
        metadata = json.loads((artifact / "metadata.json").read_text())
        metadata["format_version"] = 2
        (artifact / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(loader.ArtifactError, match=message):
        loader.load_exported(artifact, verify=verify)


@pytest.mark.parametrize(
    "which, change, message",
    [
        ("ddim", dict(noise=np.zeros((2, 8, 4, 1), np.float32)), r"expected \('B', 8, 8, 1\)"),
        ("ddim", dict(noise=np.zeros((2, 8, 8, 1), np.float64)), "expected float32"),
        ("ddim", dict(labels=np.zeros(3, np.int32)), r"expected \(2,\)"),
        ("ddim", dict(labels=np.full(2, 10)), r"labels must lie in \[0, 10\)"),
        ("ddim", dict(w=np.full(2, 4.5, np.float32)), r"trained range \[0.0, 4.0\]"),
        ("ddim", dict(rng=0), "deterministic DDIM sampler"),
        ("stochastic", dict(), "needs rng"),
        (
            "stochastic",
            dict(rng=0, noise=np.zeros((2, 8, 8, 1), np.float32)),
            r"fixed batch of 3: expected shape \(3, 8, 8, 1\)",
        ),
    ],
)
def test_bad_inputs_get_clear_errors(artifacts, which, change, message):
    artifact = artifacts[which][0]
    sampler = _shipped_loader(artifact).load_exported(artifact)
    kwargs = dict(
        noise=np.zeros((3 if which == "stochastic" else 2, 8, 8, 1), np.float32),
        labels=1,
        w=1.0,
        rng=None,
    )
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        sampler(**kwargs)


def test_export_refuses_missing_student_and_existing_output(smoke_workdir, artifacts, tmp_path):
    with pytest.raises(ValueError, match="No finished student samples in 3 steps"):
        export.export_sampler(smoke_workdir, steps=3, out=tmp_path / "x")
    with pytest.raises(FileExistsError, match="exists"):
        export.export_sampler(smoke_workdir, steps=1, out=artifacts["ddim"][0])
    with pytest.raises(ValueError, match="platforms"):
        export.export_sampler(smoke_workdir, steps=1, out=tmp_path / "y", platforms=("rocm9",))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
