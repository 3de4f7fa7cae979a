"""Real data: Fashion-MNIST IDX files, ImageFolder trees and every kind of bad image."""

import dataclasses

import numpy as np
import pytest
from conftest import FMNIST, fmnist_available
from helpers import image_folder, png

from mmdist import datasets
from mmdist.config import DataConfig
from mmdist.errors import DataError


@pytest.mark.skipif(not fmnist_available(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_from_the_debian_package():
    x, y = datasets.load_fashion_mnist(FMNIST, "train")
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [6000] * 10
    index = datasets.index_split(DataConfig(), "test")
    assert index.classes == datasets.FASHION_MNIST_CLASSES and len(index.items) == 10000
    imgs, labels = datasets.load_images(DataConfig(), index.items[:5], "test")
    assert imgs.shape == (5, 1, 28, 28) and labels.tolist() == [it.label for it in index.items[:5]]


def test_missing_fashion_mnist_folder_is_a_clear_error(tmp_path):
    cfg = DataConfig(train=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        datasets.index_split(cfg, "train")


def test_imagefolder_classes_keep_their_names_and_order(tmp_path):
    root = image_folder(str(tmp_path / "tr"), {"zebra": 2, "ant": 3, "naïve cat": 1})
    index = datasets.index_split(DataConfig(source="imagefolder", train=root, channels=3), "train")
    assert index.classes == ("ant", "naïve cat", "zebra")
    chosen = datasets.index_split(DataConfig(source="imagefolder", train=root, channels=3,
                                             classes=("zebra", "ant"), max_per_class=1), "train")
    assert chosen.classes == ("zebra", "ant") and [it.label for it in chosen.items] == [0, 1]


def test_an_imagefolder_of_linked_class_folders_and_files_is_indexed(tmp_path):
    """ImageNet subsets are often folders of links to the full set's class folders or images."""
    import os

    full = image_folder(str(tmp_path / "full"), {"cat": 2, "dog": 1, "eel": 1})
    subset = tmp_path / "subset"
    (subset / "dog").mkdir(parents=True)
    os.symlink(os.path.join(full, "cat"), subset / "cat")
    for name in os.listdir(os.path.join(full, "dog")):
        os.symlink(os.path.join(full, "dog", name), subset / "dog" / name)
    index = datasets.index_split(DataConfig(source="imagefolder", train=str(subset), channels=3), "train")
    assert index.classes == ("cat", "dog") and [it.label for it in index.items] == [0, 0, 1]


def test_empty_class_and_missing_test_class_are_recorded(tmp_path):
    root = image_folder(str(tmp_path / "tr"), {"a": 2, "b": 2})
    (tmp_path / "tr" / "empty").mkdir()
    test = image_folder(str(tmp_path / "te"), {"a": 1})
    cfg = DataConfig(source="imagefolder", train=root, test=test, channels=3)
    train = datasets.index_split(cfg, "train")
    assert train.classes == ("a", "b")
    assert {"kind": "empty_class", "class": "empty", "split": "train"} in train.problems
    listed = dataclasses.replace(cfg, classes=("a", "b"))
    assert {"kind": "class_missing", "class": "b", "split": "test"} in datasets.index_split(listed, "test").problems


def test_listed_class_absent_from_train_is_an_error(tmp_path):
    root = image_folder(str(tmp_path / "tr"), {"a": 2})
    with pytest.raises(DataError, match="not found in the train split"):
        datasets.index_split(DataConfig(source="imagefolder", train=root, classes=("a", "z")), "train")


@pytest.mark.parametrize("data, reason", [
    (b"", "zero-byte"),
    (b"this is not an image at all", "cannot decode"),
    (png(40)[:60], "cannot decode"),  # truncated
])
def test_bad_bytes_raise_data_error(data, reason):
    with pytest.raises(DataError, match=reason):
        datasets.decode_image(data, 16, 3)


@pytest.mark.parametrize("mode", ["RGBA", "L", "I;16", "RGB"])
@pytest.mark.parametrize("channels", [1, 3])
def test_any_mode_decodes_to_the_requested_channels(mode, channels):
    arr = datasets.decode_image(png(40, mode), 16, channels)
    assert arr.shape == (16, 16, channels) and arr.dtype == np.uint8
    if mode == "I;16":
        assert arr.max() > 16  # 16-bit values were scaled, not clipped to a black image


def test_adm_center_crop_matches_its_definition():
    from PIL import Image

    img = Image.fromarray(np.arange(300 * 200 * 3, dtype=np.uint32).reshape(200, 300, 3).astype(np.uint8))
    out = datasets.center_crop_arr(img, 64)
    assert out.size == (64, 64)  # box-halved once (200 -> 100), bicubic to short side 64, centre crop


def _idx(path, array, gz):
    """Write ``array`` (uint8) as an IDX file, gzipped or plain."""
    import gzip

    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_in_any_folder_are_read_by_torchvision(tmp_path, monkeypatch, gz):
    """The Debian layout (gzipped) or plain files; a truncated file is a clear DataError."""
    monkeypatch.setattr(datasets, "CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    folder = tmp_path / "fm"
    folder.mkdir()
    arrays = {}
    for split, (images, labels) in datasets._IDX_FILES.items():
        n = 7 if split == "train" else 3
        arrays[split] = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8))
        _idx(folder / (images + (".gz" if gz else "")), arrays[split][0], gz)
        _idx(folder / (labels + (".gz" if gz else "")), arrays[split][1], gz)
    for split in ("train", "test"):
        x, y = datasets.load_fashion_mnist(str(folder), split, False)
        assert np.array_equal(x, arrays[split][0]) and np.array_equal(y, arrays[split][1]) and y.dtype == np.int64
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in folder.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    name = datasets._IDX_FILES["test"][0] + (".gz" if gz else "")
    truncated = np.zeros((3, 28, 28), np.uint8)
    _idx(broken / name, truncated, gz)
    raw = (broken / name).read_bytes()
    if gz:
        import gzip

        raw = gzip.compress(gzip.decompress(raw)[:-100])
    else:
        raw = raw[:-100]
    (broken / name).write_bytes(raw)  # the header promises 3 x 28 x 28 bytes, the body has fewer
    with pytest.raises(DataError, match="unreadable"):
        datasets.load_fashion_mnist(str(broken), "test", False)
