"""Model folders on any storage, as the node that needs one sees them.

Every node names a model the same way (``backbone_ref``: 'embedded', a hub id, a local folder or
a URI on object storage) and loads it from where it is on *its own* disk (``resolve``): a folder
on object storage is copied to a node-local cache keyed by the folder's content, so no remote
task or actor is ever handed a path that exists only on the driver's node.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from mmdist import artifacts, storage
from mmdist.config import Config
from mmdist.errors import ArtifactError
from mmdist.models import diffusion

EMBEDDED_BACKBONE = os.path.join(os.path.dirname(__file__), "assets", "dit-fashion-mnist")


def local_folder(uri: str) -> str:
    """A local copy of a model folder on object storage; local paths pass through.

    The copy is keyed by the folder's content as listed now (every file's ETag, else its size and
    modification time), never by the URI alone: a folder rewritten in place (``finetune
    --overwrite``) gets a fresh copy instead of the old weights. Each node makes its own copy.
    """
    if not storage.is_remote(uri):
        return uri
    import hashlib
    import json

    fs, root, files = _listing(uri)
    if not any(name == "config.json" for name, _ in files):
        raise ArtifactError(f"{uri}: no config.json (not a model folder written by save_pretrained)")
    key = hashlib.sha256(json.dumps([uri, files]).encode()).hexdigest()[:20]
    target = os.path.join(os.path.expanduser("~"), ".cache", "mmdist", "models", key)
    if not os.path.isdir(target):
        tmp = f"{target}.tmp-{os.getpid()}"
        for name, _ in files:
            os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
            fs.get_file(f"{root}/{name}", os.path.join(tmp, name))
        try:
            os.replace(tmp, target)
        except OSError:  # another process on this node published the same content first
            storage.remove(tmp)
    return target


def _listing(uri: str) -> tuple[Any, str, list[tuple[str, str]]]:
    """(filesystem, root, sorted (relative name, version) of every file) of a folder, listed now."""
    import posixpath

    fs, path = storage.filesystem(uri)
    root = path.rstrip("/")
    fs.invalidate_cache(root)  # a listing cached by this process may predate an overwrite
    listing = fs.find(root, detail=True)
    files = sorted((posixpath.relpath(name, root), _version(entry)) for name, entry in listing.items())
    return fs, root, files


def _version(entry: dict[str, Any]) -> str:
    """What identifies a stored file's content: ETag (S3), hash (GCS), else size and mtime."""
    for k in ("ETag", "etag", "md5Hash", "crc32c"):
        if entry.get(k):
            return str(entry[k])
    return f"{entry.get('size')}-{entry.get('LastModified') or entry.get('mtime') or entry.get('updated')}"


def backbone_ref(cfg: Config) -> tuple[str, str | None]:
    """The backbone as any node can name it: 'embedded', the pretrain output's URI, a hub id or a URI."""
    b = cfg.finetune.backbone
    if b == "pretrain":
        folder = artifacts.stage_dir(cfg, "pretrain")
        artifacts.require(folder, "pretrain")
        return storage.join(folder, "model_ema"), None
    return b, cfg.finetune.backbone_subfolder


def backbone_upstream(cfg: Config) -> list[dict[str, str]]:
    """The backbone's own entry in the finetune fingerprint: what its weights are, not its name.

    'embedded' is hashed by the shipped files' bytes (a release that replaces the asset makes old
    fine-tunes stale; a reinstall does not); a folder here or on object storage by its listing
    (every file's ETag, else size and modification time: rewritten in place, it is a new backbone).
    The pretrain stage's manifest covers 'pretrain'. A hub id counts by its name only: hashing its
    files would mean downloading them on the driver.
    """
    if cfg.finetune.backbone == "pretrain":
        return []
    ref, subfolder = backbone_ref(cfg)
    if ref == "embedded":
        return [{"fingerprint": _digest(EMBEDDED_BACKBONE)}]
    if not (storage.is_remote(ref) or os.path.isdir(ref)):
        return []
    import hashlib
    import json

    _, _, files = _listing(storage.join(ref, subfolder) if subfolder else ref)
    return [{"fingerprint": hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]}]


@functools.lru_cache(maxsize=4)
def _digest(folder: str) -> str:
    """The bytes of a packaged model folder (8 MB: hashed once per process)."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name == "provenance.json":  # how it was made, not what it is
            continue
        digest.update(name.encode())
        with open(os.path.join(folder, name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def resolve(ref: str, subfolder: str | None = None) -> tuple[str, str | None]:
    """Where *this* process loads a model from: the packaged embedded DiT, this node's copy of a
    remote folder, or the hub id / local folder as given (with its subfolder)."""
    if ref == "embedded":
        return EMBEDDED_BACKBONE, None
    if storage.is_remote(ref):
        return local_folder(storage.join(ref, subfolder) if subfolder else ref), None
    return ref, subfolder


def model_config(ref: str, subfolder: str | None = None) -> dict[str, Any]:
    """A DiT's config.json without its weights (read in place on object storage)."""
    if storage.is_remote(ref):
        return storage.read_json(storage.join(ref, *([subfolder] if subfolder else []), "config.json"))
    return diffusion.dit_config(*resolve(ref, subfolder))


def backbone_source(cfg: Config) -> tuple[str, str | None]:
    """(hub id or local folder, subfolder) of the backbone, as this process loads it."""
    return resolve(*backbone_ref(cfg))


def put_folder(local: str, uri: str) -> None:
    """Copy a local folder's files to ``uri`` (each file written atomically)."""
    for name in sorted(os.listdir(local)):
        with open(os.path.join(local, name), "rb") as f:
            storage.write_bytes(storage.join(uri, name), f.read())
