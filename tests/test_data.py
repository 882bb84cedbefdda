"""Tests for distill_jax.data: digits builder, sources by name, grain loader, global batches."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from distill_jax.config import base_config
from distill_jax.data import (
    ArraySource,
    DatasetNotPreparedError,
    digits_arrays,
    load_source,
    make_eval_arrays,
    make_train_loader,
    prepare_digits,
    to_global_batch,
)
from distill_jax.data.digits import split_indices
from distill_jax.diffusion.gmm import make_gmm


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> str:
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    prepare_digits(data_dir)
    return data_dir


def _digits_config(data_dir: str, **overrides):
    config = base_config().data
    config.data_dir = data_dir
    for key, value in overrides.items():
        config[key] = value
    return config


def _gmm_config(num_examples: int = 64):
    config = base_config().data
    config.name = "gmm"
    config.gmm.num_examples = num_examples
    return config


def _read_all(source) -> tuple[np.ndarray, np.ndarray]:
    examples = [source[i] for i in range(len(source))]
    return np.stack([e["image"] for e in examples]), np.array([e["label"] for e in examples])


def _rows(x: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in x.reshape(len(x), -1)}


def test_digits_prepare_offline_and_read_without_tensorflow(digits_dir):
    builder = prepare_digits(digits_dir)
    assert builder.info.features["image"].shape == (8, 8, 1)
    assert builder.info.features["label"].num_classes == 10
    assert {s: builder.info.splits[s].num_examples for s in ("train", "test")} == {
        "train": 1497,
        "test": 300,
    }
    reference_images, reference_labels = digits_arrays()
    indices = split_indices(reference_labels)
    for split in ("train", "test"):
        images, labels = _read_all(builder.as_data_source(split))
        assert images.dtype == np.uint8 and images.shape[1:] == (8, 8, 1)
        assert images.min() == 0 and images.max() == 255
        assert set(np.unique(labels)) == set(range(10))
        # The stored split holds exactly the documented examples (order is TFDS's key hash).
        expected = reference_images[indices[split]]
        assert sorted(_rows(images)) == sorted(_rows(expected))
        assert np.array_equal(np.bincount(labels), np.bincount(reference_labels[indices[split]]))
    # tfds imports TensorFlow lazily, only when a tf.data path is used: the array_record
    # write and read above never touched it.
    assert "tensorflow" not in sys.modules


def test_digits_prepare_is_idempotent_and_deterministic(digits_dir, tmp_path):
    first = prepare_digits(digits_dir)
    record = next(first.data_path.glob("*test.array_record*"))
    mtime = os.stat(record).st_mtime_ns
    assert prepare_digits(digits_dir).data_path == first.data_path
    assert os.stat(record).st_mtime_ns == mtime  # already prepared: not rewritten
    second = prepare_digits(str(tmp_path))
    for split in ("train", "test"):
        images_a, labels_a = _read_all(first.as_data_source(split))
        images_b, labels_b = _read_all(second.as_data_source(split))
        assert np.array_equal(images_a, images_b) and np.array_equal(labels_a, labels_b)


def test_load_source_digits_info_and_resize(digits_dir):
    source, info = load_source(_digits_config(digits_dir), split="train", seed=0)
    assert (info.name, info.shape, info.num_classes) == ("digits", (8, 8, 1), 10)
    assert (info.num_train, info.num_eval, len(source)) == (1497, 300, 1497)
    config = _digits_config(digits_dir, image_size=16)
    _, info = load_source(config, split="test", seed=0)
    assert info.shape == (16, 16, 1)
    x, labels = make_eval_arrays(config, split="test", max_examples=20)
    assert x.shape == (20, 16, 16, 1) and x.dtype == np.float32 and labels.dtype == np.int32
    assert -1.0 <= x.min() and x.max() <= 1.0


def test_make_eval_arrays_digits(digits_dir):
    config = _digits_config(digits_dir)
    x, labels = make_eval_arrays(config, split="test")
    assert x.shape == (300, 8, 8, 1) and labels.shape == (300,)
    assert x.min() == -1.0 and x.max() == 1.0
    images, source_labels = _read_all(load_source(config, split="test")[0])
    np.testing.assert_allclose(x, images / 127.5 - 1.0, atol=1e-6)
    assert np.array_equal(labels, source_labels)
    assert make_eval_arrays(config, split="test", max_examples=7)[0].shape == (7, 8, 8, 1)


@pytest.mark.parametrize(("name", "shape"), [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_by_name_under_mock_data(name, shape, tmp_path):
    config = base_config().data
    config.name = name
    config.data_dir = str(tmp_path)
    # USE_CODE: features come from the builder class; as_data_source is mocked with random
    # examples of those features (no files, no TensorFlow).
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        source, info = load_source(config, split="train", seed=0)
        assert (info.shape, info.num_classes, info.num_train, len(source)) == (shape, 10, 12, 12)
        batch = next(make_train_loader(config, batch_size=4, seed=0))
        assert batch["x"].shape == (4, *shape) and batch["x"].dtype == np.float32
        assert np.all((batch["condition"] >= 0) & (batch["condition"] < 10))
        config.image_size = 16
        _, info = load_source(config, split="train", seed=0)
        assert info.shape == (16, 16, shape[-1])
        assert next(make_train_loader(config, batch_size=4, seed=0))["x"].shape[1:] == (
            16,
            16,
            shape[-1],
        )


def test_tfds_not_prepared_is_a_clear_error(tmp_path):
    config = base_config().data
    config.name = "mnist"
    config.data_dir = str(tmp_path)
    with pytest.raises(DatasetNotPreparedError, match="must|prepare it first") as error:
        load_source(config, split="train", seed=0)
    message = str(error.value)
    assert "never downloads" in message and "file_format='array_record'" in message
    if importlib.util.find_spec("tensorflow") is None:
        assert "pip install -e .[tfds-prepare]" in message


def test_unknown_dataset_and_wrong_features_are_clear_errors(tmp_path):
    config = base_config().data
    config.data_dir = str(tmp_path)
    config.name = "no_such_dataset_xyz"
    with pytest.raises(ValueError, match="any TFDS image classification dataset name") as error:
        load_source(config, split="train", seed=0)
    assert "'digits'" in str(error.value) and "'gmm'" in str(error.value)
    config.name = "imdb_reviews"  # registered in TFDS, but text: no 'image' feature
    with pytest.raises(ValueError, match="'image'"):
        load_source(config, split="train", seed=0)


def test_batch_size_must_divide_by_process_count():
    with pytest.raises(ValueError, match=r"batch_size=10 .* of the number of processes \(4\)"):
        make_train_loader(_gmm_config(), batch_size=10, seed=0, process_index=0, process_count=4)


def test_loader_deterministic_ranges_and_seed(digits_dir):
    config = _digits_config(digits_dir)
    first = make_train_loader(config, batch_size=32, seed=1)
    again = make_train_loader(config, batch_size=32, seed=1)
    other = make_train_loader(config, batch_size=32, seed=2)
    batches = [next(first) for _ in range(3)]
    for batch in batches:
        assert batch["x"].shape == (32, 8, 8, 1) and batch["x"].dtype == np.float32
        assert batch["condition"].shape == (32,) and batch["condition"].dtype == np.int32
        assert -1.0 <= batch["x"].min() and batch["x"].max() <= 1.0
        assert np.all((batch["condition"] >= 0) & (batch["condition"] < 10))
        repeat = next(again)
        assert np.array_equal(batch["x"], repeat["x"])
        assert np.array_equal(batch["condition"], repeat["condition"])
    assert not np.array_equal(batches[0]["x"], next(other)["x"])


def test_loader_repeats_and_reshuffles_each_epoch():
    config = _gmm_config(num_examples=16)
    loader = make_train_loader(config, batch_size=16, seed=0)
    epoch_0, epoch_1 = next(loader)["x"], next(loader)["x"]
    source, _ = load_source(config, split=config.train_split, seed=0)
    every_example = _rows(np.stack([source[i]["x"] for i in range(16)]))
    assert _rows(epoch_0) == every_example == _rows(epoch_1)
    assert not np.array_equal(epoch_0, epoch_1)


def test_process_sharding_gives_disjoint_slices_of_each_global_batch():
    config = _gmm_config(num_examples=64)
    single = make_train_loader(config, batch_size=8, seed=0, process_index=0, process_count=1)
    shard_0 = make_train_loader(config, batch_size=8, seed=0, process_index=0, process_count=2)
    shard_1 = make_train_loader(config, batch_size=8, seed=0, process_index=1, process_count=2)
    seen_0, seen_1 = set(), set()
    for _ in range(4):  # half an epoch: no example repeats yet
        local_0, local_1, full = next(shard_0)["x"], next(shard_1)["x"], next(single)["x"]
        assert local_0.shape == local_1.shape == (4, 2)
        assert _rows(local_0).isdisjoint(_rows(local_1))
        assert _rows(local_0) | _rows(local_1) == _rows(full)  # same global batch
        seen_0 |= _rows(local_0)
        seen_1 |= _rows(local_1)
    assert seen_0.isdisjoint(seen_1)


def test_resume_from_state_continues_identically(digits_dir, tmp_path):
    config = _digits_config(digits_dir)
    loader = make_train_loader(config, batch_size=16, seed=5)
    for _ in range(3):
        next(loader)
    state = loader.get_state()
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(loader)))
        manager.wait_until_finished()
    expected = [next(loader) for _ in range(4)]

    from_state = make_train_loader(config, batch_size=16, seed=5)
    from_state.set_state(state)
    from_orbax = make_train_loader(config, batch_size=16, seed=5)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(
            3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(from_orbax))
        )
    fresh = make_train_loader(config, batch_size=16, seed=5)
    assert not np.array_equal(next(fresh)["x"], expected[0]["x"])
    for batch in expected:
        for resumed in (next(from_state), next(from_orbax)):
            assert np.array_equal(batch["x"], resumed["x"])
            assert np.array_equal(batch["condition"], resumed["condition"])


def test_to_global_batch_shape_and_sharding():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    local = {
        "x": np.arange(8 * 4 * 4 * 1, dtype=np.float32).reshape(8, 4, 4, 1),
        "label": np.arange(8, dtype=np.int32),
    }
    batch = to_global_batch(local, sharding)
    assert set(batch) == {"x", "label"}
    for key, value in batch.items():
        assert isinstance(value, jax.Array)
        assert value.shape == (8 * jax.process_count(), *local[key].shape[1:])
        assert value.sharding == sharding
        assert value.dtype == local[key].dtype
        np.testing.assert_array_equal(np.asarray(value), local[key])


def test_gmm_source_shapes_determinism_and_means():
    config = _gmm_config(num_examples=4000)
    source, info = load_source(config, split="train", seed=0)
    g = config.gmm
    assert (info.name, info.shape, info.num_classes) == ("gmm", (g.dim,), g.num_classes)
    assert (info.num_train, info.num_eval, len(source)) == (4000, 4000, 4000)
    example = source[0]
    assert example["x"].shape == (g.dim,) and example["x"].dtype == np.float32
    assert example["label"].dtype == np.int32

    x, labels = make_eval_arrays(config, split=config.train_split)
    x_again, labels_again = make_eval_arrays(config, split=config.train_split)
    assert np.array_equal(x, x_again) and np.array_equal(labels, labels_again)
    x_other, _ = make_eval_arrays(config, split=config.train_split, seed=1)
    assert not np.array_equal(x, x_other)
    eval_0, _ = make_eval_arrays(config, split=config.eval_split, seed=0)
    eval_1, _ = make_eval_arrays(config, split=config.eval_split, seed=1)
    assert np.array_equal(eval_0, eval_1)  # the eval set does not depend on the run seed
    assert _rows(eval_0).isdisjoint(_rows(x))

    means = np.asarray(
        make_gmm(
            num_classes=g.num_classes, dim=g.dim, radius=g.radius, std=g.std, seed=g.seed
        ).means
    )
    counts = np.bincount(labels, minlength=g.num_classes)
    assert np.all(np.abs(counts / len(labels) - 1 / g.num_classes) < 0.05)
    for k in range(g.num_classes):
        members = x[labels == k]
        np.testing.assert_allclose(
            members.mean(0), means[k], atol=5 * g.std / np.sqrt(len(members))
        )
        np.testing.assert_allclose(members.std(0), g.std, rtol=0.15)
    with pytest.raises(ValueError, match="splits"):
        load_source(config, split="validation", seed=0)


@pytest.mark.parametrize("image_size", [0, 12])
def test_in_memory_source_gives_the_batches_of_the_example_by_example_road(digits_dir, image_size):
    config = _digits_config(digits_dir, image_size=image_size)
    source, _ = load_source(config, split="train")
    assert isinstance(source, ArraySource)  # the bundled digits are read into memory once
    one_by_one = [source[i] for i in range(len(source))]  # a plain sequence: no take()
    fast = make_train_loader(config, batch_size=16, seed=2, source=source)
    slow = make_train_loader(config, batch_size=16, seed=2, source=one_by_one)
    for _ in range(3):
        batch, expected = next(fast), next(slow)
        assert batch["x"].shape == (16, image_size or 8, image_size or 8, 1)
        for key in ("x", "condition"):
            assert batch[key].dtype == expected[key].dtype
            np.testing.assert_array_equal(batch[key], expected[key])


def test_processes_preparing_the_digits_at_once_take_turns(tmp_path):
    data_dir = tmp_path / "tfds"
    code = (
        "import sys; from distill_jax.data import prepare_digits; "
        "print(len(prepare_digits(sys.argv[1]).as_data_source('train')))"
    )
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(data_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = [job.communicate(timeout=300) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0, 0], [err[-2000:] for _, err in results]
    assert [out.split()[-1] for out, _ in results] == ["1497"] * 3  # after TFDS's own lines
    assert (data_dir / ".distill_jax_digits.lock").exists()  # they took turns on this lock
