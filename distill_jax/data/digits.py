"""The bundled offline dataset: scikit-learn's handwritten digits as a TFDS builder.

`sklearn.datasets.load_digits` ships 1,797 grey-scale 8x8 images (values 0..16) of the digits
0-9 inside the scikit-learn wheel, so this builder prepares without any download. Pixels are
scaled to uint8 with round(v * 255 / 16) and stored as PNG-encoded `tfds.features.Image`
(shape (8, 8, 1)); the PNG bytes are written with PIL, so neither preparing nor reading
(`as_data_source`, file format array_record) needs TensorFlow.

Split (fixed, documented, deterministic): a stratified split that, for every class, takes the
class's examples in a permutation drawn by `numpy.random.default_rng(SPLIT_SEED)` and puts the
first round(n_class * TEST_FRACTION) of them in 'test' (300 in all) and the rest in 'train'
(1,497). Within a split, TFDS stores the records in its deterministic key-hash order.
"""

from __future__ import annotations

import inspect
import io
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from distill_jax import files

SPLIT_SEED = 0
TEST_FRACTION = 300 / 1797
NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits: images uint8 [N, 8, 8, 1] in 0..255 and labels int64 [N]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, digits.target.astype(np.int64)


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Stratified train/test indices into `labels` (see the module docstring), sorted."""
    rng = np.random.default_rng(SPLIT_SEED)
    test = []
    for k in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == k))
        test.append(members[: int(round(len(members) * TEST_FRACTION))])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return {"train": train_idx, "test": test_idx}


def png_bytes(image: np.ndarray) -> bytes:
    """Encode one uint8 [8, 8, 1] image as PNG with PIL (deterministic, no TensorFlow)."""
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0], mode="L").save(buffer, format="png")
    return buffer.getvalue()


class BundledBuilder(tfds.core.GeneratorBasedBuilder):
    """Base of the builders of data shipped with the packages (abstract: not registered)."""

    # tfds 4.9.10's default `code_path` evaluates `importlib_resources.abc.Traversable`
    # for classes inside an installed package, and `importlib_resources` is only a tfds
    # dependency before Python 3.9; the plain file path is what it computes anyway.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """The file defining this builder (where TFDS looks for checksums and metadata)."""
        return epath.Path(inspect.getfile(cls))


class DistillJaxDigits(BundledBuilder):
    """scikit-learn's 8x8 handwritten digits, registered in TFDS as 'distill_jax_digits'."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: stratified 1,497 train / 300 test split."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=(
                "UCI optical-recognition handwritten digits as bundled with scikit-learn: "
                "8x8 grey-scale images scaled from 0..16 to 0..255."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=IMAGE_SHAPE, encoding_format="png"),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # bundled data: nothing to download
        images, labels = digits_arrays()
        return {
            name: self._generate_examples(images, labels, idx)
            for name, idx in split_indices(labels).items()
        }

    def _generate_examples(
        self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray
    ) -> Iterator[tuple[int, dict]]:
        for i in indices:
            yield int(i), {"image": png_bytes(images[i]), "label": int(labels[i])}


def prepare_digits(data_dir: str = "") -> tfds.core.DatasetBuilder:
    """Prepare the digits into `data_dir` (array_record) if not yet there; return the builder.

    Idempotent: an already prepared directory is reused. `data_dir=''` means the TFDS default
    (~/tensorflow_datasets, or $TFDS_DATA_DIR). Preparing twice gives the same examples in the
    same order (fixed split, PIL PNG bytes, TFDS's key-hash record order); the record files
    may still differ byte-wise because protobuf does not fix the order of a tf.Example's
    feature map when serialising.
    """
    return prepare_bundled(DistillJaxDigits, data_dir)


def prepare_bundled(builder_class: type[BundledBuilder], data_dir: str) -> BundledBuilder:
    """The builder of a bundled dataset in `data_dir`, prepared (array_record) if it was not.

    Processes that start at once on one machine (a local multi-process job, parallel tests)
    prepare it one at a time: the others wait on a lock beside the dataset, then reuse it.
    """
    builder = builder_class(data_dir=data_dir or None)
    if builder.is_prepared():
        return builder
    with files.exclusive(epath.Path(builder.data_dir).parent.parent / f".{builder.name}.lock"):
        builder = builder_class(data_dir=data_dir or None)  # it may have been prepared meanwhile
        if not builder.is_prepared():
            builder.download_and_prepare(file_format="array_record")
    return builder
