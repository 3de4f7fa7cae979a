"""Latent shards: Parquet files with fixed-shape tensor columns, plus the manifest that lists them.

A shard is written whole in one atomic write (a local rename, or one S3 PUT) and carries its own
statistics in the Parquet key-value metadata, so a resumed encode can trust finished shards
without redoing them. A reader trusts only the shards that a manifest lists; the manifest is
written last.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmdist import schema, storage
from mmdist.errors import ArtifactError

_META_KEY = b"mmdist"


def shard_name(index: int) -> str:
    """File name of shard ``index``."""
    return f"part-{index:05d}.parquet"


def _tensor_column(array: np.ndarray) -> pa.Array:
    """[N, C, H, W] numpy -> a fixed-shape tensor column (round-trips through Ray Data)."""
    if len(array) == 0:  # every image of the shard was skipped: Arrow builds no tensor from nothing
        value = pa.from_numpy_dtype(array.dtype)
        kind = pa.fixed_shape_tensor(value, array.shape[1:])
        return pa.ExtensionArray.from_storage(kind, pa.array([], pa.list_(value, int(np.prod(array.shape[1:])))))
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(array))


def encode_vector(v: np.ndarray) -> str:
    """A float64 vector as base64 text (for Parquet/JSON metadata)."""
    return base64.b64encode(np.asarray(v, dtype=np.float64).tobytes()).decode()


def decode_vector(text: str, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of ``encode_vector``."""
    return np.frombuffer(base64.b64decode(text), dtype=np.float64).reshape(shape)


def write_shard(uri: str, *, mean: np.ndarray, std: np.ndarray | None, labels: np.ndarray,
                class_names: list[str], source_ids: list[str], meta: dict[str, Any]) -> None:
    """Write one shard atomically, with ``meta`` (counts, sums, fingerprint) in its footer."""
    columns = {
        schema.LATENT_MEAN: _tensor_column(mean),
        schema.LABEL: pa.array(labels.astype(np.int64)),
        schema.CLASS_NAME: pa.array(class_names, pa.string()),
        schema.SOURCE_ID: pa.array(source_ids, pa.string()),
    }
    if std is not None:
        columns[schema.LATENT_STD] = _tensor_column(std)
    table = pa.table(columns).replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


def read_shard_meta(uri: str) -> dict[str, Any] | None:
    """The metadata of a finished shard, or None if it is missing, truncated or not ours.

    ``tensor_shape`` is the latent shape the Parquet schema itself declares (footer only), so a
    shard from another encode cannot pass on its metadata alone. Only the footer is read. A
    storage failure is not "missing": it raises (an ArtifactError naming the URI), so a resumed
    encode never redoes good shards, nor a check passes, because the store was briefly away.
    """
    try:
        footer = _footer(uri)
    except FileNotFoundError:
        return None
    if footer is None:
        return None
    try:
        file_schema = pq.read_schema(pa.BufferReader(footer))
        meta = json.loads((file_schema.metadata or {})[_META_KEY])
    except (KeyError, OSError, ValueError, TypeError, pa.ArrowException):  # JSONDecodeError is a ValueError
        return None
    if not isinstance(meta, dict):
        return None
    column = file_schema.field(schema.LATENT_MEAN).type if schema.LATENT_MEAN in file_schema.names else None
    meta["tensor_shape"] = list(column.shape) if isinstance(column, pa.FixedShapeTensorType) else None
    return meta


def _footer(uri: str) -> bytes | None:
    """A minimal Parquet file holding only ``uri``'s footer (schema and key-value metadata), or None."""
    with storage.open_read(uri) as f:
        size = f.seek(0, 2)
        if size < 12:
            return None
        f.seek(size - 8)
        tail = f.read(8)
        length = int.from_bytes(tail[:4], "little")
        if tail[4:] != b"PAR1" or length + 12 > size:
            return None
        f.seek(size - 8 - length)
        return b"PAR1" + f.read(length) + tail


def read_shard(uri: str) -> dict[str, np.ndarray]:
    """All columns of a shard as numpy arrays (tensors as [N, C, H, W]); ArtifactError if unreadable."""
    data = storage.read_bytes(uri)
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (OSError, pa.ArrowException) as e:
        raise ArtifactError(f"{storage.redact(uri)}: not a readable Parquet shard ({storage.short_error(e)})") from None
    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        out[name] = col.to_numpy_ndarray() if isinstance(col.type, pa.FixedShapeTensorType) else np.asarray(
            col.to_pylist() if col.type == pa.string() else col.to_numpy())
    return out


def load_manifest(folder: str, kind: str) -> dict[str, Any]:
    """The manifest of a finished artifact; ArtifactError if it is missing or of another kind."""
    uri = storage.join(folder, schema.MANIFEST)
    if not storage.exists(uri):
        raise ArtifactError(f"{folder}: no {schema.MANIFEST} — the {kind} stage has not finished there")
    manifest = storage.read_json(uri)
    if manifest.get("kind") != kind:
        raise ArtifactError(f"{folder}: holds a {manifest.get('kind')!r} artifact, expected {kind!r}")
    if not storage.exists(storage.join(folder, schema.CONFIG)):
        raise ArtifactError(f"{folder}: no {schema.CONFIG} beside the manifest; refusing an artifact of unknown origin")
    return manifest


def check_latents(manifest: dict[str, Any], *, shape: tuple[int, ...] | None = None,
                  num_model_classes: int | None = None, class_ids: list[int] | None = None) -> None:
    """Refuse latents that cannot train the model: shape, label range.

    Non-finite latents never reach a shard (encode drops and counts them as ``nonfinite_dropped``);
    one in a shard written by another tool stops training at its first step (``train_step``).
    """
    got = tuple(manifest["latent_shape"])
    if shape is not None and got != tuple(shape):
        raise ArtifactError(f"latent shape {list(got)} does not match the model's input {list(shape)} "
                            "(channels, height, width)")
    if num_model_classes is not None:
        ids = class_ids if class_ids is not None else list(range(len(manifest["classes"])))
        bad = [i for i in ids if not 0 <= i < num_model_classes]
        if bad:
            raise ArtifactError(f"class ids {bad[:5]} are outside the model's {num_model_classes} classes "
                                "(check data.model_class_ids)")
