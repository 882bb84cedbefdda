"""The CPU XLA flags distill_jax sets: how they are added, and that they keep the math."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import SUITE_XLA_FLAG

from distill_jax import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def test_apply_adds_missing_flags_keeps_the_users_and_can_be_turned_off():
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    added = xla_flags.apply(environ)
    assert [flag.split("=")[0] for flag in added] == [FLAG]
    assert environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=4", *added]
    assert xla_flags.apply(environ) == []  # already there: nothing added twice
    users = {"XLA_FLAGS": f"{FLAG}=individual_dot"}
    assert xla_flags.apply(users) == [] and users["XLA_FLAGS"] == f"{FLAG}=individual_dot"
    off = {"DISTILL_JAX_XLA_FLAGS": "off"}
    assert xla_flags.apply(off) == [] and "XLA_FLAGS" not in off


@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="libtpu (the test extra) not installed"
)
def test_jax_runs_on_the_cpu_without_probing_libtpu_where_no_accelerator_is(tmp_path):
    environ = {}
    assert xla_flags.cpu_without_accelerators(environ, device_files=())
    assert environ == {"JAX_PLATFORMS": "cpu"}
    users = {"JAX_PLATFORMS": "tpu,cpu"}  # the user's choice stands
    assert not xla_flags.cpu_without_accelerators(users, device_files=())
    assert users == {"JAX_PLATFORMS": "tpu,cpu"}
    (tmp_path / "accel0").touch()  # a TPU VM: JAX finds its chips itself
    on_tpu = {}
    assert not xla_flags.cpu_without_accelerators(on_tpu, device_files=(f"{tmp_path}/accel*",))
    assert on_tpu == {}
    # A command on this machine starts without libtpu's initialisation errors.
    result = subprocess.run(
        [sys.executable, "-c", "import distill_jax, jax; print(jax.devices()[0].platform)"],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"},
    )
    assert result.stdout.strip() == "cpu" and "INVALID_ARGUMENT" not in result.stderr


def _losses(workdir: pathlib.Path, flags_setting: str | None) -> np.ndarray:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "DISTILL_JAX_XLA_FLAGS")}
    env["XLA_FLAGS"] = SUITE_XLA_FLAG  # the suite's compile setting, in both runs
    if flags_setting is not None:
        env["DISTILL_JAX_XLA_FLAGS"] = flags_setting
    command = [
        sys.executable,
        "-m",
        "distill_jax",
        "train",
        "--config=configs/digits.py:smoke",
        f"--workdir={workdir}",
        "--config.teacher.num_steps=50",
        "--config.train.log_every=1",
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == list(range(1, 51))
    return np.array([[r["loss"], r["grad_norm"]] for r in records])


@pytest.mark.slow
def test_fixed_seed_run_has_the_same_losses_with_and_without_the_flags(tmp_path):
    with_flags = _losses(tmp_path / "on", None)
    without = _losses(tmp_path / "off", "off")
    # XLA's emitters and YNNPACK round differently; 50 steps keep that at float32 rounding.
    np.testing.assert_allclose(with_flags, without, rtol=1e-5)
    assert not np.array_equal(with_flags, without) or xla_flags.apply({}) == []
