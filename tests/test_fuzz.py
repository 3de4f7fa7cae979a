"""Property-based fuzzing (hypothesis) of every input mmdist reads, bounded in count and time.

Config: any value for any field is refused with one line naming the field, or accepted and
round-trips through YAML and JSON. Inputs: random and damaged bytes as images, odd image modes
and sizes, truncated Parquet shards and safetensors files, empty or foreign Parquet sources,
folders without classes: each is refused with an mmdist error, or read correctly; an encoded
shard accounts for every input image (kept or listed as skipped). No Ray: the functions the Ray
actors call are called directly. `pytest tests/test_fuzz.py --hypothesis-show-statistics` prints
the counts that docs/reliability.md reports.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import typing

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmdist import config as C
from mmdist import datasets, schema, shards, training
from mmdist.errors import ArtifactError, ConfigError, DataError, MmdistError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # PIL's notes on the damaged files

# bounded: each property runs a fixed number of examples, none may take more than its deadline
# (MMDIST_FUZZ_SCALE=0.1 for a quick look, 10 for a long hunt)
SCALE = float(os.environ.get("MMDIST_FUZZ_SCALE", "1"))
LOOSE = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
FAST = settings(max_examples=max(1, int(300 * SCALE)), deadline=2000, suppress_health_check=LOOSE)
SLOW = settings(max_examples=max(1, int(60 * SCALE)), deadline=5000, suppress_health_check=LOOSE)
ENCODE = settings(max_examples=max(1, int(25 * SCALE)), deadline=None, suppress_health_check=LOOSE)


# ----------------------------------------------------------------------------------------------
# Config: every field, random types and values
# ----------------------------------------------------------------------------------------------


def _leaf_names(cls=C.Config, prefix=""):
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _leaf_names(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


LEAVES = _leaf_names()
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.integers(-3, 300),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(-2, 2), st.text(max_size=12),
    st.sampled_from(["identity", "tiny", "convnet", "minimax", "random", "s3://b/k", "s3://k:s@b/x", "ddpm", "hard"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


def _set(raw, name, value):
    *parents, leaf = name.split(".")
    for p in parents:
        raw = raw[p]
    raw[leaf] = value


@FAST
@given(picks=st.lists(st.tuples(st.sampled_from(LEAVES), VALUES), min_size=1, max_size=3))
def test_any_values_for_any_fields_are_refused_in_one_line_or_round_trip(picks):
    raw = C.to_dict(C.Config())
    for name, value in picks:
        _set(raw, name, value)
    try:
        cfg = C.Config.from_dict(raw)
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg and len(msg) < 600, msg
        assert any(msg.startswith(n) or n.rsplit(".", 1)[-1] in msg for n, _ in picks), (picks, msg)
        assert "k:s@" not in msg  # a credential in a URI is never echoed, whatever field it was given to
        event(f"refused: {msg.split(':')[0].split('[')[0]}")
        return
    event("accepted")
    as_yaml = C.Config.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict(), allow_unicode=True)))
    as_json = C.Config.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert as_yaml == cfg and as_json == cfg


@FAST
@given(raw=VALUES)
def test_any_top_level_document_is_refused_in_one_line_or_accepted(raw):
    try:
        C.Config.from_dict(raw)
    except ConfigError as e:
        assert "\n" not in str(e)
        event("refused")
    else:
        event("accepted")


# ----------------------------------------------------------------------------------------------
# Images: random bytes, damaged files, odd modes and sizes
# ----------------------------------------------------------------------------------------------


def _encoded(mode: str, w: int, h: int, fmt: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    if mode in ("I;16", "I"):
        image = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16)).convert(mode)
    elif mode == "F":
        image = Image.fromarray(rng.random((h, w), dtype=np.float32))
    else:
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


# (mode, formats that can store it)
MODES = [("1", ["PNG", "BMP", "TIFF"]), ("L", ["PNG", "JPEG", "WEBP", "GIF"]), ("LA", ["PNG"]),
         ("P", ["PNG", "GIF", "BMP"]), ("RGB", ["PNG", "JPEG", "WEBP", "TIFF"]), ("RGBA", ["PNG", "WEBP", "TIFF"]),
         ("CMYK", ["JPEG", "TIFF"]), ("I;16", ["PNG", "TIFF"]), ("I", ["TIFF"]), ("F", ["TIFF"])]
IMAGES = st.one_of(*[st.builds(_encoded, st.just(m), st.integers(1, 300), st.integers(1, 300), st.sampled_from(fmts),
                               st.integers(0, 99)) for m, fmts in MODES])


def _damage(data: bytes, cut: float, flips: list[tuple[float, int]]) -> bytes:
    """Truncate at a fraction of the length and overwrite a few bytes."""
    out = bytearray(data[: max(0, int(len(data) * cut))])
    for where, value in flips:
        if out:
            out[int(where * (len(out) - 1))] = value
    return bytes(out)


DAMAGE = st.tuples(st.floats(0, 1), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=4))


@FAST
@given(image=IMAGES, size=st.sampled_from([8, 16, 28]), channels=st.sampled_from([1, 3]))
def test_every_image_mode_and_size_decodes_to_the_configured_shape(image, size, channels):
    w, h = Image.open(io.BytesIO(image)).size
    if max(w, h) > datasets.MAX_ASPECT * min(w, h):
        with pytest.raises(DataError, match="aspect ratio"):
            datasets.decode_image(image, size, channels)
        event("refused: aspect ratio")
        return
    out = datasets.decode_image(image, size, channels)
    assert out.dtype == np.uint8 and out.shape == (size, size, channels)
    event(f"decoded {Image.open(io.BytesIO(image)).mode}")


@FAST
@given(data=st.binary(max_size=2048) | st.tuples(IMAGES, DAMAGE).map(lambda t: _damage(t[0], *t[1])),
       channels=st.sampled_from([1, 3]))
def test_random_or_damaged_bytes_decode_or_are_refused_as_data_errors(data, channels):
    try:
        out = datasets.decode_image(data, 16, channels)
    except DataError as e:
        assert "\n" not in str(e)
        event(f"refused: {str(e).split('(')[0].strip()}")
    else:
        assert out.shape == (16, 16, channels)
        event("decoded (damage outside the pixels)")


def test_a_header_claiming_billions_of_pixels_is_refused_as_data():
    """A damaged header (the fuzz test above once met a TIFF claiming 16777349 x 180) makes PIL raise
    DecompressionBombError, which is not an OSError: it must still be one bad image, not a crash."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20_000, 20_000, 8, 0, 0, 0, 0))
    with pytest.raises(DataError, match="decompression-bomb limit"):
        datasets.decode_image(header + chunk(b"IEND", b""), 16, 1)


def test_an_extreme_aspect_ratio_is_refused_not_blown_up():
    """A 1 x 100000 PNG is small on disk but the centre crop would scale it to 2.8M x 28 pixels."""
    with pytest.raises(DataError, match="aspect ratio"):
        datasets.decode_image(_encoded("L", 100_000, 1, "PNG", 0), 28, 1)


# ----------------------------------------------------------------------------------------------
# Shards and safetensors: truncated and damaged
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shard_bytes(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("shard") / "part-00000.parquet")
    shards.write_shard(path, mean=np.ones((4, 1, 8, 8), np.float32), std=None, labels=np.arange(4),
                       class_names=list("abcd"), source_ids=list("wxyz"), meta={"fingerprint": "f", "rows": 4})
    return open(path, "rb").read()


@SLOW
@given(damage=DAMAGE)
def test_a_damaged_shard_is_missing_or_whole_never_a_crash(shard_bytes, damage, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bad") / "part-00000.parquet")
    data = _damage(shard_bytes, *damage)
    with open(path, "wb") as f:
        f.write(data)
    meta = shards.read_shard_meta(path)  # what a resumed encode and the training checks trust
    assert meta is None or meta["tensor_shape"] == [1, 8, 8]
    try:
        table = shards.read_shard(path)
    except ArtifactError as e:
        assert "\n" not in str(e)
        event("refused by read_shard")
        return
    assert len(table[schema.LABEL]) == 4
    event("read whole" if data == shard_bytes else "read despite damage (outside the data checked)")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real training checkpoint of a tiny DiT (trainable set difffit, minimax memories)."""
    from test_training import make_state

    state, _ = make_state()
    folder = str(tmp_path_factory.mktemp("ckpt"))
    training.save_checkpoint(state, folder)
    return folder, open(os.path.join(folder, training.STATE_FILE), "rb").read()


@SLOW
@given(damage=DAMAGE)
def test_a_damaged_checkpoint_is_corrupt_or_refused_never_half_loaded(checkpoint, damage, tmp_path_factory):
    import torch
    from test_training import make_state

    src, data = checkpoint
    folder = str(tmp_path_factory.mktemp("bad"))
    with open(os.path.join(folder, training.STATE_FILE), "wb") as f:
        f.write(_damage(data, *damage))
    with open(os.path.join(src, training.META_FILE)) as f, open(os.path.join(folder, training.META_FILE), "w") as g:
        g.write(f.read())
    state, _ = make_state(seed=1)
    before = {n: p.detach().clone() for n, p in state.trainable.items()}
    try:
        training.load_checkpoint(state, folder)
    except training.CorruptCheckpoint:
        event("corrupt: an older checkpoint is tried")
    except ArtifactError as e:
        assert "does not match the model" in str(e)
        event("refused: not this model")
    else:
        event("loaded")
        return
    assert state.step == 0 and all(torch.equal(before[n], p) for n, p in state.trainable.items())


# ----------------------------------------------------------------------------------------------
# Sources: empty, foreign or classless
# ----------------------------------------------------------------------------------------------


def _parquet(path, columns: dict):
    pq.write_table(pa.table(columns), path)
    return path


SOURCES = {
    "empty table": lambda d: _parquet(d / "t.parquet", {schema.IMAGE_BYTES: pa.array([], pa.binary()),
                                                        schema.CLASS_NAME: pa.array([], pa.string())}),
    "no class column": lambda d: _parquet(d / "t.parquet", {"pixels": [b"x"], "y": [1]}),
    "class column of ints": lambda d: _parquet(d / "t.parquet", {schema.IMAGE_BYTES: [b"x"], schema.CLASS_NAME: [3]}),
    "not Parquet": lambda d: (d / "t.parquet").write_bytes(b"PAR1 but not really") and d / "t.parquet",
    "empty folder": lambda d: d,
}


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_an_empty_or_foreign_parquet_source_is_one_data_error(kind, tmp_path):
    path = SOURCES[kind](tmp_path)
    cfg = C.DataConfig(source="parquet", train=str(path), channels=1, image_size=16)
    try:
        index = datasets.index_split(cfg, "train")
    except MmdistError as e:
        assert "\n" not in str(e)
        return
    # a source that indexes must load or refuse each image as a DataError
    for item in index.items:
        with pytest.raises(DataError):
            datasets.load_item(cfg, item)


@pytest.mark.parametrize("layout", ["no folders", "files only", "empty class folders"])
def test_an_image_folder_without_images_is_one_data_error(layout, tmp_path):
    if layout == "files only":
        (tmp_path / "a.png").write_bytes(b"x")
    if layout == "empty class folders":
        (tmp_path / "cat").mkdir()
        (tmp_path / "dog").mkdir()
    with pytest.raises(DataError) as e:
        datasets.index_split(C.DataConfig(source="imagefolder", train=str(tmp_path)), "train")
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------
# Encoding a shard of random files: every input is kept or listed, nothing lost
# ----------------------------------------------------------------------------------------------


@ENCODE
@given(files=st.lists(st.one_of(IMAGES, st.binary(max_size=64),
                                st.tuples(IMAGES, DAMAGE).map(lambda t: _damage(t[0], *t[1]))),
                      min_size=1, max_size=8))
def test_an_encoded_shard_accounts_for_every_input(files, tmp_path_factory):
    from mmdist.encode import ShardEncoder

    root = tmp_path_factory.mktemp("src")
    items = []
    for i, data in enumerate(files):
        (root / f"{i}.img").write_bytes(data)
        items.append(datasets.Item(f"c/{i}.img", "c", 0, uri=str(root / f"{i}.img")))
    cfg = C.Config(data=C.DataConfig(source="imagefolder", train=str(root), channels=3, image_size=8))
    encoder = ShardEncoder(cfg.to_dict(), str(root / "out"), "fp", 1.0)
    meta = encoder.encode_shard(0, [[it.source_id, it.class_name, it.label, it.uri, it.row] for it in items])
    written = shards.read_shard(str(root / "out" / "shards" / "part-00000.parquet"))
    kept = list(written[schema.SOURCE_ID])
    skipped = [s["source_id"] for s in meta["skipped"]]
    assert sorted(kept + skipped) == sorted(it.source_id for it in items)  # nothing lost, nothing twice
    assert meta["rows"] == len(kept) and np.isfinite(written[schema.LATENT_MEAN]).all()
    event(f"{len(skipped)} of {len(items)} skipped")
