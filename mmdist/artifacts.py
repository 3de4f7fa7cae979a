"""The artifact layout under an output root, and the rules that make stages resumable.

    <output>/latents/   encode    shards/part-*.parquet, stats.safetensors
    <output>/pretrain/  pretrain  model/, model_ema/ (diffusers folders), ray/ (checkpoints)
    <output>/finetune/  finetune  model/, model_ema/, ray/
    <output>/samples/   sample    <variant>/images/<class>/<k>.png, parquet/, grid.png
    <output>/eval/      evaluate  results.{md,csv,json}, accuracy.png

Every folder gets config.json (the resolved config and git SHA) and, last, manifest.json. A stage
whose manifest exists with the same fingerprint is complete and skipped; with a different
fingerprint it is refused unless the user asks to overwrite it, so nothing is lost silently.
"""

from __future__ import annotations

import datetime
import functools
import os
import subprocess
from typing import Any

from mmdist import schema, storage
from mmdist.config import Config, to_dict
from mmdist.errors import ArtifactError

FOLDERS = {"encode": "latents", "pretrain": "pretrain", "finetune": "finetune", "sample": "samples",
           "evaluate": "eval"}
# config sections each stage's result depends on (upstream stages add their own fingerprints)
SECTIONS = {"encode": ("data", "encode"), "pretrain": ("pretrain",), "finetune": ("finetune",),
            "sample": ("sample",), "evaluate": ("evaluate",)}


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


def existing(folder: str, kind: str, fp: str, cfg: Config, overwrite: bool = False) -> dict[str, Any] | None:
    """The manifest if the stage is complete and current; None if it must (re)run.

    A complete artifact made by a different config is an error unless ``overwrite`` (then its
    manifest is removed and the stage reruns over it).
    """
    uri = storage.join(folder, schema.MANIFEST)
    if not storage.exists(uri):
        return None
    manifest = storage.read_json(uri)
    if manifest.get("kind") == kind and manifest.get("fingerprint") == fp:
        return manifest
    if overwrite:
        storage.remove(uri)
        return None
    changed = _changed_fields(manifest.get("config", {}), to_dict(cfg), SECTIONS[kind])
    hint = f" (changed: {', '.join(changed[:6])})" if changed else " (an upstream stage changed)"
    raise ArtifactError(
        f"{folder} holds a finished {kind} made with a different config{hint}; "
        "pass --overwrite to redo it, or choose another --output")


def _changed_fields(old: dict, new: dict, sections: tuple[str, ...], prefix: str = "") -> list[str]:
    """Dotted names of leaf fields that differ between two config dicts, within sections."""
    out = []
    for key in sections if not prefix else sorted(set(old) | set(new)):
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
    """Write config.json, then manifest.json last: the artifact becomes visible to readers."""
    storage.makedirs(folder)
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
    return manifest


def require(folder: str, kind: str) -> dict[str, Any]:
    """The manifest of a finished upstream artifact, or a clear error."""
    from mmdist.shards import load_manifest

    try:
        return load_manifest(folder, kind)
    except ArtifactError as e:
        raise ArtifactError(f"{e} (run `mmdist {kind}` first, or `mmdist run`)") from None
