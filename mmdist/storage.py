"""Local folders and object storage (s3://) behind one small set of functions.

Everything goes through fsspec (s3fs for s3://, gcsfs for gs://), which reads each service's
standard settings and credential chain (for S3: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_PROFILE,
instance roles). Retries are the client's own: every S3 call retries through botocore's retry
configuration (``retry_config``), not a loop of ours. Errors become one ArtifactError line that
names the URI without credentials. Writes are atomic: a local file is written to a hidden
temporary file beside its target and renamed; an object appears whole when its single PUT
completes. Artifacts are published by writing their manifest last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import unicodedata
import urllib.parse
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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
    """Turn client errors into one clear line that names the URI (never its credentials).

    The storage client has already retried what its retry configuration calls transient; what
    reaches here is final. A missing file stays a FileNotFoundError for callers that expect it.
    """
    where = redact(uri)
    try:
        yield
    except (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError):
        raise
    except PermissionError as e:
        raise ArtifactError(f"{where}: permission denied ({short_error(e)})") from None
    except OSError as e:
        raise ArtifactError(f"{where}: storage error ({short_error(e)})") from None
    except Exception as e:  # botocore / aiohttp / google-auth errors share no base class with OSError
        name = type(e).__name__
        if "Credentials" in name or name in {"DefaultCredentialsError", "RefreshError"}:
            raise ArtifactError(f"{where}: no usable credentials for this storage (the client's credential "
                                "chain: environment, profile, instance role or service account)") from None
        if name in {"EndpointConnectionError", "ClientConnectorError", "ConnectTimeoutError", "ConnectionClosedError",
                    "ClientError", "ReadTimeoutError", "ServerDisconnectedError", "HttpError"}:
            raise ArtifactError(f"{where}: cannot reach the storage service after the client's retries "
                                f"({name}: {short_error(e)})") from None
        raise


def short_error(e: BaseException) -> str:
    """The first line of an exception message, capped, with any URI credentials removed."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return re.sub(r"[a-z][a-z0-9+.-]*://\S+", lambda m: redact(m.group(0)), text)[:200]


def retry_config() -> dict[str, Any]:
    """botocore's retry settings for S3: standard mode (exponential backoff with jitter, up to 20 s
    a wait), 10 attempts, unless AWS_RETRY_MODE / AWS_MAX_ATTEMPTS say otherwise.

    10 attempts ride through an outage of about a minute; every s3fs call goes through them.
    """
    return {"mode": os.environ.get("AWS_RETRY_MODE", "standard"),
            "total_max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "10"))}


def _client_options(uri: str) -> dict[str, Any]:
    """fsspec options for ``uri``: the client's own retry configuration where it has one."""
    if uri.startswith(("s3://", "s3a://")):
        return {"config_kwargs": {"retries": retry_config()}}
    return {}


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it."""
    with _storage_errors(uri):
        fs, path = fsspec.core.url_to_fs(uri, **_client_options(uri))
    if "config_kwargs" in _client_options(uri):
        # s3fs wraps each call in a loop of its own (5 tries) around botocore's: one policy, not 5 x N
        fs.retries = 1
    return fs, path


def exists(uri: str) -> bool:
    """Whether a file or folder exists."""
    fs, path = filesystem(uri)
    with _storage_errors(uri):
        return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    """Read a whole file."""
    fs, path = filesystem(uri)
    with _storage_errors(uri):
        return fs.cat_file(path)


def read_many(uris: list[str], threads: int = 16) -> list[bytes | Exception]:
    """Read many whole files, in order; a file that cannot be read gives its error in its place
    (the caller knows which item it was and names it).

    On object storage ``threads`` GETs are in flight at once: each takes tens of milliseconds, so
    one at a time the 50,000 images of an ImageNet-1K set at IPC 50 take the better part of an
    hour to read. A local disk is read one file at a time.
    """
    def one(uri: str) -> bytes | Exception:
        try:
            return read_bytes(uri)
        except (OSError, ArtifactError) as e:
            return e

    if len(uris) < 2 or not is_remote(uris[0]):
        return [one(u) for u in uris]
    with ThreadPoolExecutor(min(threads, len(uris))) as pool:
        return list(pool.map(one, uris))


def write_many(files: dict[str, bytes], threads: int = 16) -> None:
    """Write many whole files atomically, as ``write_bytes`` does; the first error is raised once
    every write has ended.

    On object storage ``threads`` PUTs are in flight at once (a class of 50 images is 50 round
    trips); a local disk is written one file at a time.
    """
    items = list(files.items())
    if len(items) < 2 or not is_remote(items[0][0]):
        for uri, data in items:
            write_bytes(uri, data)
        return
    with ThreadPoolExecutor(min(threads, len(items))) as pool:
        for future in [pool.submit(write_bytes, uri, data) for uri, data in items]:
            future.result()


@contextlib.contextmanager
def open_read(uri: str) -> Iterator[Any]:
    """A binary file object for reading; storage errors become one ArtifactError line."""
    fs, path = filesystem(uri)
    with _storage_errors(uri), fs.open(path, "rb") as f:
        yield f


TEMP = re.compile(r"^\..+\.tmp-[0-9a-f]{8}$")  # a local write in progress, or left by a killed writer


def write_bytes(uri: str, data: bytes, exclusive: bool = False) -> None:
    """Write a whole file atomically (readers see the old file or the new one, never a part).

    Locally the bytes go to a hidden temporary file beside the target (``.<name>.tmp-<hex>``), then
    are renamed; a writer killed in between leaves that file, which ``remove_temp_files`` sweeps
    before an artifact is published. On object storage one PUT is atomic. ``exclusive`` fails with
    FileExistsError if the file exists (a conditional PUT on S3).
    """
    fs, path = filesystem(uri)
    if is_remote(uri):
        with _storage_errors(uri):
            if exclusive:
                try:
                    fs.pipe_file(path, data, mode="create")
                except FileExistsError:
                    raise FileExistsError(redact(uri)) from None
            else:
                fs.pipe_file(path, data)
        return
    with _storage_errors(uri):
        folder, name = os.path.split(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if exclusive:
                os.link(tmp, path)  # fails if the target exists: an atomic create
            else:
                os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def remove_temp_files(folder: str) -> int:
    """Remove temporary files left by killed writers under a local folder; returns how many."""
    if is_remote(folder) or not os.path.isdir(folder):
        return 0
    removed = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            if TEMP.match(name):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(dirpath, name))
                    removed += 1
    return removed


def keep_only(folder: str, names: set[str]) -> list[str]:
    """Remove every entry of ``folder`` not named in ``names`` (temp files of killed writers, images
    beyond a smaller IPC); returns the names removed."""
    extra = [n for n in listdir(folder) if n not in names]
    for name in extra:
        remove(join(folder, name))
    return extra


def read_json(uri: str) -> Any:
    """Read a JSON file; ArtifactError if it is not valid JSON (a damaged or foreign file)."""
    data = read_bytes(uri)
    try:
        return json.loads(data)
    except ValueError as e:
        raise ArtifactError(f"{redact(uri)}: not valid JSON ({e.__class__.__name__}: {str(e)[:80]})") from None


def write_json(uri: str, obj: Any, exclusive: bool = False) -> None:
    """Write a JSON file atomically."""
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), exclusive)


def listdir(uri: str) -> list[str]:
    """Names (not paths) of the entries in a folder, sorted; [] if it does not exist."""
    fs, path = filesystem(uri)
    with _storage_errors(uri):
        # fresh, not s3fs's listing cache: a cached listing of a parent answers "absent" for a
        # folder created since (other processes write here)
        fs.invalidate_cache(path)
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
        # Arrow's own S3 client (Ray Data, Ray Train) retries with its default standard strategy
        with _storage_errors(uri):
            return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


_HASHED = re.compile(r"-[0-9a-f]{8}$")


def safe_name(name: str) -> str:
    """A folder/file name for a class name that cannot escape its parent folder.

    A name is kept as it is only if it is plain: letters, digits and ``._-``, no uppercase, at
    most 100 bytes, and not ending like a hashed name. Anything else (``/``, ``..``, spaces,
    uppercase, long or unnormalised names) is cleaned, capped, and given a hash of the original,
    so two class names never map to one folder, also on a case-insensitive disk, and a name
    crafted to look like another's hashed form gets a hash of its own.
    """
    norm = unicodedata.normalize("NFC", name)
    kept = "".join(ch if (ch.isalnum() or ch in "._-") else "_" for ch in norm).strip(".")
    if kept and kept == name and kept == kept.casefold() and len(kept.encode()) <= 100 and not _HASHED.search(kept):
        return kept
    head = kept.encode()[:80].decode(errors="ignore").rstrip(".") or "class"
    return f"{head}-{hashlib.sha1(name.encode(errors='surrogatepass')).hexdigest()[:8]}"
