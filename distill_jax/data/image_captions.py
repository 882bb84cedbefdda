"""Image-caption pairs from files on disk: config.data.name = 'image_captions'.

config.data.data_dir is a folder of pairs in one of three layouts, the first that applies:
- webdataset shards: `*.tar` files whose members are grouped by key (a member's name up to the
  first dot of its base name, as webdataset groups them), each key with an image (`.jpg`,
  `.jpeg`, `.png`, `.webp`) and a caption (`.txt`, or `.json` with a 'caption' or 'text'
  string), as img2dataset writes LAION subsets;
- `metadata.jsonl`: one JSON object per line with `file_name` (an image path relative to the
  folder) and `text` (its caption), as Hugging Face's imagefolder reads it;
- images with a caption file of the same stem beside them (`0001.png` and `0001.txt`).
A split is the subfolder of that name where there is one (`data_dir/train`,
`data_dir/validation`); else the train split is the folder itself, and another split is
refused, naming the folder it looked for.

Images are decoded when read (a split never has to fit in memory), converted to RGB,
center-cropped to a square and resized to data.image_size (bicubic), as Stable Diffusion's
training scripts resize and crop. Examples are {'image': uint8 [S, S, 3], 'label': 0,
'caption': str}; `CaptionedImages.captions` lists the captions without decoding an image, so
a text-to-image pipeline's encoder encodes them once. The folder is indexed once per process
(captions are read, images only located); a key without an image or without a caption, an
unreadable shard or an empty folder is refused in one line naming it.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import tarfile
from collections.abc import Sequence

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
LAYOUTS = (
    "webdataset .tar shards (key.jpg + key.txt), a metadata.jsonl with file_name and text, or "
    "images with a caption file of the same stem (0001.png + 0001.txt)"
)


@dataclasses.dataclass(frozen=True)
class _Pair:
    """Where one image's bytes are (a file, or a byte range of a tar shard) and its caption."""

    path: str
    caption: str
    offset: int = 0
    size: int = -1


def _caption_of(data: bytes, name: str) -> str:
    """A caption member's text: a .txt's contents, or a .json's 'caption' or 'text'."""
    text = data.decode("utf-8").strip()
    if not name.endswith(".json"):
        return text
    value = json.loads(text)
    caption = value.get("caption", value.get("text")) if isinstance(value, dict) else None
    if not isinstance(caption, str):
        raise ValueError(f"{name} has no 'caption' or 'text' string")
    return caption


def _shard_pairs(path: str) -> list[_Pair]:
    """The pairs of one webdataset shard, in the order their keys first appear."""
    images, texts, order = {}, {}, []
    with tarfile.open(path) as shard:
        for member in shard:
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            key = os.path.join(os.path.dirname(member.name), base.split(".", 1)[0])
            extension = "." + base.split(".", 1)[1].lower() if "." in base else ""
            if key not in images and key not in texts:
                order.append(key)
            if extension in IMAGE_EXTENSIONS:
                images[key] = (member.offset_data, member.size)
            elif extension in (".txt", ".json"):
                data = shard.extractfile(member).read()
                texts[key] = _caption_of(data, f"{path}:{member.name}")
    pairs = []
    for key in order:
        if (key in images) != (key in texts):
            missing = "caption (.txt or .json)" if key in images else "image"
            raise ValueError(f"{path}: key {key!r} has no {missing}")
        if key in images:
            pairs.append(_Pair(path, texts[key], *images[key]))
    return pairs


def _jsonl_pairs(folder: str) -> list[_Pair]:
    """The pairs metadata.jsonl lists."""
    path = os.path.join(folder, "metadata.jsonl")
    pairs = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            name, text = row.get("file_name"), row.get("text")
            if not isinstance(name, str) or not isinstance(text, str):
                raise ValueError(f"{path} line {number} has no file_name and text strings")
            image = os.path.join(folder, name)
            if not os.path.isfile(image):
                raise ValueError(f"{path} line {number} names {name!r}, which does not exist")
            pairs.append(_Pair(image, text.strip()))
    return pairs


def _sidecar_pairs(folder: str) -> list[_Pair]:
    """Images with a caption file of the same stem, sorted by file name."""
    pairs = []
    for name in sorted(os.listdir(folder)):
        stem, extension = os.path.splitext(name)
        if extension.lower() not in IMAGE_EXTENSIONS:
            continue
        caption = os.path.join(folder, stem + ".txt")
        if not os.path.isfile(caption):
            raise ValueError(f"{os.path.join(folder, name)} has no caption file {stem}.txt")
        with open(caption, encoding="utf-8") as handle:
            pairs.append(_Pair(os.path.join(folder, name), handle.read().strip()))
    return pairs


@functools.lru_cache(maxsize=8)
def index_folder(folder: str) -> tuple[_Pair, ...]:
    """Every pair of `folder`, in a fixed order (shards by name, then each shard's order).

    Raises:
      ValueError: no pairs, or a malformed one, in one line naming it and the layouts accepted.
    """
    if not os.path.isdir(folder):
        raise ValueError(
            f"data.data_dir={folder!r} is not a directory: accepted a folder of image-caption "
            f"pairs ({LAYOUTS})."
        )
    shards = sorted(name for name in os.listdir(folder) if name.endswith(".tar"))
    try:
        if shards:
            pairs = [p for name in shards for p in _shard_pairs(os.path.join(folder, name))]
        elif os.path.isfile(os.path.join(folder, "metadata.jsonl")):
            pairs = _jsonl_pairs(folder)
        else:
            pairs = _sidecar_pairs(folder)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, tarfile.TarError) as error:
        raise ValueError(
            f"{folder} cannot be read as image-caption pairs ({type(error).__name__}: {error})"
        ) from None
    if not pairs:
        raise ValueError(f"{folder} holds no image-caption pairs: accepted {LAYOUTS}.")
    return tuple(pairs)


def split_folder(data_dir: str, split: str, train_split: str) -> str:
    """The folder holding `split`: data_dir/split, or data_dir itself for the train split."""
    folder = os.path.join(data_dir, split)
    if os.path.isdir(folder):
        return folder
    if split == train_split:
        return data_dir
    raise ValueError(
        f"data.data_dir={data_dir!r} has no {split!r} split: accepted a subfolder {folder} of "
        "image-caption pairs (the train split may be the folder itself)."
    )


def square_image(image: Image.Image, size: int) -> np.ndarray:
    """RGB, center-cropped to a square, resized to size x size (bicubic): uint8 [S, S, 3]."""
    image = image.convert("RGB")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, np.uint8)


class CaptionedImages(Sequence):
    """Random access to a folder's pairs: [i] is {'image', 'label': 0, 'caption'}."""

    def __init__(self, pairs: Sequence[_Pair], image_size: int):
        self.pairs = tuple(pairs)
        self.image_size = int(image_size)

    @property
    def captions(self) -> list[str]:
        """Every caption, in order, without decoding an image."""
        return [pair.caption for pair in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:  # type: ignore[override]
        pair = self.pairs[int(index)]
        with open(pair.path, "rb") as handle:
            handle.seek(pair.offset)
            data = handle.read(pair.size)
        try:
            image = Image.open(io.BytesIO(data))
            pixels = square_image(image, self.image_size)
        except (OSError, ValueError) as error:
            where = pair.path if pair.size < 0 else f"{pair.path} at byte {pair.offset}"
            raise ValueError(
                f"the image of pair {index} ({where}) cannot be decoded: {error}"
            ) from None
        return {"image": pixels, "label": np.int32(0), "caption": pair.caption}


def write_mock_pairs(folder: str, num: int, *, seed: int = 0, per_shard: int = 8) -> list[str]:
    """Write `num` random image-caption pairs as webdataset shards into `folder` (smoke runs).

    Images are random RGB PNGs of random non-square sizes (so cropping and resizing run);
    captions name a colour and a shape. Returns the shard paths.
    """
    rng = np.random.default_rng(seed)
    colours, shapes = ("red", "green", "blue", "yellow"), ("circle", "square", "star")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for first in range(0, num, per_shard):
        path = os.path.join(folder, f"{first // per_shard:05d}.tar")
        with tarfile.open(path, "w") as shard:
            for index in range(first, min(first + per_shard, num)):
                height, width = (int(v) for v in rng.integers(24, 64, size=2))
                pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="PNG")
                caption = f"a {rng.choice(colours)} {rng.choice(shapes)} number {index}"
                for name, data in ((".png", buffer.getvalue()), (".txt", caption.encode())):
                    member = tarfile.TarInfo(f"{index:06d}{name}")
                    member.size = len(data)
                    shard.addfile(member, io.BytesIO(data))
        paths.append(path)
    return paths
