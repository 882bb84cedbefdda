"""Random-access data sources by name, their metadata, and preprocessing.

`load_source(data_config, split=..., seed=...)` returns a sequence (`len`, `[i]`) of example
dicts plus a `DatasetInfo`:

- 'digits': the bundled scikit-learn digits (`distill_jax.data.digits`), prepared offline into
  `data_dir` on first use; examples {'image': uint8 [8, 8, 1], 'label': int}.
- 'digits_text': the digits with captions and their text conditions
  (`distill_jax.data.captions`); examples {'image', 'digit', 'caption', 'condition' float16
  [16, 384]}.
- 'gmm': a Gaussian mixture from `distill_jax.diffusion.gmm`; examples
  {'x': float32 [D], 'label': int32}.
- 'image_captions': image-caption pairs from files on disk in data_dir
  (`distill_jax.data.image_captions`: webdataset shards, metadata.jsonl or caption files);
  examples {'image': uint8 [S, S, 3], 'label': 0, 'caption': str}, decoded when read.
- any other name: a TFDS image classification dataset already prepared in array_record format
  under `data_dir`, read with `builder.as_data_source`; nothing is downloaded at run time.

The first three are `ArraySource`s held in memory (the bundled ones decoded once per process),
which `read_examples` reads a batch at a time.

`preprocess_batch` (and `preprocess_example` for one) turns examples into the model's input
{'x': float32, 'label': int32} (on a text dataset 'label' is the condition, float32 [L, 384]):
images go to [-1, 1] (x / 127.5 - 1), optionally resized to a square `image_size`; gray-scale
images keep one channel. `DatasetInfo.shape` is the shape after this preprocessing.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from distill_jax.data import captions, image_captions
from distill_jax.data.digits import prepare_digits
from distill_jax.diffusion.gmm import GaussianMixture, make_gmm


class DatasetNotPreparedError(FileNotFoundError):
    """A TFDS dataset is requested that is not prepared (array_record) in the data_dir."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model and a training run need to know about a dataset.

    Attributes:
      name: the config's dataset name ('digits', 'gmm' or a TFDS name).
      shape: shape of one preprocessed example, (H, W, C) for images or (D,) for vectors.
      num_classes: number of classes; labels are in [0, num_classes).
      num_train: examples in the train split, or None where TFDS does not know it.
      num_eval: examples in the eval split, or None where TFDS does not know it.
    """

    name: str
    shape: tuple[int, ...]
    num_classes: int
    num_train: int | None
    num_eval: int | None


class ArraySource(Sequence):
    """Random-access source over in-memory arrays: element i is {key: array[i]}.

    `take(indices)` reads many examples at once as arrays with a leading axis; the training
    loader and the evaluation read an ArraySource that way, preprocessing whole batches.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        lengths = {len(a) for a in arrays.values()}
        if len(lengths) != 1:
            raise ValueError(f"Arrays differ in length: { {k: len(a) for k, a in arrays.items()} }")
        self.arrays = dict(arrays)
        self._length = lengths.pop()

    def __len__(self) -> int:
        return self._length

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The examples at `indices` (int [n]): {key: array [n, ...]}."""
        return {key: np.asarray(value[indices]) for key, value in self.arrays.items()}

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:  # type: ignore[override]
        return {key: value[0] for key, value in self.take(np.asarray([index])).items()}


_BUNDLED = {"digits": prepare_digits, "digits_text": captions.prepare_digits_text}


@functools.lru_cache(maxsize=4)
def _bundled_source(name: str, data_dir: str, split: str) -> Sequence:
    """A bundled dataset's split, decoded once per process and kept in memory as an ArraySource.

    The bundled datasets are small (the captioned digits, the largest, hold 37 MB of float16
    conditions), and decoding a TFDS record costs about 0.3 ms: reading them record by record
    made data loading, not the train step, about a quarter of a text teacher step's time.
    """
    source = _BUNDLED[name](data_dir).as_data_source(split)
    examples = [source[i] for i in range(len(source))]
    if not examples:
        return source
    return ArraySource(
        {key: np.stack([np.asarray(e[key]) for e in examples]) for key in examples[0]}
    )


def gmm_from_config(gmm_config: ml_collections.ConfigDict) -> GaussianMixture:
    """The mixture described by `config.data.gmm`."""
    return make_gmm(
        num_classes=gmm_config.num_classes,
        dim=gmm_config.dim,
        radius=gmm_config.radius,
        std=gmm_config.std,
        seed=gmm_config.seed,
    )


def sample_mixture(gmm: GaussianMixture, *, num: int, seed: Any) -> tuple[np.ndarray, np.ndarray]:
    """Draw `num` samples of a mixture with numpy: x float32 [num, D], labels int32 [num].

    `seed` is anything `numpy.random.default_rng` accepts, so the same seed gives the same
    samples. This is the only Gaussian-mixture sampler: the toy dataset and the tests use it.
    """
    means, stds = np.asarray(gmm.means), np.asarray(gmm.stds)
    weights = np.asarray(gmm.weights, np.float64)
    rng = np.random.default_rng(seed)
    labels = rng.choice(gmm.num_classes, size=num, p=weights / weights.sum()).astype(np.int32)
    noise = rng.standard_normal((num, gmm.dim))
    x = (means[labels] + stds[labels] * noise).astype(np.float32)
    return x, labels


def gmm_arrays(
    gmm_config: ml_collections.ConfigDict, *, num: int, seed: Any
) -> tuple[np.ndarray, np.ndarray]:
    """`sample_mixture` of the mixture `make_gmm` builds from `gmm_config`."""
    return sample_mixture(gmm_from_config(gmm_config), num=num, seed=seed)


def _gmm_source(
    data_config: ml_collections.ConfigDict, split: str, seed: int
) -> tuple[ArraySource, DatasetInfo]:
    """The train split is drawn from (gmm.seed, seed); the eval split is fixed by gmm.seed."""
    g = data_config.gmm
    if split == data_config.train_split:
        rng_seed = (g.seed, seed, 0)
    elif split == data_config.eval_split:
        rng_seed = (g.seed, 1)  # independent of the run seed: every run evaluates alike
    else:
        raise ValueError(
            f"config.data.name='gmm' has the splits {data_config.train_split!r} (train) and "
            f"{data_config.eval_split!r} (eval), not {split!r}."
        )
    x, labels = gmm_arrays(g, num=g.num_examples, seed=rng_seed)
    info = DatasetInfo(
        name="gmm",
        shape=(g.dim,),
        num_classes=g.num_classes,
        num_train=g.num_examples,
        num_eval=g.num_examples,
    )
    return ArraySource({"x": x, "label": labels}), info


def _split_size(builder: tfds.core.DatasetBuilder, split: str) -> int | None:
    """Examples in `split` according to builder.info, or None when TFDS does not know."""
    try:
        return int(builder.info.splits[split].num_examples)
    except (KeyError, ValueError, TypeError):
        return None


def _image_info(
    builder: tfds.core.DatasetBuilder, data_config: ml_collections.ConfigDict, name: str
) -> DatasetInfo:
    """Shape and classes from builder.info; fails clearly without 'image'/'label' features."""
    features = builder.info.features
    image = features["image"] if "image" in features else None
    label = features["label"] if "label" in features else None
    if not isinstance(image, tfds.features.Image) or not isinstance(
        label, tfds.features.ClassLabel
    ):
        raise ValueError(
            f"Dataset {name!r} must have an 'image' (tfds.features.Image) and a 'label' "
            f"(tfds.features.ClassLabel) feature; its features are {features}."
        )
    if np.dtype(image.np_dtype) != np.uint8:
        raise ValueError(f"Dataset {name!r} has {image.np_dtype} images; only uint8 is supported.")
    height, width, channels = image.shape
    if data_config.image_size:
        height = width = int(data_config.image_size)
    elif height is None or width is None:
        raise ValueError(
            f"Dataset {name!r} has images of varying size {image.shape}; set "
            "config.data.image_size to resize them to a square."
        )
    return DatasetInfo(
        name=name,
        shape=(height, width, channels),
        num_classes=label.num_classes,
        num_train=_split_size(builder, data_config.train_split),
        num_eval=_split_size(builder, data_config.eval_split),
    )


def _not_prepared_message(name: str, data_dir: str) -> str:
    where = data_dir or "the default TFDS data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    message = (
        f"TFDS dataset {name!r} is not prepared in array_record format in {where}. "
        "distill_jax never downloads data at run time: prepare it first, e.g.\n"
        f'  python -c "import tensorflow_datasets as tfds; tfds.builder({name!r}, '
        f"data_dir={data_dir or None!r}).download_and_prepare(file_format='array_record')\""
    )
    if importlib.util.find_spec("tensorflow") is None:
        message += (
            "\nPreparing TFDS datasets from their original archives needs TensorFlow, which "
            "is not installed: pip install -e .[tfds-prepare]"
        )
    return message


def _tfds_builder(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The TFDS builder of config.data.name (prepared or not); an unknown name fails clearly."""
    name = data_config.name
    try:
        return tfds.builder(name, data_dir=data_config.data_dir or None)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(
            f"Unknown dataset config.data.name={name!r}: accepted 'digits' (bundled), 'gmm' "
            "(toy Gaussian mixture), or any TFDS image classification dataset name "
            "(e.g. 'mnist', 'cifar10')."
        ) from error


def _tfds_source(
    data_config: ml_collections.ConfigDict, split: str
) -> tuple[Sequence, DatasetInfo]:
    """An already prepared TFDS dataset read by `as_data_source` (array_record)."""
    name, data_dir = data_config.name, data_config.data_dir
    builder = _tfds_builder(data_config)
    info = _image_info(builder, data_config, name)
    try:
        source = builder.as_data_source(split)
    except (ValueError, NotImplementedError, FileNotFoundError, AssertionError) as error:
        if not builder.is_prepared():
            raise DatasetNotPreparedError(_not_prepared_message(name, data_dir)) from error
        raise ValueError(
            f"TFDS dataset {name!r} is prepared in {builder.data_dir} but cannot be read "
            f"randomly for split {split!r} ({error}). distill_jax needs the array_record "
            "format: prepare it again with download_and_prepare(file_format='array_record') "
            "into another data_dir."
        ) from error
    # Mocked or freshly listed datasets may lack split sizes in builder.info; the source knows.
    if split == data_config.train_split and info.num_train is None:
        info = dataclasses.replace(info, num_train=len(source))
    if split == data_config.eval_split and info.num_eval is None:
        info = dataclasses.replace(info, num_eval=len(source))
    return source, info


def _digits_text_source(
    data_config: ml_collections.ConfigDict, split: str
) -> tuple[Sequence, DatasetInfo]:
    """The captioned digits; their conditions were encoded at preparation (16 tokens)."""
    builder = captions.prepare_digits_text(data_config.data_dir)
    size = int(data_config.image_size)
    height, width, channels = captions.IMAGE_SHAPE
    info = DatasetInfo(
        name="digits_text",
        shape=(size, size, channels) if size else (height, width, channels),
        num_classes=captions.NUM_CLASSES,
        num_train=_split_size(builder, data_config.train_split),
        num_eval=_split_size(builder, data_config.eval_split),
    )
    return _bundled_source("digits_text", data_config.data_dir, split), info


def _image_captions_source(
    data_config: ml_collections.ConfigDict, split: str
) -> tuple[Sequence, DatasetInfo]:
    """Image-caption pairs from files on disk (`image_captions`), at data.image_size."""
    data_dir, size = str(data_config.data_dir), int(data_config.image_size)
    if not data_dir or size <= 0:
        raise ValueError(
            f"data.name='image_captions' needs data.data_dir (given {data_dir!r}) and "
            f"data.image_size (given {size}): accepted a folder of image-caption pairs "
            f"({image_captions.LAYOUTS}) and a positive size its images are cropped to."
        )
    data_dir = os.path.abspath(data_dir)

    def index(name: str):
        folder = image_captions.split_folder(data_dir, name, data_config.train_split)
        return image_captions.index_folder(folder)

    eval_dir = os.path.join(data_dir, data_config.eval_split)
    info = DatasetInfo(
        name="image_captions",
        shape=(size, size, 3),
        num_classes=0,
        num_train=len(index(data_config.train_split)),
        num_eval=len(index(data_config.eval_split)) if os.path.isdir(eval_dir) else None,
    )
    return image_captions.CaptionedImages(index(split), size), info


def captions_of(source: Sequence) -> np.ndarray:
    """The captions of a captioned source (str [N]), without decoding its images."""
    if isinstance(source, image_captions.CaptionedImages):
        return np.asarray(source.captions, dtype=str)
    return np.asarray(source.arrays["caption"]).astype(str)


class IndexedRows(Sequence):
    """rows[index[i]] for i in range(len(index)), read only when asked (rows may be a memmap).

    Many examples share a caption: `rows` holds each distinct caption's condition once and
    `index` says which one example i has. Indexing by an int or an int array reads just those
    rows, so ArraySource.take and the loader read a batch's conditions from disk.
    """

    def __init__(self, rows: np.ndarray, index: np.ndarray):
        self.rows, self.index = rows, np.asarray(index)
        self.shape = (len(self.index), *rows.shape[1:])
        self.dtype = rows.dtype

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        return self.rows[self.index[i]]


class _WithConditions(Sequence):
    """A source whose examples gain a 'condition' row (the text conditions of its captions)."""

    def __init__(self, source: Sequence, conditions: np.ndarray):
        self.source, self.conditions = source, conditions

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:  # type: ignore[override]
        return dict(self.source[index], condition=self.conditions[index])


def with_conditions(source: Sequence, conditions: np.ndarray) -> Sequence:
    """`source` with `conditions` [N, ...] as each example's 'condition' (replacing any)."""
    if isinstance(source, ArraySource):
        return ArraySource(dict(source.arrays, condition=conditions))
    return _WithConditions(source, conditions)


def load_source(
    data_config: ml_collections.ConfigDict, *, split: str, seed: int = 0
) -> tuple[Sequence, DatasetInfo]:
    """A random-access source of example dicts for `split`, and the dataset's `DatasetInfo`.

    Args:
      data_config: config.data (name, data_dir, train_split, eval_split, image_size, gmm).
      split: a split name, e.g. data_config.train_split; TFDS slicing ('train[:10%]') works
        for TFDS datasets.
      seed: the run seed; only the 'gmm' train split depends on it.

    Returns:
      (source, info): source[i] is {'image': uint8 [H, W, C], 'label': int} for image
      datasets or {'x': float32 [D], 'label': int32} for 'gmm'; pass it through
      `preprocess_example` to get model inputs.

    Raises:
      ValueError: unknown name, a dataset without 'image'/'label', or an unreadable format.
      DatasetNotPreparedError: a TFDS dataset that has not been prepared in data_dir.
    """
    if data_config.name == "gmm":
        return _gmm_source(data_config, split, seed)
    if data_config.name == "digits":
        builder = prepare_digits(data_config.data_dir)
        source = _bundled_source("digits", data_config.data_dir, split)
        return source, _image_info(builder, data_config, "digits")
    if data_config.name == "digits_text":
        return _digits_text_source(data_config, split)
    if data_config.name == "image_captions":
        return _image_captions_source(data_config, split)
    return _tfds_source(data_config, split)


def dataset_info(data_config: ml_collections.ConfigDict, *, seed: int = 0) -> DatasetInfo:
    """The dataset's `DatasetInfo` without its examples: a TFDS dataset need not be prepared.

    For a TFDS name the shape and classes come from the builder's metadata (its split sizes may
    be None); the bundled datasets and 'gmm' are described as `load_source` describes them.
    """
    if data_config.name in ("gmm", "digits", "digits_text", "image_captions"):
        return load_source(data_config, split=data_config.train_split, seed=seed)[1]
    return _image_info(_tfds_builder(data_config), data_config, data_config.name)


def preprocess_batch(examples: Mapping[str, Any], *, image_size: int = 0) -> dict[str, np.ndarray]:
    """Examples with a leading axis [n, ...] to model inputs {'x': float32, 'condition'}.

    Images (uint8 [n, H, W, C]) are resized to [n, image_size, image_size, C] when
    image_size > 0 (bicubic, on the uint8 images, via PIL) and mapped to [-1, 1] by
    x / 127.5 - 1; vector examples ('x') pass through as float32. 'condition' is what the network
    is conditioned on: the int32 class ('label'), or on a text dataset the condition as
    float32 [n, L, 384].
    """
    # A text dataset's examples (and the cached latents') hold a 'condition', class-labelled
    # data a 'label'. Float conditions become float32, class labels int32.
    condition = np.asarray(examples["condition"] if "condition" in examples else examples["label"])
    condition = condition.astype(
        np.float32 if np.issubdtype(condition.dtype, np.floating) else np.int32
    )
    if "x" in examples:
        return {"x": np.asarray(examples["x"], np.float32), "condition": condition}
    images = np.asarray(examples["image"])
    if image_size and images.shape[1:3] != (image_size, image_size):
        images = np.stack([resize_image(image, image_size) for image in images])
    return {"x": images.astype(np.float32) / 127.5 - 1.0, "condition": condition}


def preprocess_example(example: Mapping[str, Any], *, image_size: int = 0) -> dict[str, np.ndarray]:
    """One example to model inputs: `preprocess_batch` of a batch of one."""
    batch = {key: np.asarray(value)[None] for key, value in example.items()}
    return {key: value[0] for key, value in preprocess_batch(batch, image_size=image_size).items()}


def read_examples(
    source: Sequence, indices: np.ndarray, *, image_size: int = 0
) -> dict[str, np.ndarray]:
    """The examples at `indices`, preprocessed: {'x': [n, ...], 'condition': [n, ...]}.

    An ArraySource is read and preprocessed as whole arrays; other sources example by example
    (their images may differ in size before resizing).
    """
    if isinstance(source, ArraySource):
        return preprocess_batch(source.take(np.asarray(indices)), image_size=image_size)
    examples = [preprocess_example(source[int(i)], image_size=image_size) for i in indices]
    return {key: np.stack([e[key] for e in examples]) for key in ("x", "condition")}


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 [H, W, C] image (C in 1, 3, 4) to [size, size, C] with bicubic PIL."""
    channels = image.shape[-1]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    resized = np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC), np.uint8)
    return resized.reshape(size, size, channels)
