"""The launchers: the commands the TPU-pod launcher and the SLURM script run, the local one's env.

The local launcher's end-to-end run is tests/test_multihost.py; here gcloud and srun are
replaced by stubs on PATH that record their arguments, so what would run on a pod or a
cluster is checked exactly without one.
"""

import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU_POD = ROOT / "launch" / "tpu_pod.py"
SLURM = ROOT / "launch" / "slurm.sbatch"
LOCAL = ROOT / "launch" / "local.py"
COMMAND = ["run", "--config=configs/digits.py", "--workdir=/mnt/runs/digits"]


def _tpu_pod(*args, env=None):
    return subprocess.run(
        [sys.executable, str(TPU_POD), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def _stub(directory: pathlib.Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


def test_tpu_pod_dry_run_prints_the_gcloud_commands():
    result = _tpu_pod(
        "--name=distill-v4",
        "--zone=us-central2-b",
        "--project=my-proj",
        "--accelerator_type=v4-32",
        "--spot",
        "--workdir_bucket=gs://my-bucket",
        "--env=XLA_FLAGS=--xla_dump_to=/tmp/x",
        "--dry_run",
        "--",
        *COMMAND,
    )
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line) for line in result.stdout.splitlines() if line[:1] != "#"]
    location = ["--zone=us-central2-b", "--project=my-proj"]
    base = ["gcloud", "compute", "tpus", "tpu-vm"]
    describe, create, scp, setup, run = commands
    assert describe == [*base, "describe", "distill-v4", *location]
    assert create == [
        *base,
        "create",
        "distill-v4",
        *location,
        "--accelerator-type=v4-32",
        "--version=tpu-ubuntu2204-base",
        "--spot",
    ]
    assert scp[:5] == [*base, "scp"] and scp[6:] == [
        "distill-v4:~/distill_jax_src.tar.gz",
        "--worker=all",
        *location,
    ]
    assert scp[5].endswith("distill_jax_src_distill-v4.tar.gz")
    assert setup[:6] == [*base, "ssh", "distill-v4"] and "--worker=all" in setup
    setup_line = setup[-1].removeprefix("--command=")
    assert "pip install -q -e . 'jax[tpu]'" in setup_line
    assert "gcsfuse --implicit-dirs my-bucket /mnt/runs" in setup_line
    assert run[:6] == [*base, "ssh", "distill-v4"] and "--worker=all" in run
    remote = shlex.split(run[-1].removeprefix("--command="))
    assert remote[:5] == [
        "cd",
        "~/distill_jax",
        "&&",
        "DISTILL_JAX_DISTRIBUTED=auto",
        "XLA_FLAGS=--xla_dump_to=/tmp/x",
    ]
    assert remote[5:] == ["python3", "-m", "distill_jax", *COMMAND]


def test_tpu_pod_skip_setup_and_delete():
    result = _tpu_pod(
        "--name=p", "--zone=z", "--skip_setup", "--delete", "--dry_run", "--", *COMMAND
    )
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line) for line in result.stdout.splitlines() if line[:1] != "#"]
    verbs = [c[4] for c in commands]
    assert verbs == ["describe", "create", "ssh", "delete"]
    assert commands[-1] == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "delete",
        "p",
        "--zone=z",
        "--quiet",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name=p", "--zone=z", "--dry_run"], "give the distill-jax command"),
        (["--zone=z", "--dry_run", "--", *COMMAND], "--name"),
        (["--name=p", "--zone=z", "--env=NOVALUE", "--dry_run", "--", *COMMAND], "NAME=VALUE"),
    ],
)
def test_tpu_pod_bad_arguments_are_refused(args, message):
    result = _tpu_pod(*args)
    assert result.returncode == 2
    assert message in result.stderr


def test_tpu_pod_creates_a_missing_pod_ships_the_code_and_runs_on_all_workers(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "gcloud.log"
    # describe fails (no such pod); scp keeps a copy of the tarball it was given.
    _stub(
        bin_dir,
        "gcloud",
        f'echo "$*" >> {log}\n'
        'if [[ "$4" == describe ]]; then exit 1; fi\n'
        f'if [[ "$4" == scp ]]; then cp "$5" {tmp_path / "shipped.tar.gz"}; fi\n',
    )
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    result = _tpu_pod("--name=pod1", "--zone=z", "--", *COMMAND, env=env)
    assert result.returncode == 0, result.stderr
    verbs = [line.split()[3] for line in log.read_text().splitlines()]
    assert verbs == ["describe", "create", "scp", "ssh", "ssh"]
    with tarfile.open(tmp_path / "shipped.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"distill_jax/cli.py", "launch/tpu_pod.py", "setup.py"} <= names
    assert not any(name.startswith(".venv/") for name in names)

    # An existing pod is reused; a failing remote command's exit code is returned.
    log.unlink()
    _stub(bin_dir, "gcloud", f'echo "$*" >> {log}\nif [[ "$4" == ssh ]]; then exit 3; fi\n')
    result = _tpu_pod("--name=pod1", "--zone=z", "--skip_setup", "--", *COMMAND, env=env)
    assert result.returncode == 3
    assert [line.split()[3] for line in log.read_text().splitlines()] == ["describe", "ssh"]


def test_slurm_script_parses():
    assert shutil.which("bash")
    result = subprocess.run(["bash", "-n", str(SLURM)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    directives = [line for line in SLURM.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=8" in directives
    assert "#SBATCH --gres=gpu:8" in directives


def test_slurm_script_runs_one_srun_with_the_command_and_auto_detection(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "srun.txt"
    _stub(
        bin_dir,
        "srun",
        f'printf "%s\\n" "$@" > {record}\n'
        f'echo "ENV $DISTILL_JAX_DISTRIBUTED $DISTILL_JAX_HEARTBEAT_TIMEOUT" >> {record}\n',
    )
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_SUBMIT_DIR=str(ROOT),
        DISTILL_JAX_HEARTBEAT_TIMEOUT="30",
    )
    result = subprocess.run(
        ["bash", str(SLURM), *COMMAND], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    lines = record.read_text().splitlines()
    assert lines[:-1] == [
        "--kill-on-bad-exit=1",
        "--label",
        "python",
        "-m",
        "distill_jax",
        *COMMAND,
    ]
    assert lines[-1] == "ENV auto 30"

    no_command = subprocess.run(["bash", str(SLURM)], env=env, capture_output=True, text=True)
    assert no_command.returncode == 2 and "usage" in no_command.stderr


def _load_local():
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_local_env", LOCAL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_local_launcher_environment_and_exit_codes():
    local = _load_local()
    env = local.process_env(
        base={"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_foo=1"},
        process_id=1,
        num_processes=2,
        coordinator="localhost:1234",
        devices_per_process=2,
        heartbeat_timeout_s=5,
    )
    assert env["DISTILL_JAX_COORDINATOR"] == "localhost:1234"
    assert env["DISTILL_JAX_NUM_PROCESSES"] == "2" and env["DISTILL_JAX_PROCESS_ID"] == "1"
    assert env["DISTILL_JAX_HEARTBEAT_TIMEOUT"] == "5"
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=2"
    assert env["JAX_PLATFORMS"] == "cpu"
    gpu = local.process_env(
        base={},
        process_id=1,
        num_processes=2,
        coordinator="h:1",
        devices_per_process=0,
        gpus_per_process=4,
    )
    assert gpu["CUDA_VISIBLE_DEVICES"] == "4,5,6,7" and "JAX_PLATFORMS" not in gpu
    assert local.overall_exit_code([0, 0]) == 0
    assert local.overall_exit_code([0, 3, 1]) == 3
    assert local.overall_exit_code([-9, 0]) == 137


def test_local_launcher_reports_a_failing_command():
    result = subprocess.run(
        [sys.executable, str(LOCAL), "--num_processes=2", "--", "train", "--workdir=/tmp/x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "[p0] " in result.stdout and "[p1] " in result.stdout
    assert "--config is required" in result.stdout
    assert "exit codes [2, 2]" in result.stderr  # a usage error: one line, exit code 2
    missing = subprocess.run(
        [sys.executable, str(LOCAL), "--num_processes=2"], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "after '--'" in missing.stderr
