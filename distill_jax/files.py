"""Atomic writes: every file and folder distill_jax publishes appears whole or not at all.

All paths are `etils.epath.Path`s, so a workdir may be a local folder or a `gs://` bucket. On a
local (POSIX) filesystem the final rename is atomic: a crash or a full disk leaves the previous
version, never half a file. On object stores a rename is a copy then a delete; that path is not
exercised by the tests (they have no bucket), so treat it as best effort.

`check_room` compares what a command is about to write or hold with the free memory and disk,
so that work whose output would not fit is refused before it starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator

from etils import epath

PathLike = str | epath.PathLike


def _staging_name(path: epath.Path) -> epath.Path:
    """A unique sibling name that keeps the suffix (np.savez and PIL look at it)."""
    return path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[epath.Path]:
    """Yield a temporary sibling of `path` to write; on success it replaces `path`.

    The parent folder is created. If the body raises, the temporary file is removed and `path`
    keeps its previous content.
    """
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _staging_name(path)
    try:
        yield tmp
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write(path: PathLike, data: str | bytes) -> epath.Path:
    """Write text (UTF-8) or bytes to `path` atomically; returns `path`."""
    path = epath.Path(path)
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
    return path


@contextlib.contextmanager
def atomic_directory(path: PathLike, *, replace: bool = False) -> Iterator[epath.Path]:
    """Yield an empty staging folder; on success it becomes `path`.

    With `replace`, an existing `path` is removed just before the rename (the caller decides
    whether that is allowed); without it, an existing `path` makes the rename fail with
    FileExistsError and the staging folder is removed. A folder that another process published
    first also counts as existing.
    """
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_name(path)
    staging.mkdir()
    try:
        yield staging
        if path.exists():
            if not replace:
                raise FileExistsError(f"{path} exists.")
            path.rmtree()
        staging.rename(path)
    finally:
        if staging.exists():
            staging.rmtree()


@contextlib.contextmanager
def exclusive(lock_file: PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (created if missing) while the body runs.

    For work that several processes on one machine may start at once, such as preparing a
    bundled dataset: the second process waits, then finds the work done. Only local paths can
    be locked (flock); on other filesystems the body runs without a lock.
    """
    path = epath.Path(lock_file)
    if "://" in os.fspath(path):  # gs://, s3://: no flock
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(os.fspath(path), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def available_memory() -> int | None:
    """Bytes of memory the system can give a new allocation (MemAvailable); None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def free_disk(path: PathLike) -> int | None:
    """Free bytes on the filesystem that would hold `path`; None for a remote (gs://) path."""
    if "://" in os.fspath(path):
        return None
    directory = os.path.abspath(os.fspath(path))
    while not os.path.isdir(directory):  # the nearest folder that exists
        directory = os.path.dirname(directory)
    return shutil.disk_usage(directory).free


def readable_size(num_bytes: float) -> str:
    """1234567 -> '1.2 MB' (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if num_bytes < 1000 or unit == "TB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    raise AssertionError("unreachable")


def check_room(what: str, *, memory: int, disk: int, path: PathLike) -> None:
    """Raise ValueError, naming the sizes, if `what` needs more memory or disk than is free."""
    for kind, needed, free in (
        ("memory", memory, available_memory()),
        (f"disk at {os.path.dirname(os.fspath(path)) or '.'}", disk, free_disk(path)),
    ):
        if free is not None and needed > free:
            raise ValueError(
                f"{what} needs about {readable_size(needed)} of {kind}, and "
                f"{readable_size(free)} is free: accepted a smaller number, or several runs "
                "with other seeds."
            )
