"""Real images: Fashion-MNIST IDX files, ImageFolder trees and Parquet image tables.

A split is first *indexed* (class names, one ``Item`` per image, problems such as empty class
folders) on the driver; images are *loaded* later, where they are used (the encode stage's
actors, or its decode tasks when pipelined; evaluation trials). Loading a bad file raises
``DataError`` with the reason, which callers count as a skip rather than crash on.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import posixpath
import re
import shutil
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, UnidentifiedImageError

from mmdist import schema, storage
from mmdist.config import DataConfig
from mmdist.errors import DataError
from mmdist.seeding import derive_seed

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
MAX_ASPECT = 64  # a 1 x 100000 strip would be resized to 28 x 2.8M pixels by the centre crop
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "mmdist")
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


@dataclass(frozen=True)
class Item:
    """One image of a split: where it is and which class it belongs to."""

    source_id: str
    class_name: str
    label: int
    uri: str | None = None  # a file (ImageFolder) or a Parquet file (with row)
    row: int | None = None  # row of a Parquet file, or index into the Fashion-MNIST arrays


@dataclass
class SplitIndex:
    """The images of one split, their classes, and what was wrong with the input."""

    split: str
    classes: tuple[str, ...]
    items: list[Item]
    problems: list[dict] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Images per class name."""
        out = dict.fromkeys(self.classes, 0)
        for it in self.items:
            out[it.class_name] += 1
        return out


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST
# ----------------------------------------------------------------------------------------------


def _find_idx(folder: str, stem: str) -> str | None:
    """The IDX file for ``stem`` in ``folder`` (plain or .gz, either naming style)."""
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    return None


def _torchvision_root(folder: str) -> str | None:
    """A torchvision FashionMNIST root with ``folder``'s IDX files unpacked (cached); None if any is missing."""
    stems = [stem for pair in _IDX_FILES.values() for stem in pair]
    sources = [_find_idx(folder, stem) for stem in stems]
    if None in sources:
        return None
    key = "|".join(f"{p}:{os.path.getmtime(p)}" for p in sources)
    root = os.path.join(CACHE, "fashion-mnist-" + hashlib.sha1(key.encode()).hexdigest()[:12])
    if not os.path.isdir(root):  # torchvision reads only unpacked files; Debian ships them gzipped
        tmp = os.path.join(f"{root}.tmp-{os.getpid()}", "FashionMNIST", "raw")
        os.makedirs(tmp, exist_ok=True)
        for src, stem in zip(sources, stems):
            with (gzip.open if src.endswith(".gz") else open)(src, "rb") as fin, \
                    open(os.path.join(tmp, stem), "wb") as fout:
                shutil.copyfileobj(fin, fout)
        try:
            os.rename(f"{root}.tmp-{os.getpid()}", root)
        except OSError:  # another worker of this node unpacked it first
            shutil.rmtree(f"{root}.tmp-{os.getpid()}")
    return root


@lru_cache(maxsize=4)
def load_fashion_mnist(folder: str, split: str, download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of a split, read by torchvision from ``folder``'s
    IDX files or, without them and with ``download``, from torchvision's download (online machines)."""
    from torchvision.datasets import FashionMNIST

    root = _torchvision_root(folder)
    hint = "run `mmdist data` (it installs Debian's dataset-fashion-mnist, or downloads where online)"
    if root is None and not download:
        raise DataError(f"Fashion-MNIST not found in {folder}: {hint}")
    try:
        ds = FashionMNIST(root or os.path.join(CACHE, "download"), train=split == "train", download=root is None)
    except Exception as e:  # network errors come in many types; torchvision asserts on malformed files
        what = "not found in {} and the download failed" if root is None else "files in {} are unreadable"
        raise DataError(f"Fashion-MNIST {what.format(folder)} ({type(e).__name__}): {hint}") from None
    return ds.data.numpy(), ds.targets.numpy()


# ----------------------------------------------------------------------------------------------
# Indexing a split
# ----------------------------------------------------------------------------------------------


def index_split(cfg: DataConfig, split: str = "train") -> SplitIndex:
    """List the images of a split; classes follow ``cfg.classes`` (or sorted names).

    ``val`` is ``data.val_per_class`` images per class held out of the train files (a seeded
    choice); ``train`` is what is left, so no stage that trains ever sees a validation image.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}")
    if split == "val" and cfg.val_per_class == 0:
        raise DataError("data.val_per_class is 0: there is no validation split")
    if split == "test" and cfg.source != "fashion-mnist" and cfg.test is None:
        raise DataError("data.test is not set: evaluation needs a real test split")
    if cfg.source == "fashion-mnist":
        return _index_fashion_mnist(cfg, split)
    root = cfg.test if split == "test" else cfg.train
    found = _scan_imagefolder(root) if cfg.source == "imagefolder" else _scan_parquet(root)
    return _select(cfg, split, found)


def _index_fashion_mnist(cfg: DataConfig, split: str) -> SplitIndex:
    """Index the Fashion-MNIST arrays as items (row = array index)."""
    files = "test" if split == "test" else "train"
    _, labels = load_fashion_mnist(cfg.train, files, cfg.download)
    found: dict[str, list[Item]] = {c: [] for c in FASHION_MNIST_CLASSES}
    for i, y in enumerate(labels.tolist()):
        name = FASHION_MNIST_CLASSES[y]
        found[name].append(Item(f"{files}:{i}", name, -1, uri=None, row=i))
    return _select(cfg, split, found, default_order=FASHION_MNIST_CLASSES)


def _scan_imagefolder(root: str) -> dict[str, list[Item]]:
    """root/<class>/**/<image> -> {class: items}; empty class folders map to []."""
    fs, path = storage.filesystem(root)
    if not fs.isdir(path):
        raise DataError(f"image folder {root} does not exist or is not a folder")
    entries = fs.ls(path, detail=True)
    # a class folder may be a link to one elsewhere (subsets of ImageNet are often built that way)
    linked = [e["name"] for e in entries if e.get("islink") and fs.isdir(e["name"])]
    folders = sorted([e["name"].rstrip("/") for e in entries if e["type"] == "directory"] + linked)
    if not folders:
        raise DataError(f"image folder {root} has no class folders (expected root/<class>/*.png|jpg)")
    # One recursive listing of the whole root, grouped here: on object storage a find per class
    # folder is a round trip per class (1000 of them for ImageNet-1K, a minute before any work).
    # A local listing does not enter linked folders: each of those is listed on its own.
    top = posixpath.dirname(folders[0])
    found: dict[str, list[str]] = {posixpath.basename(f): [] for f in folders}
    for f in [*fs.find(path), *(f for link in linked for f in fs.find(link))]:
        name, _, rest = posixpath.relpath(f, top).partition("/")
        if rest and name in found and f.lower().endswith(IMAGE_EXTENSIONS):
            found[name].append(f)
    prefix = root.split("://")[0] + "://" if storage.is_remote(root) else ""
    return {name: [Item(f"{name}/{posixpath.relpath(f, posixpath.join(top, name))}", name, -1, uri=prefix + f)
                   for f in sorted(files)] for name, files in found.items()}


def _scan_parquet(root: str) -> dict[str, list[Item]]:
    """Parquet files with image bytes + class name columns -> {class: items}."""

    fs, path = storage.filesystem(root)
    files = [path] if fs.isfile(path) else sorted(f for f in fs.find(path) if f.endswith(".parquet"))
    if not files:
        raise DataError(f"no Parquet files under {root}")
    prefix = root.split("://")[0] + "://" if storage.is_remote(root) else ""
    found: dict[str, list[Item]] = {}
    for f in files:
        table = _read_column(fs, f, schema.CLASS_NAME)
        for row, name in enumerate(table.column(schema.CLASS_NAME).to_pylist()):
            found.setdefault(str(name), []).append(Item(f"{posixpath.basename(f)}:{row}", str(name), -1,
                                                        uri=prefix + f, row=row))
    return found


def _select(cfg: DataConfig, split: str, found: dict[str, list[Item]],
            default_order: tuple[str, ...] | None = None) -> SplitIndex:
    """Apply the class list and per-class cap; record empty or missing classes."""
    problems: list[dict] = []
    wanted = list(cfg.classes or default_order or sorted(found))
    if cfg.classes is not None and split == "train":
        missing = [c for c in wanted if c not in found]
        if missing:
            raise DataError(f"data.classes: {missing[:5]} not found in the train split")
    classes, items = [], []
    for name in wanted:
        members = found.get(name)
        if members is None:
            problems.append({"kind": "class_missing", "class": name, "split": split})
            continue
        if not members:
            problems.append({"kind": "empty_class", "class": name, "split": split})
            continue
        if split != "test" and cfg.val_per_class:
            if len(members) <= cfg.val_per_class:
                raise DataError(f"data.val_per_class: class {name!r} has {len(members)} train images, "
                                f"not more than the {cfg.val_per_class} to hold out")
            held = set(np.random.default_rng(derive_seed(0, "val", name)).permutation(len(members))
                       [: cfg.val_per_class].tolist())
            members = [m for i, m in enumerate(members) if (i in held) == (split == "val")]
        if cfg.max_per_class is not None and split == "train":
            members = members[: cfg.max_per_class]
        label = len(classes)
        classes.append(name)
        items += [Item(m.source_id, name, label, m.uri, m.row) for m in members]
    extra = sorted(set(found) - set(wanted))
    if extra and cfg.classes is None:
        problems += [{"kind": "extra_class", "class": c, "split": split} for c in extra]
    if not items:
        raise DataError(f"the {split} split has no images in the selected classes")
    return SplitIndex(split, tuple(classes), items, problems)


# ----------------------------------------------------------------------------------------------
# Loading and decoding
# ----------------------------------------------------------------------------------------------


def center_crop_arr(image: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop (docs/method.md §1.2): box-halve while >= 2x, bicubic resize, crop."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top: top + size, left: left + size])


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode (RGBA, P, 16-bit, ...) to 8-bit L or RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.uint32)
        shift = 8 if arr.max(initial=0) > 255 else 0
        image = Image.fromarray((arr >> shift).clip(0, 255).astype(np.uint8))
    return image.convert("L" if channels == 1 else "RGB")


def decode_image(data: bytes, size: int, channels: int) -> np.ndarray:
    """Encoded image bytes -> uint8 array [size, size, channels]; DataError if unreadable."""
    if not data:
        raise DataError("zero-byte file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if max(im.size) > MAX_ASPECT * min(im.size):  # a small file the crop would scale up enormously
                raise DataError(f"aspect ratio {im.size[0]}x{im.size[1]} is beyond {MAX_ASPECT}:1")
            im.load()
            image = to_mode(im, channels)
    except Image.DecompressionBombError:  # a header claiming billions of pixels (not an OSError)
        raise DataError("image header claims more pixels than PIL's decompression-bomb limit") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        # PIL names the in-memory file by its address ("<_io.BytesIO object at 0x7f...>"): dropped,
        # or the reason (kept in shard metadata and the manifest) would differ from run to run
        reason = re.sub(r"\s*<[^<>]* at 0x[0-9a-f]+>", "", str(e))
        raise DataError(f"cannot decode image ({type(e).__name__}: {reason[:80]})") from None
    return _shape(center_crop_arr(image, size), channels)


def _shape(image: Image.Image, channels: int) -> np.ndarray:
    """PIL image -> uint8 [H, W, C]."""
    arr = np.asarray(image, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr[:, :, :channels]


@lru_cache(maxsize=2)
def _parquet_images(uri: str) -> list[bytes]:
    """The image-bytes column of one Parquet file (cached: shards read consecutive rows)."""

    fs, path = storage.filesystem(uri)
    return _read_column(fs, path, schema.IMAGE_BYTES).column(schema.IMAGE_BYTES).to_pylist()


def _read_column(fs: object, path: str, column: str) -> object:
    """One column of a Parquet file as a table; DataError if the file is not Parquet or lacks it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with fs.open(path, "rb") as fh:
            return pq.read_table(fh, columns=[column])
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DataError(f"{path}: not a Parquet file with a {column!r} column "
                        f"({storage.short_error(e)})") from None


def load_item(cfg: DataConfig, item: Item, split: str = "train", data: bytes | Exception | None = None) -> np.ndarray:
    """Load one image as uint8 [H, W, C] at ``cfg.image_size``; DataError if it is bad.

    ``data``: an ImageFolder file's bytes (or the error reading them) from ``read_files``.
    """
    if cfg.source == "fashion-mnist":
        images, _ = load_fashion_mnist(cfg.train, "test" if split == "test" else "train", cfg.download)
        image = Image.fromarray(images[item.row])
        if cfg.channels == 3:
            image = image.convert("RGB")
        if image.size != (cfg.image_size, cfg.image_size):
            image = center_crop_arr(image, cfg.image_size)
        return _shape(image, cfg.channels)
    if cfg.source == "parquet":
        return decode_image(_parquet_images(item.uri)[item.row], cfg.image_size, cfg.channels)
    if data is None:
        [data] = storage.read_many([item.uri])
    if isinstance(data, Exception):
        raise DataError(f"cannot read file ({type(data).__name__}: {str(data)[:80]})")
    return decode_image(data, cfg.image_size, cfg.channels)


def read_files(cfg: DataConfig, items: list[Item]) -> list[bytes | Exception | None]:
    """The bytes of an ImageFolder's items, read concurrently (object storage answers each GET in
    tens of ms); None per item for the other sources, whose images are already in memory."""
    if cfg.source != "imagefolder":
        return [None] * len(items)
    return storage.read_many([it.uri for it in items])


def load_images(cfg: DataConfig, items: list[Item], split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Load many items into uint8 [N, C, H, W] and int64 labels; bad images raise DataError."""
    if cfg.source == "fashion-mnist" and cfg.image_size == 28 and cfg.channels == 1:
        images, _ = load_fashion_mnist(cfg.train, split, cfg.download)
        rows = np.array([it.row for it in items], dtype=np.int64)
        return images[rows][:, None].copy(), np.array([it.label for it in items], dtype=np.int64)
    arrays = []
    for it, data in zip(items, read_files(cfg, items)):
        try:
            arrays.append(load_item(cfg, it, split, data).transpose(2, 0, 1))
        except DataError as e:
            raise DataError(f"{it.source_id}: {e}") from None
    return np.stack(arrays), np.array([it.label for it in items], dtype=np.int64)
