"""Local folders and object storage (s3://) behind one small set of functions.

Everything goes through fsspec (s3fs for s3://), which reads the standard AWS settings:
AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, instance roles. Writes
are atomic: a local file is written beside its target and renamed; an S3 object appears whole
when its single PUT completes. Artifacts are published by writing their manifest last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import time
import unicodedata
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import fsspec

from mmdist.errors import ArtifactError

_REMOTE = re.compile(r"^[a-z][a-z0-9+.-]*://")


def is_remote(uri: str) -> bool:
    """True for URLs such as s3://bucket/key."""
    return bool(_REMOTE.match(uri)) and not uri.startswith("file://")


_SIGNED_QUERY = re.compile(r"(^|&)(x-amz-(credential|signature|security-token)|sig|signature|token|"
                           r"access_?key|secret|password)=", re.I)


def credentials_in(uri: str) -> str | None:
    """Where a URI carries credentials ('user info' before '@', or a signed 'query'), else None."""
    if "://" not in uri:
        return None
    parts = urllib.parse.urlsplit(uri)
    if "@" in parts.netloc:
        return "user info"
    if _SIGNED_QUERY.search(parts.query):
        return "query"
    return None


def redact(uri: str) -> str:
    """``uri`` without user info or query, for log lines and error messages."""
    if "://" not in uri:
        return uri
    parts = urllib.parse.urlsplit(uri)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def join(root: str, *parts: str) -> str:
    """Join path parts with '/' for URLs and the OS separator for local paths."""
    if is_remote(root):
        return posixpath.join(root, *parts)
    return os.path.join(root, *parts)


@contextlib.contextmanager
def _storage_errors(uri: str) -> Iterator[None]:
    """Turn client errors into one clear line that names the URI (never the credentials)."""
    try:
        yield
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise
    except PermissionError as e:
        raise ArtifactError(f"{uri}: permission denied ({_short(e)})") from None
    except OSError as e:
        raise ArtifactError(f"{uri}: storage error ({_short(e)})") from None
    except Exception as e:  # botocore / aiohttp errors do not share a base class with OSError
        name = type(e).__name__
        if name in {"NoCredentialsError", "PartialCredentialsError"}:
            raise ArtifactError(f"{uri}: no credentials found (set AWS_PROFILE or AWS_ACCESS_KEY_ID)") from None
        if name in {"EndpointConnectionError", "ClientConnectorError", "ConnectTimeoutError",
                    "ClientError", "ReadTimeoutError", "ServerDisconnectedError"}:
            raise ArtifactError(f"{uri}: cannot reach object storage ({name}: {_short(e)})") from None
        raise


def _short(e: BaseException) -> str:
    """The first line of an exception message, capped."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:200]


_TRANSIENT = ("cannot reach object storage",)


def _retrying(uri: str, fn: Callable[[], Any], attempts: int = 5) -> Any:
    """Run a storage call, retrying connection failures with backoff (0.5, 1, 2, 4 s).

    Rides through a short object-store outage; a longer one ends in the ArtifactError.
    """
    for attempt in range(attempts):
        try:
            with _storage_errors(uri):
                return fn()
        except ArtifactError as e:
            if attempt == attempts - 1 or not any(t in str(e) for t in _TRANSIENT):
                raise
            time.sleep(0.5 * 2 ** attempt)
    return None


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it."""
    with _storage_errors(uri):
        return fsspec.core.url_to_fs(uri)


def exists(uri: str) -> bool:
    """Whether a file or folder exists."""
    fs, path = filesystem(uri)
    with _storage_errors(uri):
        return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    """Read a whole file."""
    fs, path = filesystem(uri)
    return _retrying(uri, lambda: fs.cat_file(path))


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file atomically (readers see the old file or the new one, never a part)."""
    fs, path = filesystem(uri)
    if is_remote(uri):
        _retrying(uri, lambda: fs.pipe_file(path, data))
        return
    with _storage_errors(uri):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def read_json(uri: str) -> Any:
    """Read a JSON file."""
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    """Write a JSON file atomically."""
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def listdir(uri: str) -> list[str]:
    """Names (not paths) of the entries in a folder, sorted; [] if it does not exist."""
    fs, path = filesystem(uri)
    with _storage_errors(uri):
        if not fs.exists(path):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def isdir(uri: str) -> bool:
    """Whether ``uri`` is a folder (or a non-empty prefix on object storage)."""
    fs, path = filesystem(uri)
    with _storage_errors(uri):
        return fs.isdir(path)


def remove(uri: str) -> None:
    """Remove a file or a folder tree if it exists."""
    fs, path = filesystem(uri)
    with _storage_errors(uri):
        if fs.exists(path):
            fs.rm(path, recursive=True)


def makedirs(uri: str) -> None:
    """Create a local folder (object storage needs none)."""
    if not is_remote(uri):
        os.makedirs(uri, exist_ok=True)


def arrow_filesystem(uri: str) -> tuple[Any, str]:
    """A pyarrow filesystem and path for Ray Data / Ray Train (native S3 client for s3://)."""
    import pyarrow.fs as pafs

    if is_remote(uri):
        with _storage_errors(uri):
            return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def safe_name(name: str) -> str:
    """A folder/file name for a class name that cannot escape its parent folder.

    Letters, digits and ``._-`` are kept (unicode letters too); anything else (``/``, ``..``,
    spaces) is replaced, and a hash of the original is appended whenever the name changed, so
    two different class names never map to the same folder.
    """
    norm = unicodedata.normalize("NFC", name)
    kept = "".join(ch if (ch.isalnum() or ch in "._-") else "_" for ch in norm).strip(".")
    if kept != name or not kept:
        kept = f"{kept[:80] or 'class'}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return kept
