"""The artifact layout under an output root, and the rules that make stages resumable.

    <output>/latents/   encode    shards/part-*.parquet, stats.safetensors
    <output>/pretrain/  pretrain  model/, model_ema/ (diffusers folders), ray/ (checkpoints)
    <output>/finetune/  finetune  model/, model_ema/, ray/
    <output>/samples/   sample    <variant>/images/<class>/<k>.png, parquet/, grid.png
    <output>/eval/      evaluate  results.{md,csv,json}, accuracy.png

Every folder gets config.json (the resolved config and git SHA) and, last, manifest.json. A stage
whose manifest exists with the same fingerprint is complete and skipped; with a different
fingerprint it is refused unless the user asks to overwrite it (then the whole folder is
replaced), so nothing is lost silently. A stage that runs holds a lease on its folder
(<folder>.lease) from ``existing`` to ``publish``, so two runs never write one folder.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from mmdist import schema, storage
from mmdist.config import Config, to_dict
from mmdist.errors import ArtifactError

log = logging.getLogger("mmdist")

FOLDERS = {"encode": "latents", "pretrain": "pretrain", "finetune": "finetune", "sample": "samples",
           "evaluate": "eval"}
# config sections each stage's result depends on (upstream stages add their own fingerprints);
# evaluate reads the real data itself (random and full rows, the test split, the teacher's data)
SECTIONS = {"encode": ("data", "encode"), "pretrain": ("pretrain",), "finetune": ("finetune",),
            "sample": ("sample",), "evaluate": ("data", "evaluate")}


def stage_dir(cfg: Config, stage: str) -> str:
    """The folder of a stage's artifact (an evaluation on the validation split is eval-val/)."""
    if stage == "encode" and cfg.latents:
        return cfg.latents
    if stage == "evaluate" and cfg.evaluate.split == "val":
        return storage.join(cfg.output, FOLDERS[stage] + "-val")
    return storage.join(cfg.output, FOLDERS[stage])


def fingerprint(cfg: Config, stage: str, upstream: list[dict[str, Any]] = ()) -> str:
    """Hash of the stage's config sections and the fingerprints of the artifacts it consumed."""
    import hashlib

    own = cfg.fingerprint(*SECTIONS[stage])
    text = "|".join([stage, own, *[m["fingerprint"] for m in upstream]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def folder_fingerprint(folder: str) -> dict[str, str]:
    """An upstream entry for a folder that is not an artifact of ours (names and sizes of its files)."""
    import hashlib

    fs, path = storage.filesystem(folder)
    listing = sorted((name[len(path):], int(info.get("size") or 0))
                     for name, info in fs.find(path, detail=True).items())
    return {"fingerprint": hashlib.sha256(repr(listing).encode()).hexdigest()[:16]}


def existing(folder: str, kind: str, fp: str, cfg: Config, overwrite: bool = False) -> dict[str, Any] | None:
    """The manifest if the stage is complete and current; None if it must (re)run.

    A stage that must run first takes the lease on its folder (``lease``), so a second writer is
    refused. A complete artifact made by a different config is an error unless ``overwrite``:
    then the whole folder is removed (stale shards, images and checkpoints with it) and the stage
    reruns from nothing.
    """
    manifest = _current(folder, kind, fp)
    if manifest is not None:
        return manifest
    lease(folder, kind)
    manifest = _current(folder, kind, fp)  # another writer may have published while we waited
    if manifest is not None:
        release(folder)
        return manifest
    uri = storage.join(folder, schema.MANIFEST)
    if not storage.exists(uri):
        return None
    if overwrite:
        log.warning("%s: --overwrite: removing the %s made by a different config", storage.redact(folder), kind)
        storage.remove(folder)
        return None
    release(folder)
    old = storage.read_json(uri)
    changed = _changed_fields(old.get("config", {}), to_dict(cfg, results_only=True), SECTIONS[kind])
    hint = f" (changed: {', '.join(changed[:6])})" if changed else f" ({upstream_changed(kind)})"
    raise ArtifactError(
        f"{folder} holds a finished {kind} made with a different config{hint}; "
        "pass --overwrite to redo it, or choose another --output")


def upstream_changed(kind: str) -> str:
    """Why an artifact whose own config is unchanged is stale."""
    return "an upstream stage or the backbone's weights changed" if kind == "finetune" else "an upstream stage changed"


def _current(folder: str, kind: str, fp: str) -> dict[str, Any] | None:
    """The folder's manifest if it is of ``kind`` with fingerprint ``fp``."""
    uri = storage.join(folder, schema.MANIFEST)
    if not storage.exists(uri):
        return None
    manifest = storage.read_json(uri)
    return manifest if manifest.get("kind") == kind and manifest.get("fingerprint") == fp else None


# ----------------------------------------------------------------------------------------------
# Leases: one writer per stage folder
# ----------------------------------------------------------------------------------------------

LEASE_SECONDS = 120.0  # a holder that has not renewed for this long is presumed dead
_HELD: dict[str, tuple[dict[str, Any], threading.Event]] = {}  # lease URI -> (our lease, stop renewing)
_HELD_LOCK = threading.Lock()


def lease_uri(folder: str) -> str:
    """Where a stage folder's lease lives: beside it, so the published folder holds only its files."""
    return folder.rstrip("/\\") + ".lease"


def lease(folder: str, kind: str) -> None:
    """Take the lease on a stage's output folder for this process, or refuse naming its holder.

    A lease is a small JSON file beside the folder, created only if absent (an exclusive create on
    a local disk, a conditional PUT on S3) and renewed by a background thread every quarter of
    ``LEASE_SECONDS``. It ends when ``release`` removes it (``publish`` does) or when its holder
    dies: at once on the same host (the holder's process is gone), else ``LEASE_SECONDS`` after
    the last renewal (hosts' clocks must agree to within that). Re-taking a lease this process
    holds is a no-op.
    """
    uri = lease_uri(folder)
    with _HELD_LOCK:
        if uri in _HELD:
            return
        mine = {"holder": f"{socket.gethostname()}:{os.getpid()}", "host": socket.gethostname(), "pid": os.getpid(),
                "stage": kind, "token": uuid.uuid4().hex, "since": time.time(), "renewed": time.time()}
        for _ in range(3):
            try:
                storage.write_json(uri, mine, exclusive=True)
                break
            except FileExistsError:
                held = _read_lease(uri)
                if held is not None and _alive(held):
                    raise ArtifactError(_held_message(folder, held)) from None
                log.warning("%s: taking over the lease of %s, which is dead or expired", storage.redact(folder),
                            (held or {}).get("holder", "an unreadable lease"))
                storage.remove(uri)
        else:
            raise ArtifactError(f"{folder}: could not take its lease (another writer keeps taking it)")
        stop = threading.Event()
        _HELD[uri] = (mine, stop)
    threading.Thread(target=_renew, args=(uri, mine, stop), daemon=True, name=f"lease {kind}").start()


def release(folder: str) -> None:
    """Give up this process's lease on ``folder`` (no-op if not held)."""
    uri = lease_uri(folder)
    with _HELD_LOCK:
        held = _HELD.pop(uri, None)
    if held is None:
        return
    mine, stop = held
    stop.set()
    current = _read_lease(uri)
    if current is not None and current.get("token") == mine["token"]:
        storage.remove(uri)


def release_all() -> None:
    """Give up every lease this process holds: a stage that failed leaves its folder free for the
    rerun at once, not after ``LEASE_SECONDS`` (or never, in a driver that goes on running)."""
    with _HELD_LOCK:
        uris = list(_HELD)
    for uri in uris:
        release(uri.removesuffix(".lease"))


@contextlib.contextmanager
def leases_back_on_failure() -> Iterator[None]:
    """Around a stage: if it fails or is refused, its leases go back at once (``release_all``).

    An interrupt is let through untouched: the process ends, and a dead holder's lease is taken
    over by the next run at once.
    """
    try:
        yield
    except Exception:
        release_all()
        raise


def _renew(uri: str, mine: dict[str, Any], stop: threading.Event) -> None:
    """Background thread: rewrite the lease's renewal time until released."""
    while not stop.wait(LEASE_SECONDS / 4):
        current = _read_lease(uri)
        if current is None or current.get("token") != mine["token"]:
            log.error("%s: this run's lease was taken over by %s; its output may be mixed",
                      storage.redact(uri), (current or {}).get("holder", "nobody"))
            return
        try:
            storage.write_json(uri, {**mine, "renewed": time.time()})
        except ArtifactError as e:  # a storage outage: try again at the next renewal
            log.warning("lease renewal failed: %s", e)


def _read_lease(uri: str) -> dict[str, Any] | None:
    """The lease at ``uri``, or None if there is none or it is unreadable."""
    try:
        held = storage.read_json(uri)
    except (FileNotFoundError, ArtifactError):
        return None
    return held if isinstance(held, dict) else None


def _alive(held: dict[str, Any]) -> bool:
    """Whether a lease's holder is still running: renewed lately, and its process exists if on this host."""
    if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int):
        try:
            os.kill(held["pid"], 0)
        except ProcessLookupError:
            return False  # died without releasing (killed, or a crash): no need to wait for expiry
        except PermissionError:  # another user's live process
            pass
    renewed = held.get("renewed")
    return isinstance(renewed, (int, float)) and time.time() - renewed < LEASE_SECONDS


def _held_message(folder: str, held: dict[str, Any]) -> str:
    """The one-line refusal naming the lease's holder."""
    since = datetime.datetime.fromtimestamp(held.get("since", 0), datetime.timezone.utc).isoformat(timespec="seconds")
    return (f"{storage.redact(folder)} is being written by another run ({held.get('holder')}, "
            f"{held.get('stage')} stage, since {since}); wait for it to finish or choose another --output")


def _changed_fields(old: dict, new: dict, sections: tuple[str, ...], prefix: str = "") -> list[str]:
    """Dotted names of the leaf fields of ``new`` (within sections) whose values ``old`` does not hold."""
    out = []
    for key in sections if not prefix else sorted(new):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_fields(a, b, tuple(b), f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


@functools.lru_cache(maxsize=1)
def git_sha() -> str:
    """The git commit of the code that ran (or 'unknown' outside a checkout)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def publish(folder: str, kind: str, fp: str, cfg: Config, **fields: Any) -> dict[str, Any]:
    """Sweep temp files, write config.json, then manifest.json last (the artifact becomes visible
    to readers), then release the folder's lease."""
    storage.makedirs(folder)
    swept = storage.remove_temp_files(folder)
    if swept:
        log.warning("%s: removed %d temporary files left by killed writers", storage.redact(folder), swept)
    storage.write_json(storage.join(folder, schema.CONFIG), {"config": to_dict(cfg), "git_sha": git_sha()})
    manifest = {
        "kind": kind,
        "fingerprint": fp,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "config": to_dict(cfg),
        **fields,
    }
    storage.write_json(storage.join(folder, schema.MANIFEST), manifest)
    release(folder)
    return manifest


def require(folder: str, kind: str) -> dict[str, Any]:
    """The manifest of a finished upstream artifact, or a clear error."""
    from mmdist.shards import load_manifest

    try:
        return load_manifest(folder, kind)
    except ArtifactError as e:
        raise ArtifactError(f"{e} (run `mmdist {kind}` first, or `mmdist run`)") from None
