"""Faults: SIGTERM (preemption), a damaged latest checkpoint, a locked workdir, a full disk.

Each runs the real CLI on the Gaussian-mixture smoke config (a small MLP, so steps are fast)
and compares the final weights with an uninterrupted run of the same config.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from distill_jax.run import Run
from distill_jax.run import workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
GMM_SMOKE = str(ROOT / "configs" / "gmm.py") + ":smoke"
LONG = ["--config.teacher.num_steps=1500", "--config.train.log_every=10"]


def _cli(workdir, *flags, wait=True):
    cmd = [sys.executable, "-m", "distill_jax", "train", f"--config={GMM_SMOKE}"]
    cmd += [f"--workdir={workdir}", *flags]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _weights(workdir):
    run = Run.open(workdir)
    spec = run.stage("teacher")
    return [
        np.asarray(leaf)
        for which in ("params", "ema_params")
        for leaf in jax.tree.leaves(run.load_params(spec, which=which))
    ]


def _assert_same_weights(a, b):
    for x, y in zip(_weights(a), _weights(b), strict=True):
        np.testing.assert_array_equal(x, y)


def _logged_steps(workdir) -> list[int]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 1500-step teacher run (the reference)."""
    workdir = tmp_path_factory.mktemp("faults") / "straight"
    result = _cli(workdir, *LONG, "--config.train.checkpoint_every=1000")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_sigterm_saves_the_current_step_and_resumes_bit_identically(straight, tmp_path):
    workdir = tmp_path / "preempted"
    # No periodic save before the signal: whatever is saved is the SIGTERM save.
    proc = _cli(workdir, *LONG, "--config.train.checkpoint_every=100000", wait=False)
    assert _wait_for(lambda: len(_logged_steps(workdir)) >= 3, proc), "training never started"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    stderr = stderr.decode()
    assert proc.returncode == 143, stderr[-3000:]
    assert "stopped by SIGTERM after step" in stderr
    saved = [int(p.name) for p in (workdir / "teacher").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 0 < saved[0] < 1500
    # At most one step's work is lost: the saved step is at least the last logged one.
    assert saved[0] >= max(_logged_steps(workdir))
    resumed = _cli(workdir, *LONG, "--config.train.checkpoint_every=100000")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {saved[0]}." in resumed.stderr
    _assert_same_weights(straight, workdir)
    steps = _logged_steps(workdir)
    assert len(steps) == len(set(steps)) == 150  # no row written twice across the resume


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(straight, tmp_path):
    workdir = tmp_path / "damaged"
    proc = _cli(workdir, *LONG, "--config.train.checkpoint_every=500", wait=False)
    kept = workdir / "teacher"
    assert _wait_for(
        lambda: len([p for p in kept.glob("[0-9]*") if p.name.isdigit()]) >= 2, proc
    ), "no two checkpoints"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = sorted(int(p.name) for p in kept.iterdir() if p.name.isdigit())
    latest = kept / str(steps[-1])
    largest = max((p for p in latest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    resumed = _cli(workdir, *LONG, "--config.train.checkpoint_every=500")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{steps[-1]} cannot be restored" in resumed.stderr
    assert f"resumed from step {steps[-2]}." in resumed.stderr
    assert (kept / f"damaged.{steps[-1]}").is_dir()  # kept for inspection, not deleted
    _assert_same_weights(straight, workdir)


def test_a_second_process_on_a_locked_workdir_exits_at_once(tmp_path):
    workdir = tmp_path / "locked"
    with workdir_lib.locked(workdir):
        start = time.perf_counter()
        result = _cli(workdir, "--config.teacher.num_steps=5")
        elapsed = time.perf_counter() - start
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "is in use by another distill-jax process" in last and f"pid {os.getpid()}" in last
    assert "Traceback" not in result.stderr
    assert not (workdir / "teacher").exists() and not (workdir / "config.json").exists()
    assert elapsed < 60


def _mount_tmpfs(path: pathlib.Path, size: str) -> bool:
    path.mkdir(parents=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _fill(path: pathlib.Path) -> None:
    """Fills what is left of path's file system. Unbuffered: a buffered file would retry the
    unwritten rest of its last write on close and raise there."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        while os.write(fd, bytes(1 << 20)) > 0:
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def test_a_full_disk_stops_the_run_with_one_message_and_the_kept_checkpoints_resume(
    straight, tmp_path
):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "64m"):
        pytest.skip("mounting a tmpfs is not permitted here")
    proc = None
    try:
        workdir = disk / "run"
        # Few metrics writes (log_every 1000), so a checkpoint save is what meets the full disk.
        flags = [*LONG, "--config.train.checkpoint_every=100", "--config.train.log_every=1000"]
        proc = _cli(workdir, *flags, wait=False)
        kept = workdir / "teacher"
        assert _wait_for(lambda: (kept / "100").is_dir() and (kept / "200").is_dir(), proc)
        _fill(disk / "ballast")
        _, stderr = proc.communicate(timeout=300)
        stderr = stderr.decode()
        assert proc.returncode == 2, stderr[-3000:]
        last = stderr.strip().splitlines()[-1]
        assert "saving the checkpoint of step" in last and "No space left on device" in last
        assert "are intact" in last and "rerun the same command" in last, last
        # Orbax's and tensorstore's background threads report the failed write themselves
        # (their lines come first); no traceback runs through distill_jax's own code.
        assert f'File "{ROOT / "distill_jax"}' not in stderr, stderr[-3000:]
        elsewhere = tmp_path / "elsewhere"
        shutil.copytree(workdir, elsewhere)  # with any half-written save: resuming cleans it
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()  # a process holding files on the tmpfs would keep it mounted
            proc.wait()
        subprocess.run(["umount", str(disk)], capture_output=True, timeout=30)
    resumed = _cli(elsewhere, *flags)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not list((elsewhere / "teacher").glob("*orbax-checkpoint-tmp*"))
    _assert_same_weights(straight, elsewhere)


def test_a_read_only_workdir_is_one_clear_line(tmp_path):
    disk = tmp_path / "readonly"
    disk.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(disk)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        result = _cli(disk, "--config.teacher.num_steps=5")
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True, timeout=30)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "Read-only file system" in last and str(disk) in last, last
    assert "Traceback" not in result.stderr


def test_a_refused_resume_leaves_the_workdir_accepting_its_own_config(tmp_path):
    workdir = tmp_path / "run"
    flags = ["--config.teacher.num_steps=40", "--config.train.checkpoint_every=10"]
    proc = _cli(workdir, *flags, wait=False)
    assert _wait_for(lambda: (workdir / "teacher" / "10").is_dir(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    recorded = (workdir / "config.json").read_text()
    # Without clipping the optimiser state has another structure: the checkpoints cannot be
    # restored into it, which the record must not be changed for.
    changed = _cli(workdir, *flags, "--config.teacher.optimizer.grad_clip=0")
    assert changed.returncode == 2 and "grad_clip > 0" in changed.stderr.strip().splitlines()[-1]
    forced = _cli(
        workdir, *flags, "--config.teacher.optimizer.grad_clip=0", "--allow_config_change"
    )
    assert forced.returncode == 2, forced.stderr[-3000:]
    last = forced.stderr.strip().splitlines()[-1]
    assert "can be restored" in last and "recorded config" in last, last
    assert (workdir / "config.json").read_text() == recorded
    assert not list((workdir / "teacher").glob("damaged.*"))  # nothing was set aside
    again = _cli(workdir, *flags)
    assert again.returncode == 0, again.stderr[-3000:]
