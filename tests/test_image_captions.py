"""Image-caption pairs from files on disk (data.name='image_captions'): the three layouts read
the same pairs, images are center-cropped and resized, splits are subfolders, and a malformed
folder is refused in one line naming what is wrong."""

import io
import json
import os
import tarfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from distill_jax.data import image_captions, sources


def _data_config(data_dir, image_size=16):
    return ml_collections.ConfigDict(
        dict(
            name="image_captions",
            data_dir=str(data_dir),
            image_size=image_size,
            train_split="train",
            eval_split="validation",
        )
    )


def _unpack(shards, folder, jsonl: bool):
    """The shards' pairs as loose files: caption files beside, or a metadata.jsonl."""
    folder.mkdir(parents=True)
    rows = []
    for path in shards:
        with tarfile.open(path) as shard:
            shard.extractall(folder, filter="data")
    for caption in sorted(folder.glob("*.txt")):
        rows.append({"file_name": caption.stem + ".png", "text": caption.read_text()})
        if jsonl:
            caption.unlink()
    if jsonl:
        (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_the_three_layouts_read_the_same_pairs(tmp_path):
    shards = image_captions.write_mock_pairs(str(tmp_path / "shards"), 11, per_shard=4)
    assert len(shards) == 3
    _unpack(shards, tmp_path / "sidecar", jsonl=False)
    _unpack(shards, tmp_path / "jsonl", jsonl=True)
    read = {}
    for layout in ("shards", "sidecar", "jsonl"):
        source, info = sources.load_source(_data_config(tmp_path / layout), split="train")
        assert info.shape == (16, 16, 3) and info.num_classes == 0 and info.num_train == 11
        read[layout] = [source[i] for i in range(len(source))]
        assert list(sources.captions_of(source)) == [e["caption"] for e in read[layout]]
    for layout in ("sidecar", "jsonl"):
        for ours, theirs in zip(read["shards"], read[layout], strict=True):
            assert ours["caption"] == theirs["caption"]
            np.testing.assert_array_equal(ours["image"], theirs["image"])
    assert read["shards"][3]["caption"].endswith("number 3")
    assert read["shards"][0]["image"].dtype == np.uint8


def test_images_are_center_cropped_then_resized(tmp_path):
    # A 30x10 image: a black left band, white middle 10x10, black right band.
    pixels = np.zeros((10, 30, 3), np.uint8)
    pixels[:, 10:20] = 255
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("a white square\n")
    source, _ = sources.load_source(_data_config(tmp_path, image_size=5), split="train")
    example = source[0]
    assert example["caption"] == "a white square"
    assert example["image"].shape == (5, 5, 3) and example["image"].min() >= 250


def test_splits_are_subfolders(tmp_path):
    image_captions.write_mock_pairs(str(tmp_path / "train"), 6, seed=1)
    image_captions.write_mock_pairs(str(tmp_path / "validation"), 3, seed=2)
    _, info = sources.load_source(_data_config(tmp_path), split="train")
    assert (info.num_train, info.num_eval) == (6, 3)
    source, _ = sources.load_source(_data_config(tmp_path), split="validation")
    assert len(source) == 3
    with pytest.raises(ValueError, match="has no 'test' split: accepted a subfolder"):
        sources.load_source(_data_config(tmp_path), split="test")


def _no_caption(folder):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(folder / "a.png")


def _shard_without_image(folder):
    with tarfile.open(folder / "0.tar", "w") as shard:
        member = tarfile.TarInfo("k1.txt")
        member.size = 3
        shard.addfile(member, io.BytesIO(b"cat"))


def _bad_jsonl(folder):
    (folder / "metadata.jsonl").write_text('{"file_name": "missing.png", "text": "a dog"}\n')


def _broken_image(folder):
    (folder / "b.png").write_bytes(b"not a png")
    (folder / "b.txt").write_text("broken")


@pytest.mark.parametrize(
    "make, image_size, message",
    [
        (lambda f: None, 16, "holds no image-caption pairs: accepted webdataset"),
        (_no_caption, 16, "a.png has no caption file a.txt"),
        (_shard_without_image, 16, "key 'k1' has no image"),
        (_bad_jsonl, 16, "names 'missing.png', which does not exist"),
        (_no_caption, 0, "needs data.data_dir .* and data.image_size \\(given 0\\)"),
    ],
)
def test_malformed_folders_refused_in_one_line(tmp_path, make, image_size, message):
    make(tmp_path)
    with pytest.raises(ValueError, match=message) as error:
        sources.load_source(_data_config(tmp_path, image_size), split="train")
    assert "\n" not in str(error.value)


def test_an_undecodable_image_is_named(tmp_path):
    _broken_image(tmp_path)
    source, _ = sources.load_source(_data_config(tmp_path), split="train")
    with pytest.raises(ValueError, match=f"{os.path.join(tmp_path, 'b.png')}.* cannot be decoded"):
        source[0]
