"""Data: the bundled digits TFDS builder, sources by name, the grain loader, global batches.

Importing this package registers the 'distill_jax_digits' TFDS builder.
"""

from distill_jax.data.digits import DistillJaxDigits, digits_arrays, prepare_digits
from distill_jax.data.loader import (
    check_batch_size,
    make_eval_arrays,
    make_train_loader,
    to_global_batch,
)
from distill_jax.data.sources import (
    ArraySource,
    DatasetInfo,
    DatasetNotPreparedError,
    gmm_arrays,
    load_source,
    preprocess_batch,
    preprocess_example,
    read_examples,
    resize_image,
    sample_mixture,
)

__all__ = [
    "ArraySource",
    "check_batch_size",
    "DatasetInfo",
    "DatasetNotPreparedError",
    "DistillJaxDigits",
    "digits_arrays",
    "gmm_arrays",
    "load_source",
    "make_eval_arrays",
    "make_train_loader",
    "preprocess_batch",
    "preprocess_example",
    "prepare_digits",
    "read_examples",
    "resize_image",
    "sample_mixture",
    "to_global_batch",
]
