"""Run one distill-jax command on every worker of a Cloud TPU VM pod.

    python launch/tpu_pod.py --name=distill-v4 --zone=us-central2-b \
        --accelerator_type=v4-32 --workdir_bucket=gs://my-bucket -- \
        run --config=configs/imagenet64.py --workdir=/mnt/runs/imagenet64

Steps (each one a gcloud command; `--dry_run` prints them all and runs nothing):

1. reuse the TPU VM `--name` if `gcloud compute tpus tpu-vm describe` finds it, otherwise
   create it (`--spot` / `--reserved` for those capacity types);
2. copy this checkout (tracked and untracked, non-ignored files, as a tarball) to every worker
   with `scp --worker=all` and install it there with `pip install -e .` and `jax[tpu]`
   (`--skip_setup` skips this step for a pod that is already set up);
3. run `python3 -m distill_jax COMMAND...` on every worker at once with `ssh --worker=all`,
   with DISTILL_JAX_DISTRIBUTED=auto so `jax.distributed.initialize()` takes the coordinator,
   process count and index from the TPU VM metadata. The same command on every worker is the
   multi-controller model: each process feeds its own chips, Orbax writes from all of them.

The workdir must be visible to every worker (a GCS bucket mounted with gcsfuse, a Filestore
share): `--workdir_bucket=gs://B` mounts it at /mnt/runs on every worker during setup.
`--delete` deletes the pod after the command (also when it fails).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import subprocess
import sys
import tarfile
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
REMOTE_DIR = "~/distill_jax"
REMOTE_TARBALL = "~/distill_jax_src.tar.gz"
MOUNT_POINT = "/mnt/runs"


def _location(args: argparse.Namespace) -> list[str]:
    flags = [f"--zone={args.zone}"]
    if args.project:
        flags.append(f"--project={args.project}")
    return flags


def describe_command(args: argparse.Namespace) -> list[str]:
    """gcloud command whose success means the pod already exists."""
    return ["gcloud", "compute", "tpus", "tpu-vm", "describe", args.name, *_location(args)]


def create_command(args: argparse.Namespace) -> list[str]:
    """gcloud command that creates the pod."""
    cmd = [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        args.name,
        *_location(args),
        f"--accelerator-type={args.accelerator_type}",
        f"--version={args.version}",
    ]
    if args.spot:
        cmd.append("--spot")
    if args.reserved:
        cmd.append("--reserved")
    return cmd


def scp_command(args: argparse.Namespace, tarball: str) -> list[str]:
    """gcloud command that copies the source tarball to every worker."""
    return [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "scp",
        tarball,
        f"{args.name}:{REMOTE_TARBALL}",
        "--worker=all",
        *_location(args),
    ]


def ssh_command(args: argparse.Namespace, remote: str) -> list[str]:
    """gcloud command that runs the shell line `remote` on every worker."""
    return [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        args.name,
        "--worker=all",
        *_location(args),
        f"--command={remote}",
    ]


def delete_command(args: argparse.Namespace) -> list[str]:
    """gcloud command that deletes the pod."""
    return ["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_location(args), "--quiet"]


def setup_line(args: argparse.Namespace) -> str:
    """Shell line run on every worker: unpack the sources, install, mount the bucket."""
    parts = [
        f"mkdir -p {REMOTE_DIR}",
        f"tar xzf {REMOTE_TARBALL} -C {REMOTE_DIR}",
        f"cd {REMOTE_DIR}",
        "python3 -m pip install -q -U pip",
        f"python3 -m pip install -q -e . {shlex.quote(args.jax_package)}",
    ]
    if args.workdir_bucket:
        bucket = args.workdir_bucket.removeprefix("gs://").rstrip("/")
        parts += [
            f"sudo mkdir -p {MOUNT_POINT}",
            f"sudo chown $USER {MOUNT_POINT}",
            f"(mountpoint -q {MOUNT_POINT} || gcsfuse --implicit-dirs {shlex.quote(bucket)} "
            f"{MOUNT_POINT})",
        ]
    return " && ".join(parts)


def run_line(command: list[str], env: list[str]) -> str:
    """Shell line run on every worker: the distill-jax command with the distributed env."""
    # Values are quoted: a value with spaces or shell syntax is passed as data, never run.
    assignments = ["DISTILL_JAX_DISTRIBUTED=auto"]
    for item in env:
        name, _, value = item.partition("=")
        assignments.append(f"{name}={shlex.quote(value)}")
    quoted = " ".join(shlex.quote(a) for a in command)
    return f"cd {REMOTE_DIR} && {' '.join(assignments)} python3 -m distill_jax {quoted}"


def source_files() -> list[str]:
    """The checkout's files to ship: tracked plus untracked files git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.decode()
    return sorted(name for name in listed.split("\0") if name and (REPO / name).is_file())


def make_tarball(path: str) -> None:
    """Write the checkout's source files to the gzip tarball `path`."""
    with tarfile.open(path, "w:gz") as tar:
        for name in source_files():
            tar.add(REPO / name, arcname=name)


def plan(args: argparse.Namespace, command: list[str], tarball: str) -> list[list[str]]:
    """Every gcloud command of the launch, in order (create is only run if describe fails)."""
    steps = [describe_command(args), create_command(args)]
    if not args.skip_setup:
        steps += [scp_command(args, tarball), ssh_command(args, setup_line(args))]
    steps.append(ssh_command(args, run_line(command, args.env)))
    if args.delete:
        steps.append(delete_command(args))
    return steps


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split `[options] -- COMMAND...` and parse the options."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="%(prog)s [options] -- COMMAND [distill-jax flags]",
    )
    parser.add_argument("--name", required=True, help="TPU VM (pod) name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", default=None, help="default: gcloud's configured project")
    parser.add_argument("--accelerator_type", default="v4-32", help="e.g. v4-32, v5litepod-16")
    parser.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU VM software image")
    parser.add_argument("--spot", action="store_true", help="create as a Spot VM")
    parser.add_argument("--reserved", action="store_true", help="create in a reservation")
    parser.add_argument(
        "--jax_package", default="jax[tpu]", help="pip requirement installed beside distill_jax"
    )
    parser.add_argument(
        "--workdir_bucket", default="", help=f"gs:// bucket mounted at {MOUNT_POINT} (gcsfuse)"
    )
    parser.add_argument(
        "--env", action="append", default=[], help="extra NAME=VALUE for the command (repeat)"
    )
    parser.add_argument("--skip_setup", action="store_true", help="pod already has the code")
    parser.add_argument("--delete", action="store_true", help="delete the pod afterwards")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run none")
    if "--" in argv:
        split = argv.index("--")
        options, command = argv[:split], argv[split + 1 :]
    else:
        options, command = argv, []
    args = parser.parse_args(options)
    if not command:
        parser.error("give the distill-jax command after '--', e.g. -- run --config=...")
    for item in args.env:
        name = item.partition("=")[0]
        if "=" not in item or not name.isidentifier():
            parser.error(
                f"--env={item!r} is invalid: accepted NAME=VALUE with NAME a variable name."
            )
    return args, command


def main(argv: list[str] | None = None) -> int:
    """Print (--dry_run) or run the launch; return the remote command's exit code."""
    args, command = parse(sys.argv[1:] if argv is None else argv)
    tarball = os.path.join(tempfile.gettempdir(), f"distill_jax_src_{args.name}.tar.gz")
    steps = plan(args, command, tarball)
    if args.dry_run:
        if not args.skip_setup:
            print(f"# tarball of {REPO} -> {tarball}")
        print("# create only if describe fails")
        for step in steps:
            print(shlex.join(step))
        return 0
    describe, create, *rest = steps
    if subprocess.run(describe, capture_output=True).returncode != 0:
        print(f"[tpu_pod] creating {args.name}", flush=True)
        subprocess.run(create, check=True)
    else:
        print(f"[tpu_pod] reusing {args.name}", flush=True)
    if not args.skip_setup:
        make_tarball(tarball)
    code = 0
    delete = rest.pop() if args.delete else None
    try:
        for step in rest:
            code = subprocess.run(step).returncode
            if code:
                print(f"[tpu_pod] failed ({code}): {shlex.join(step)}", file=sys.stderr)
                break
    finally:
        if delete:
            subprocess.run(delete)
    return code


if __name__ == "__main__":
    sys.exit(main())
