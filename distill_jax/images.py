"""Images in and out: uint8 conversion, class-per-column grids, and the inputs of `sample`.

The image inputs of `sample` (an .npz of start images, inpainting masks) are read with one
clear error for a missing, damaged or wrong file.

Used by `sample` (the PNG beside every .npz) and the evaluation (grids of every row). Figures are
`matplotlib.figure.Figure` objects rendered by the Agg canvas, never pyplot: they work without a
display and leave the caller's pyplot backend alone (a notebook keeps its inline plots). Every
file is written through `files.atomic_path`.
"""

from __future__ import annotations

import numpy as np
from etils import epath
from matplotlib.figure import Figure
from PIL import Image

from distill_jax import files


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] to uint8 in 0..255 (the inverse of the data preprocessing)."""
    return np.clip(np.round((np.asarray(x) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def from_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 images to float32 in [-1, 1]."""
    return np.asarray(images, np.float32) / 127.5 - 1.0


def displayable(x: np.ndarray) -> np.ndarray:
    """Samples as uint8 images [N, H, W, C] for pictures, or vectors [N, D] unchanged."""
    return to_uint8(x) if np.ndim(x) == 4 else np.asarray(x)


TILE_PIXELS = 32  # small images are scaled up (nearest) to at least this size per tile


def image_grid(images: np.ndarray, labels: np.ndarray, num_classes: int, rows: int) -> np.ndarray:
    """A uint8 [rows * H', K * W', C] grid: column k holds samples of class k (H' scaled up).

    Args:
      images: uint8 [N, H, W, C].
      labels: int [N].
      num_classes: K, the number of columns.
      rows: samples shown per class; missing ones are left black.
    """
    _, height, width, channels = images.shape
    scale = max(1, -(-TILE_PIXELS // max(height, width)))
    tile_h, tile_w = height * scale + 2, width * scale + 2  # a 1-pixel border around each
    grid = np.zeros((rows * tile_h, num_classes * tile_w, channels), np.uint8)
    for k in range(num_classes):
        members = np.flatnonzero(np.asarray(labels) == k)[:rows]
        for r, index in enumerate(members):
            tile = images[index].repeat(scale, axis=0).repeat(scale, axis=1)
            grid[r * tile_h + 1 : (r + 1) * tile_h - 1, k * tile_w + 1 : (k + 1) * tile_w - 1] = (
                tile
            )
    return grid


def save_samples_png(
    path: files.PathLike,
    x: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    rows: int = 8,
    title: str = "",
) -> epath.Path:
    """Save a picture of samples: an image grid for images, a scatter for vector data.

    Args:
      path: the .png file.
      x: uint8 images [N, H, W, C], or float vectors [N, D] (the first two coordinates are
        drawn, coloured by label).
      labels: int [N].
      num_classes: K.
      rows: image grid rows (samples per class).
      title: scatter title.
    """
    if np.ndim(x) == 4:
        grid = image_grid(np.asarray(x), labels, num_classes, rows)
        with files.atomic_path(path) as tmp, tmp.open("wb") as handle:
            Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(handle, "png")
        return epath.Path(path)
    x = np.asarray(x, np.float32)
    fig = Figure(figsize=(4, 4))
    ax = fig.subplots()
    second = x[:, 1] if x.shape[1] > 1 else np.zeros(len(x))
    ax.scatter(x[:, 0], second, c=labels, s=4, cmap="tab10", vmin=0, vmax=max(num_classes, 10))
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=8)
    return save_figure(fig, path, dpi=120)


def save_figure(fig, path: files.PathLike, *, dpi: int = 110) -> epath.Path:
    """Save a matplotlib Figure as PNG atomically."""
    fig.tight_layout()
    with files.atomic_path(path) as tmp, tmp.open("wb") as handle:
        fig.savefig(handle, format="png", dpi=dpi)
    return epath.Path(path)


MASKS = ("left", "right", "top", "bottom", "center")


def named_mask(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A [H, W, C] inpainting mask (1 = known) keeping the named part of the image."""
    if name not in MASKS:
        raise ValueError(f"mask={name!r} is invalid: accepted {MASKS} or an .npz file.")
    height, width = shape[0], shape[1]
    mask = np.zeros(shape, np.float32)
    if name == "left":
        mask[:, : width // 2] = 1
    elif name == "right":
        mask[:, width // 2 :] = 1
    elif name == "top":
        mask[: height // 2] = 1
    elif name == "bottom":
        mask[height // 2 :] = 1
    else:  # known border, unknown centre
        mask[:] = 1
        mask[height // 4 : height - height // 4, width // 4 : width - width // 4] = 0
    return mask


def _read_npz(path: epath.PathLike, accepted: str) -> dict[str, np.ndarray]:
    """The arrays of an .npz archive; a missing, damaged or non-.npz file is one clear error."""
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: accepted {accepted}.")
    try:
        with path.open("rb") as handle, np.load(handle, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("a single .npy array, not an .npz archive")
            return {key: data[key] for key in data.files}
    except Exception as error:  # noqa: BLE001 - zipfile, pickle and format errors alike
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"{path} cannot be read ({reason}): accepted {accepted}.") from None


def load_images(path: epath.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Examples and labels from an .npz: (x float32 in [-1, 1], labels int32 or None).

    The file holds 'images' (uint8 [N, H, W, C]) or 'x' (float [N, ...] in the data range),
    and optionally 'labels'.
    """
    accepted = "an .npz with 'images' (uint8 [N, H, W, C]) or 'x' (float), optionally 'labels'"
    data = _read_npz(path, accepted)
    if "images" in data:
        x = from_uint8(data["images"])
    elif "x" in data:
        x = np.asarray(data["x"], np.float32)
    else:
        raise ValueError(f"{path} has neither 'images' nor 'x' arrays: accepted {accepted}.")
    labels = np.asarray(data["labels"], np.int32) if "labels" in data else None
    return x, labels


def load_mask(mask: str, shape: tuple[int, ...], num: int) -> np.ndarray:
    """A named mask, or the 'mask' array of an .npz, broadcast to [num, *shape]."""
    accepted = f"one of {', '.join(MASKS)}, or an .npz whose 'mask' array (1 = known) fits {shape}"
    if mask in MASKS:
        array = named_mask(mask, shape)
    elif not mask.endswith(".npz") and not epath.Path(mask).exists():
        raise ValueError(f"mask={mask!r} is invalid: accepted {accepted}.")
    else:
        data = _read_npz(mask, accepted)
        if "mask" not in data:
            raise ValueError(f"{mask} has no 'mask' array: accepted {accepted}.")
        array = np.asarray(data["mask"], np.float32)
    try:
        return np.broadcast_to(array, (num, *shape))
    except ValueError:
        raise ValueError(
            f"{mask} holds a mask of shape {array.shape}: accepted {accepted} (or [N, ...])."
        ) from None
