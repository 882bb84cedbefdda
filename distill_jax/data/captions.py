"""The bundled captioned dataset: the digits with captions from their label and measured looks.

Each digit's attributes are measured on its 8x8 image (grey values in [0, 1]):

- thickness: ink mass (sum of grey values); 'thin' in the lowest third of its class, 'thick'
  in the highest third (relative to the class, since a 1 has less ink than an 8);
- slant: the second image moment ratio mu11 / mu02 (horizontal shift per row);
  'left-leaning' / 'right-leaning' in the lowest / highest third of its class;
- size: the area of the bounding box of pixels above 0.3; 'small' below its class's 25th
  percentile (8x8 digits nearly all fill the frame, so there is no 'large').

A caption joins some of those words (each present word kept with probability 0.7) with a
number form ('7', 'seven', 'the digit seven', ...) in a template. TRAIN_TEMPLATES caption the
training data; HELD_OUT_TEMPLATES are never seen in training and make the evaluation prompts.
Two captions per training image, one per test image. Every caption is encoded once, when the
dataset is prepared, by the frozen text encoder (`distill_jax.text_encoder`), and stored as a
float16 'condition' feature [MAX_TOKENS, 384] beside the image, the digit and the caption.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from distill_jax import text_encoder
from distill_jax.data.digits import (
    IMAGE_SHAPE,
    NUM_CLASSES,
    BundledBuilder,
    digits_arrays,
    png_bytes,
    prepare_bundled,
    split_indices,
)

MAX_TOKENS = 16
CAPTIONS_PER_TRAIN_IMAGE = 2
CAPTION_SEED = 0
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# '{a}' is the attribute words with a trailing space (maybe empty), '{n}' the number form.
TRAIN_TEMPLATES = (
    "{a}{n}",
    "a {a}{n}",
    "an image of a {a}{n}",
    "a picture of a {a}{n}",
    "a {a}handwritten {n}",
    "a scan of a {a}{n}",
)
HELD_OUT_TEMPLATES = ("a drawing of a {a}{n}", "this is a {a}{n}", "a photo showing a {a}{n}")
THICKNESS_WORDS = ("thin", "", "thick")  # ranks 0, 1, 2 for the adherence metric


def number_forms(digit: int) -> tuple[str, ...]:
    """The ways a caption names `digit`."""
    name = NAMES[digit]
    return (str(digit), name, f"digit {name}", f"number {digit}", f"digit {digit}")


def ink_mass(images: np.ndarray) -> np.ndarray:
    """[N]: the sum of grey values in [0, 1] of images [N, H, W, 1] in [-1, 1] or uint8."""
    x = np.asarray(images, np.float32)[..., 0]
    x = x / 255.0 if np.asarray(images).dtype == np.uint8 else (x + 1.0) / 2.0
    return np.clip(x, 0.0, 1.0).sum(axis=(1, 2))


def measure(images: np.ndarray) -> dict[str, np.ndarray]:
    """Ink mass, slant and bounding-box area [N] of uint8 images [N, H, W, 1]."""
    x = images[..., 0].astype(np.float64) / 255.0
    ys, xs = np.mgrid[0 : x.shape[1], 0 : x.shape[2]]
    mass = x.sum(axis=(1, 2))
    cx = (x * xs).sum(axis=(1, 2)) / mass
    cy = (x * ys).sum(axis=(1, 2)) / mass
    dx, dy = xs - cx[:, None, None], ys - cy[:, None, None]
    slant = (x * dx * dy).sum(axis=(1, 2)) / (x * dy * dy).sum(axis=(1, 2))
    on = x > 0.3
    rows, cols = on.any(axis=2), on.any(axis=1)
    height = rows.shape[1] - rows[:, ::-1].argmax(1) - rows.argmax(1)
    width = cols.shape[1] - cols[:, ::-1].argmax(1) - cols.argmax(1)
    return {"ink": mass, "slant": slant, "area": (height * width).astype(np.float64)}


def attribute_words(images: np.ndarray, labels: np.ndarray) -> list[list[str]]:
    """Per image, the attribute words that describe it (thresholds within its class)."""
    m = measure(images)
    words: list[list[str]] = [[] for _ in labels]
    for k in range(NUM_CLASSES):
        members = np.flatnonzero(labels == k)
        ink_lo, ink_hi = np.quantile(m["ink"][members], [1 / 3, 2 / 3])
        sl_lo, sl_hi = np.quantile(m["slant"][members], [1 / 3, 2 / 3])
        area_lo = np.quantile(m["area"][members], 0.25)
        for i in members:
            if m["ink"][i] < ink_lo or m["ink"][i] > ink_hi:
                words[i].append("thin" if m["ink"][i] < ink_lo else "thick")
            if m["slant"][i] < sl_lo or m["slant"][i] > sl_hi:
                words[i].append("left-leaning" if m["slant"][i] < sl_lo else "right-leaning")
            if m["area"][i] < area_lo:
                words[i].append("small")
    return words


def make_caption(
    digit: int, words: Sequence[str], templates: Sequence[str], rng: np.random.Generator
) -> str:
    """One caption: a random template, number form and subset of `words` (each kept p=0.7)."""
    kept = [w for w in words if rng.random() < 0.7]
    adjectives = ", ".join(kept) + " " if kept else ""
    forms = number_forms(digit)
    template = templates[rng.integers(len(templates))]
    return template.format(a=adjectives, n=forms[rng.integers(len(forms))])


def prompt(digit: int, template: str, thickness: str = "", form: int = 1) -> str:
    """An evaluation prompt: `template` with the thickness word (or none) and number form."""
    return template.format(a=f"{thickness} " if thickness else "", n=number_forms(digit)[form])


def split_captions(split: str) -> tuple[np.ndarray, list[int], list[str]]:
    """(image indices, digits, captions) of `split`: deterministic in CAPTION_SEED."""
    images, labels = digits_arrays()
    words = attribute_words(images, labels)
    rng = np.random.default_rng([CAPTION_SEED, 0 if split == "train" else 1])
    repeats = CAPTIONS_PER_TRAIN_IMAGE if split == "train" else 1
    indices = np.repeat(split_indices(labels)[split], repeats)
    captions = [make_caption(int(labels[i]), words[i], TRAIN_TEMPLATES, rng) for i in indices]
    return indices, [int(labels[i]) for i in indices], captions


class DistillJaxDigitsText(BundledBuilder):
    """The digits with captions and their text-encoder conditions ('distill_jax_digits_text')."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Two captions per training digit, MiniLM conditions, 16 tokens."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=(
                "scikit-learn's 8x8 digits with generated captions (digit, thickness, slant, "
                "size) and their all-MiniLM-L6-v2 token states."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=IMAGE_SHAPE, encoding_format="png"),
                    "digit": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                    "caption": tfds.features.Text(),
                    "condition": tfds.features.Tensor(
                        shape=(MAX_TOKENS, text_encoder.WIDTH), dtype=np.float16
                    ),
                }
            ),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # bundled data and weights: nothing to download
        return {name: self._generate_examples(name) for name in ("train", "test")}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
        images, _ = digits_arrays()
        indices, digits, captions = split_captions(split)
        encoder = text_encoder.load_text_encoder("", MAX_TOKENS)
        distinct = sorted(set(captions))
        conditions = {}
        for start in range(0, len(distinct), 256):
            chunk = distinct[start : start + 256]
            encoded, _ = encoder.encode(chunk)
            conditions.update(zip(chunk, encoded.astype(np.float16), strict=True))
        for key, (i, digit, caption) in enumerate(zip(indices, digits, captions, strict=True)):
            yield (
                key,
                {
                    "image": png_bytes(images[i]),
                    "digit": digit,
                    "caption": caption,
                    "condition": conditions[caption],
                },
            )


def prepare_digits_text(data_dir: str = "") -> tfds.core.DatasetBuilder:
    """Prepare the captioned digits into `data_dir` (array_record) if needed; the builder."""
    return prepare_bundled(DistillJaxDigitsText, data_dir)
