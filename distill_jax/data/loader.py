"""The grain training loader, evaluation arrays, and host-local -> global batches.

Training loader (`make_train_loader`), all index-based and deterministic for a seed:

    MapDataset.source(source) -> shuffle(seed) -> repeat() -> map(preprocess_example)
    -> batch(global_batch // process_count, drop_remainder=True)
    -> [process_index::process_count] -> to_iter_dataset -> (mp_prefetch when worker_count > 0)

An in-memory `ArraySource` (the bundled datasets, the cached latents of a latent run) takes a
faster road to the same batches: the example indices are shuffled, repeated, batched and
sliced the same way, and each batch of indices is read and preprocessed as whole arrays
(`sources.read_examples`) instead of example by example.

Sharding by process: the shuffled, endlessly repeated stream of examples is the same on every
process. It is cut into blocks of B / P examples and process p reads the blocks p, p + P, ...
(MapDataset is lazy, so a process only reads and preprocesses its own examples). Global batch
k is thus the contiguous chunk [k * B, (k + 1) * B) of the stream, and process p holds its
contiguous sub-chunk [k * B + p * B / P, k * B + (p + 1) * B / P): in the same order as the
devices it feeds, so the global batch that `to_global_batch` assembles is exactly the batch a
single process would load, and a run on P processes sees the same examples at the same batch
positions (hence the same per-example noise) as a run on one. Each epoch is reshuffled (grain
folds the epoch into the seed). Changing data.worker_count changes nothing but speed.

Checkpointing: the returned iterator is a `grain.DatasetIterator`; its `get_state()` is a small
JSON-able dict and `set_state()` resumes the exact data order. `checkpoints.StageCheckpointer`
saves it beside the train state with grain's Orbax handler (one JSON file per process).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import grain
import jax
import ml_collections
import numpy as np
from absl import flags

from distill_jax.data.sources import ArraySource, load_source, preprocess_example, read_examples

# Batches are the pipeline's elements: a few threads and a few batches ahead keep one host busy
# without holding hundreds of large batches in memory.
READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=8)


def check_batch_size(
    batch_size: int, *, devices: int = 1, processes: int = 1, key: str = "batch_size"
) -> int:
    """The per-process batch size; fails unless `batch_size` splits evenly.

    The global batch must be a positive multiple of the device count (every device gets the
    same share) and of the process count (every process loads the same number of examples).
    `key` names the setting in the message.
    """
    if batch_size < 1 or batch_size % devices or batch_size % processes:
        raise ValueError(
            f"{key}={batch_size} does not split evenly over {devices} devices and {processes} "
            f"processes: accepted a positive multiple of the number of devices ({devices}) and "
            f"of the number of processes ({processes})."
        )
    return batch_size // processes


def make_train_loader(
    data_config: ml_collections.ConfigDict,
    *,
    batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    source: Sequence | None = None,
) -> grain.DatasetIterator:
    """An endless iterator of this process's share of each global training batch.

    Args:
      data_config: config.data; reads data_config.train_split, image_size, worker_count.
      batch_size: the GLOBAL batch size B, a multiple of process_count.
      seed: shuffle seed; the same seed gives the same batches.
      process_index: this process (default jax.process_index()).
      process_count: number of processes (default jax.process_count()).
      source: examples to read instead of data_config's train split (the cached latents of
        a latent run: {'x': float32, 'condition'} examples).

    Returns:
      A `grain.DatasetIterator` yielding {'x': float32 [B / P, ...], 'condition': [B / P, ...]}
      numpy batches, with get_state()/set_state() (see the module docstring for Orbax).

    Raises:
      ValueError: batch_size is not a positive multiple of process_count, or a data error
        from `load_source`.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    local_batch = check_batch_size(batch_size, processes=process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")
    if source is None:
        source, _ = load_source(data_config, split=data_config.train_split, seed=seed)
    image_size = int(data_config.image_size)
    if isinstance(source, ArraySource):  # shuffle indices; read each batch as whole arrays
        dataset = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()
        dataset = dataset.batch(local_batch, drop_remainder=True)
        dataset = dataset.slice(slice(process_index, None, process_count))
        dataset = dataset.map(functools.partial(read_examples, source, image_size=image_size))
    else:
        dataset = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
        dataset = dataset.map(functools.partial(preprocess_example, image_size=image_size))
        dataset = dataset.batch(local_batch, drop_remainder=True)
        dataset = dataset.slice(slice(process_index, None, process_count))
    dataset = dataset.to_iter_dataset(READ_OPTIONS)
    if data_config.worker_count > 0:
        # Grain's worker processes read absl flags; outside an absl app (tests, notebooks) they
        # are unparsed and reading them fails, so accept their defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=int(data_config.worker_count))
        )
    return iter(dataset)


def make_eval_arrays(
    data_config: ml_collections.ConfigDict,
    *,
    split: str,
    max_examples: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The first `max_examples` (all if None) of `split`, preprocessed, in source order.

    Returns:
      (x float32 [N, ...] in the model's input range, labels int32 [N]); on a text dataset
      the labels are the digits the captions name.
    """
    source, _ = load_source(data_config, split=split, seed=seed)
    num = len(source) if max_examples is None else min(int(max_examples), len(source))
    if not num:
        raise ValueError(f"Split {split!r} of {data_config.name!r} has no examples to evaluate.")
    batch = read_examples(source, np.arange(num), image_size=int(data_config.image_size))
    if isinstance(source, ArraySource) and "digit" in source.arrays:  # a text dataset
        return batch["x"], np.asarray(source.arrays["digit"][:num], np.int32)
    return batch["x"], batch["condition"].astype(np.int32)


def to_global_batch(
    local_batch: Mapping[str, np.ndarray], sharding: jax.sharding.NamedSharding
) -> dict[str, jax.Array]:
    """Assemble each process's local batch into global arrays sharded by `sharding`.

    With `sharding = NamedSharding(mesh, PartitionSpec('data'))` the leading (batch) axis of
    every leaf is split over the mesh's 'data' axis: a local [B / P, ...] leaf becomes a global
    [B, ...] jax.Array. Every process must call this with batches of the same shapes.
    """
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in local_batch.items()
    }
