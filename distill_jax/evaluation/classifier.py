"""The feature classifier behind FD, IS and conditional accuracy, trained once and cached.

Images: a small CNN (two 3x3 conv blocks per resolution, average-pooled down to 4x4 or less,
then a dense layer). Vector data ('gmm'): an MLP of the same head. In both, the penultimate
layer - `features` ReLU units - gives the Frechet-distance features and the last layer the
softmax used by the Inception-Score analogue and the conditional accuracy.

Training is deterministic: fixed PRNG seed, numpy-shuffled minibatches, AdamW, random
one-pixel shifts on images (a little augmentation, as the bundled digits have 1,497 training
images). A trained classifier is cached under
`<cache>/classifiers/<dataset>-<hash of dataset and classifier settings>/` (params/, an Orbax
checkpoint, and info.json, written to a staging folder and renamed), where <cache> is
`config.eval.classifier.cache_dir`, else $DISTILL_JAX_CACHE, else ~/.cache/distill_jax.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from distill_jax import files
from distill_jax.data import loader
from distill_jax.evaluation import metrics

CACHE_VERSION = 2  # bump when the network, its training or the cache format changes
Params = Any


class ClassifierNet(nn.Module):
    """CNN (images [B, H, W, C]) or MLP (vectors [B, D]) returning (logits, features)."""

    num_classes: int
    features: int = 64
    input_size: int = 0  # images are resized to this square first (0: kept as they are)

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Logits [B, num_classes] and penultimate ReLU features [B, features]."""
        h = x
        if x.ndim == 4 and self.input_size and x.shape[1:3] != (self.input_size,) * 2:
            size = (x.shape[0], self.input_size, self.input_size, x.shape[3])
            h = jax.image.resize(x, size, "linear", antialias=True)
        if x.ndim == 4:
            channels = 32
            while True:
                h = nn.relu(nn.Conv(channels, (3, 3))(h))
                h = nn.relu(nn.Conv(channels, (3, 3))(h))
                if max(h.shape[1], h.shape[2]) <= 4:
                    break
                h = nn.avg_pool(h, (2, 2), strides=(2, 2))
                channels = min(2 * channels, 256)
            h = h.reshape(h.shape[0], -1)
        else:
            for _ in range(2):
                h = nn.relu(nn.Dense(128)(h))
        feats = nn.relu(nn.Dense(self.features)(h))
        return nn.Dense(self.num_classes)(feats), feats


@dataclasses.dataclass
class TrainedClassifier:
    """A trained feature classifier with its test accuracy.

    Attributes:
      net: the `ClassifierNet`.
      params: its parameters.
      test_accuracy: accuracy on the dataset's eval split.
      directory: the cache folder it was loaded from or saved to.
      info: the info.json record (settings, accuracy, training seconds).
    """

    net: ClassifierNet
    params: Params
    test_accuracy: float
    directory: epath.Path
    info: dict

    @property
    def identity(self) -> str:
        """A short id of this classifier (its cache folder name), for result bookkeeping."""
        return self.directory.name

    def features_and_probs(
        self, x: np.ndarray, batch_size: int = 500
    ) -> tuple[np.ndarray, np.ndarray]:
        """Penultimate features [N, F] and softmax probabilities [N, K] of x in [-1, 1]."""
        feats, probs = [], []
        for start in range(0, len(x), batch_size):
            chunk = np.asarray(x[start : start + batch_size], np.float32)
            f, p = _apply(self.net, self.params, chunk)
            feats.append(np.asarray(f, np.float64))
            probs.append(np.asarray(p, np.float64))
        return np.concatenate(feats), np.concatenate(probs)


@functools.partial(jax.jit, static_argnums=0)
def _apply(net: ClassifierNet, params: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits, feats = net.apply({"params": params}, x)
    return feats, jax.nn.softmax(logits)


def cache_root(classifier_config: ml_collections.ConfigDict) -> epath.Path:
    """The cache folder: the config's cache_dir, else $DISTILL_JAX_CACHE, else ~/.cache."""
    root = classifier_config.cache_dir or os.environ.get("DISTILL_JAX_CACHE", "")
    return epath.Path(root or os.path.join("~", ".cache", "distill_jax")).expanduser()


def _settings(config: ml_collections.ConfigDict) -> dict:
    """What determines the trained classifier: the data and the classifier settings."""
    data = config.data
    dataset = dict(
        name=data.name,
        image_size=int(data.image_size),
        train_split=data.train_split,
        eval_split=data.eval_split,
    )
    if data.name == "gmm":
        dataset["gmm"] = data.gmm.to_dict()
    training = {k: v for k, v in config.eval.classifier.to_dict().items() if k != "cache_dir"}
    return dict(version=CACHE_VERSION, dataset=dataset, training=training)


def cache_directory(config: ml_collections.ConfigDict) -> epath.Path:
    """Where the classifier of this config's dataset and settings is (or will be) cached."""
    settings = _settings(config)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in config.data.name)
    return cache_root(config.eval.classifier) / "classifiers" / f"{name}-{digest}"


def _shift_images(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shift each image by up to one pixel in each direction (edge padding)."""
    if x.ndim != 4:
        return x
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    dy, dx = rng.integers(0, 3, size=(2, len(x)))
    h, w = x.shape[1:3]
    return np.stack(
        [padded[i, a : a + h, b : b + w] for i, (a, b) in enumerate(zip(dy, dx, strict=True))]
    )


def accuracy(classifier: TrainedClassifier, x: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of `x` classified as `labels`."""
    return metrics.conditional_accuracy(classifier.features_and_probs(x)[1], labels)


def train_classifier(config: ml_collections.ConfigDict) -> tuple[ClassifierNet, Params, dict]:
    """Train the classifier of `config` (data and eval.classifier) from scratch.

    Returns:
      (net, params, info) with info = settings, test_accuracy, num_classes, train_seconds.
    """
    settings = config.eval.classifier
    start = time.perf_counter()
    x, labels = loader.make_eval_arrays(config.data, split=config.data.train_split)
    x_test, labels_test = loader.make_eval_arrays(config.data, split=config.data.eval_split)
    num_classes = int(max(labels.max(), labels_test.max())) + 1
    net = ClassifierNet(
        num_classes=num_classes,
        features=int(settings.features),
        input_size=int(settings.image_size),
    )
    params = net.init(jax.random.PRNGKey(int(settings.seed)), x[:1])["params"]
    schedule = optax.cosine_decay_schedule(float(settings.learning_rate), int(settings.num_steps))
    optimizer = optax.adamw(schedule, weight_decay=float(settings.weight_decay))
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, xb, yb):
        def loss_fn(p):
            logits, _ = net.apply({"params": p}, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(int(settings.seed))
    batch = min(int(settings.batch_size), len(x))
    order, cursor = rng.permutation(len(x)), 0
    for _ in range(int(settings.num_steps)):
        if cursor + batch > len(order):
            order, cursor = rng.permutation(len(x)), 0
        idx = order[cursor : cursor + batch]
        cursor += batch
        params, opt_state, _ = step(params, opt_state, _shift_images(x[idx], rng), labels[idx])
    trained = TrainedClassifier(net, params, 0.0, epath.Path("."), {})
    test_accuracy = accuracy(trained, x_test, labels_test)
    info = dict(
        _settings(config),
        input_shape=list(x.shape[1:]),
        num_classes=num_classes,
        test_accuracy=test_accuracy,
        train_accuracy=accuracy(trained, x, labels),
        train_seconds=time.perf_counter() - start,
    )
    logging.info(
        "[classifier] trained on %s: test accuracy %.4f (%.0fs)",
        config.data.name,
        test_accuracy,
        info["train_seconds"],
    )
    return net, params, info


def _abstract_params(net: ClassifierNet, info: dict) -> Params:
    """The restore target: parameter shapes on the first local device."""
    shape = (1, *info["input_shape"])
    abstract = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), np.zeros(shape))["params"])
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)


def load_or_train_classifier(config: ml_collections.ConfigDict) -> TrainedClassifier:
    """The cached classifier of this config's dataset, training and caching it if missing."""
    directory = cache_directory(config)
    checkpointer = ocp.StandardCheckpointer()
    info_path = directory / "info.json"
    if info_path.exists() and (directory / "params").exists():
        info = json.loads(info_path.read_text())
        net = ClassifierNet(
            num_classes=int(info["num_classes"]),
            features=int(info["training"]["features"]),
            input_size=int(info["training"].get("image_size", 0)),
        )
        params = checkpointer.restore(directory / "params", _abstract_params(net, info))
        return TrainedClassifier(net, params, float(info["test_accuracy"]), directory, info)
    net, params, info = train_classifier(config)
    try:
        with files.atomic_directory(directory) as staging:
            checkpointer.save(staging / "params", params)
            checkpointer.wait_until_finished()
            files.atomic_write(staging / "info.json", json.dumps(info, indent=2))
    except FileExistsError:
        pass  # another process cached it first; theirs is identical
    return TrainedClassifier(net, params, float(info["test_accuracy"]), directory, info)
