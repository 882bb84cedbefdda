"""Load and run an exported distill_jax sampler with jax and numpy alone.

This file is copied verbatim into every artifact as `run_sampler.py`; it must never import
distill_jax, so a serving process needs only `pip install jax numpy flatbuffers` (flatbuffers
is jax.export's serialization format). An artifact directory:

  sampler.jaxexport  the jax.export serialized sampler (StableHLO + calling convention)
  weights.npz        its weights, one array per parameter, named by parameter path
  metadata.json      shapes, guidance range, steps, input/output specs, sha256 checksums
  run_sampler.py     this loader

Python:

  sampler = load_exported("artifact/")              # checks files and checksums
  images = sampler(noise, labels, w)                # [B, H, W, C] float32 in [-1, 1]
  images = sampler(noise, labels, w, rng=seed)      # a stochastic export also takes rng

Command line (writes a .npy of images):

  python run_sampler.py ARTIFACT --num=16 --label=3 --w=1.0 --seed=0 --out=images.npy
  python run_sampler.py ARTIFACT --conditions=prompts.npy ...   # a text sampler
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys

import jax
import numpy as np

FORMAT = "distill_jax.sampler"
FORMAT_VERSION = 1
FILES = ("metadata.json", "sampler.jaxexport", "weights.npz")


class ArtifactError(ValueError):
    """The artifact directory is incomplete, damaged, or of an unknown format."""


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_metadata(directory: pathlib.Path) -> dict:
    try:
        metadata = json.loads((directory / "metadata.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(f"{directory / 'metadata.json'} is unreadable: {error}.") from error
    if metadata.get("format") != FORMAT or metadata.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{directory} holds format {metadata.get('format')!r} version "
            f"{metadata.get('format_version')!r}; this loader reads {FORMAT!r} version "
            f"{FORMAT_VERSION}."
        )
    return metadata


def _member(directory: pathlib.Path, metadata: dict, entry: str, name: str) -> pathlib.Path:
    """The file metadata.json names for `entry`: only the artifact's own plain file name.

    A name with a directory part ('../x', '/etc/x') could make the loader read a file outside
    the artifact, so anything but the one expected name is refused.
    """
    given = metadata.get(entry, {}).get("file")
    if given != name:
        raise ArtifactError(
            f"{directory / 'metadata.json'} names {given!r} as the {entry} file: accepted "
            f"{name!r}, a file inside the artifact."
        )
    return directory / name


def _check_checksum(path: pathlib.Path, expected: str) -> None:
    actual = _sha256(path)
    if actual != expected:
        raise ArtifactError(
            f"{path.name} is damaged: its sha256 is {actual}, metadata.json records {expected}. "
            "Copy the artifact again or re-export it."
        )


def _load_weights(path: pathlib.Path, leaves: list[dict]) -> list[np.ndarray]:
    """The weight arrays in the order the serialized function takes them, checked."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            stored = {name: archive[name] for name in archive.files}
    except Exception as error:  # a damaged zip raises several exception types
        raise ArtifactError(f"{path} is unreadable: {error}.") from error
    arrays = []
    for leaf in leaves:
        name = leaf["name"]
        if name not in stored:
            raise ArtifactError(f"{path.name} lacks the parameter {name!r}.")
        array = stored[name]
        if list(array.shape) != leaf["shape"] or str(array.dtype) != leaf["dtype"]:
            raise ArtifactError(
                f"{path.name}: parameter {name!r} is {array.dtype}{list(array.shape)}, "
                f"metadata.json expects {leaf['dtype']}{leaf['shape']}."
            )
        arrays.append(array)
    return arrays


class ExportedSampler:
    """A loaded sampler: call it with (noise, labels, w[, rng]) to get images.

    Attributes:
      metadata: the artifact's metadata.json as a dict.
      image_shape: (H, W, C) of one image (the output).
      noise_shape: the shape of one noise input: image_shape, or the latent's (h, w, c) for a
        latent run's sampler, which decodes its samples itself.
      num_classes: labels are integers in [0, num_classes).
      condition_shape: () for class labels; (L, 384) for a text run's sampler, whose `labels`
        are text conditions float32 [B, L, 384] (see metadata.json's inputs).
      w_range: (w_min, w_max), the guidance weights the student was trained for.
      schedule, gains: the guidance schedule baked in: step k is guided with gains[k] * w, so
        every gains[k] * w must lie in w_range.
      batch_size: the fixed batch size, or None when any batch size is accepted.
      stochastic: whether the sampler takes an `rng` (the distilled stochastic sampler).
    """

    def __init__(self, exported: jax.export.Exported, weights: list[np.ndarray], metadata: dict):
        self.metadata = metadata
        self.image_shape = tuple(metadata["image_shape"])
        self.noise_shape = tuple(metadata.get("noise_shape", metadata["image_shape"]))
        self.num_classes = int(metadata["num_classes"])
        self.condition_shape = tuple(metadata.get("condition_shape") or ())
        self.w_range = (float(metadata["guidance"]["w_min"]), float(metadata["guidance"]["w_max"]))
        # Exports before guidance schedules were constant: gain 1 at every step.
        schedule = metadata.get("guidance_schedule", {"name": "constant", "gains": [1.0]})
        self.schedule = str(schedule["name"])
        self.gains = np.asarray(schedule["gains"], np.float32)
        self.batch_size = metadata["batch_size"]
        self.stochastic = bool(metadata["stochastic"])
        self._exported = exported
        self._weights = [jax.device_put(a) for a in weights]
        self._call = jax.jit(exported.call)

    def _batch(self, noise: object) -> tuple[np.ndarray, int]:
        noise = np.asarray(noise)
        expected = ("B" if self.batch_size is None else self.batch_size, *self.noise_shape)
        if noise.ndim != 4 or tuple(noise.shape[1:]) != self.noise_shape:
            raise ValueError(f"noise has shape {noise.shape}; expected {expected} (B, H, W, C).")
        if self.batch_size is not None and noise.shape[0] != self.batch_size:
            raise ValueError(
                f"noise has batch {noise.shape[0]}; this artifact was exported for a fixed batch "
                f"of {self.batch_size}: expected shape {expected}."
            )
        if noise.shape[0] < 1:
            raise ValueError(f"noise has shape {noise.shape}; expected a batch of at least 1.")
        if noise.dtype != np.float32:
            raise ValueError(
                f"noise has dtype {noise.dtype}; expected float32 (use .astype(np.float32))."
            )
        return noise, noise.shape[0]

    def _per_example(self, name: str, value: object, batch: int, kind: str) -> np.ndarray:
        array = np.asarray(value)
        if array.ndim not in (0, 1) or (array.ndim == 1 and array.shape[0] != batch):
            raise ValueError(
                f"{name} has shape {array.shape}; expected ({batch},) to match the noise batch, "
                "or a scalar."
            )
        if kind == "int" and not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{name} has dtype {array.dtype}; expected integers (int32).")
        if kind == "float" and not (
            np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
        ):
            raise ValueError(f"{name} has dtype {array.dtype}; expected float32.")
        return np.broadcast_to(array, (batch,))

    def _labels(self, labels: object, batch: int) -> np.ndarray:
        """Class labels int32 [B], or a text sampler's conditions float32 [B, L, 384]."""
        if self.condition_shape:
            array = np.asarray(labels)
            shape = self.condition_shape
            if array.shape not in (shape, (batch, *shape)) or array.dtype.kind != "f":
                raise ValueError(
                    f"this text sampler takes conditions float32 {(batch, *shape)} (or {shape} "
                    f"for all) in place of labels; got {array.dtype} {array.shape}. Encode the "
                    "prompts with all-MiniLM-L6-v2 (distill_jax.text_encoder)."
                )
            return np.broadcast_to(array.astype(np.float32), (batch, *shape))
        labels = self._per_example("labels", labels, batch, "int")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}); got values from {labels.min()} "
                f"to {labels.max()}."
            )
        return labels.astype(np.int32)

    def _rng(self, rng: object) -> np.ndarray:
        if rng is None:
            raise ValueError("This stochastic sampler needs rng: an int seed or a uint32[2] key.")
        if isinstance(rng, (int, np.integer)):
            return np.asarray(jax.random.key_data(jax.random.key(int(rng))), np.uint32)
        key = np.asarray(rng)
        if key.shape != (2,) or key.dtype != np.uint32:
            raise ValueError(
                f"rng has dtype {key.dtype} and shape {key.shape}; expected an int seed or a "
                "uint32 key of shape (2,) (jax.random.PRNGKey)."
            )
        return key

    def __call__(self, noise: object, labels: object, w: object, rng: object = None) -> np.ndarray:
        """Sample images, float32 [B, H, W, C] in [-1, 1].

        Args:
          noise: float32 [B, *noise_shape] standard normal noise, the sampler's start at t = 1.
          labels: int [B] (or a scalar) class labels in [0, num_classes); for a text sampler
            its conditions float32 [B, L, 384] (or [L, 384] for every example).
          w: [B] (or a scalar) guidance weights in [w_min, w_max].
          rng: stochastic samplers only: an int seed or a uint32[2] jax.random.PRNGKey.

        Raises:
          ValueError: an input of the wrong shape, dtype or range (the message names the
            expected one).
        """
        noise, batch = self._batch(noise)
        labels = self._labels(labels, batch)
        w = self._per_example("w", w, batch, "float").astype(np.float32)
        low, high = self.w_range
        steps = np.outer(self.gains, w)
        if not np.all(np.isfinite(w)) or steps.min() < low or steps.max() > high:
            given = f"w from {w.min()} to {w.max()}"
            if self.schedule != "constant":
                given += f" gives per-step weights {steps.min()} to {steps.max()} ({self.schedule})"
            raise ValueError(
                f"guidance weights must lie in the trained range [{low}, {high}]; {given}."
            )
        args = [noise, labels, w]
        if self.stochastic:
            args.append(self._rng(rng))
        elif rng is not None:
            raise ValueError("rng was given, but this artifact is a deterministic DDIM sampler.")
        return np.asarray(self._call(*args, *self._weights))


def load_exported(path: str | pathlib.Path, *, verify: bool = True) -> ExportedSampler:
    """Load the artifact directory at `path`, checking its files and (verify) their checksums.

    Raises:
      ArtifactError: a missing file, a checksum mismatch, bytes that do not deserialize, weights
        that do not match the metadata, or an unknown format version.
    """
    directory = pathlib.Path(path)
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is not an exported sampler directory.")
    missing = [name for name in FILES if not (directory / name).is_file()]
    if missing:
        raise ArtifactError(f"{directory} is incomplete: missing {', '.join(missing)}.")
    metadata = _read_metadata(directory)
    function_path = _member(directory, metadata, "function", FILES[1])
    weights_path = _member(directory, metadata, "weights", FILES[2])
    if verify:
        _check_checksum(function_path, metadata["function"]["sha256"])
        _check_checksum(weights_path, metadata["weights"]["sha256"])
    try:
        exported = jax.export.deserialize(bytearray(function_path.read_bytes()))
    except Exception as error:  # flatbuffer and MLIR parse errors have no common type
        raise ArtifactError(f"{function_path} does not deserialize: {error}.") from error
    platform = jax.default_backend()
    if platform not in exported.platforms:
        raise ArtifactError(
            f"{directory} was exported for {', '.join(exported.platforms)}; this process runs "
            f"on {platform}. Re-export with platforms including {platform!r}."
        )
    weights = _load_weights(weights_path, metadata["weights"]["leaves"])
    return ExportedSampler(exported, weights, metadata)


def _sample_command(args: argparse.Namespace) -> None:
    sampler = load_exported(args.artifact)
    if args.num < 1:
        raise ValueError(f"--num={args.num} is invalid: accepted an integer >= 1.")
    batch = args.num if sampler.batch_size is None else sampler.batch_size
    noise_key, rng_key = jax.random.split(jax.random.key(args.seed))
    noise = np.asarray(jax.random.normal(noise_key, (batch, *sampler.noise_shape)), np.float32)
    w = sampler.w_range[0] if args.w is None else args.w
    rng = np.asarray(jax.random.key_data(rng_key), np.uint32) if sampler.stochastic else None
    labels = args.label
    if sampler.condition_shape:
        if not args.conditions:
            raise ValueError(
                "this artifact is a text sampler: pass --conditions FILE.npy, the prompts' text "
                f"conditions float32 {sampler.condition_shape} or [N, ...] (--label is for "
                "class samplers)."
            )
        labels = np.load(args.conditions)
        if labels.ndim == 3 and len(labels) != batch:
            labels = np.resize(labels, (batch, *labels.shape[1:]))
    images = sampler(noise, labels, w, rng=rng)[: args.num]
    np.save(args.out, images)
    print(f"wrote {images.shape} images to {args.out}")


def main(argv: list[str] | None = None) -> None:
    """Command line: sample `--num` images and save them as a float32 .npy in [-1, 1].

    A bad artifact or input ends with one line on stderr and exit code 2 (--traceback shows
    the Python traceback).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("artifact", nargs="?", default=str(pathlib.Path(__file__).parent))
    parser.add_argument("--num", type=int, default=16)
    parser.add_argument("--label", type=int, default=0)
    parser.add_argument("--conditions", default=None, help="text samplers: a .npy of conditions")
    parser.add_argument("--w", type=float, default=None, help="default: w_min")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="samples.npy")
    parser.add_argument("--traceback", action="store_true", help="show tracebacks of errors")
    args = parser.parse_args(argv)
    try:
        _sample_command(args)
    except (ValueError, OSError) as error:
        if args.traceback:
            raise
        sys.stderr.write(f"run_sampler: error: {' '.join(str(error).split())}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
