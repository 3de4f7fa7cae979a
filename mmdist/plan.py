"""`mmdist plan`: what `mmdist run` would do with this config, read from the artifacts, running nothing.

Each stage is one of:
- ``done``    complete and made by this config: `run` skips it;
- ``current`` started by this config and not finished: `run` resumes it (finished shards,
  checkpoints, classes, trials are kept);
- ``stale``   complete but made by another config (the changed fields are listed): `run` refuses
  it unless --overwrite;
- ``to do``   nothing of it yet, or an upstream stage must run first.
"""

from __future__ import annotations

import difflib
from typing import Any

from mmdist import artifacts, run, schema, storage
from mmdist.config import Config, to_dict
from mmdist.errors import ConfigError


def upstream_kinds(cfg: Config, stage: str) -> list[str]:
    """The stages whose manifests a stage's fingerprint includes (as each stage's main() reads them)."""
    if stage == "encode":
        return []
    if stage == "finetune" and cfg.finetune.backbone == "pretrain":
        return ["encode", "pretrain"]
    if stage == "sample":
        return ["encode", "finetune"]
    if stage == "evaluate":
        from mmdist.config import is_generated

        return ["sample"] if any(is_generated(m) for m in cfg.evaluate.methods) else []
    return ["encode"]


def _count(uri: str, suffix: str) -> int:
    """Files ending in ``suffix`` directly under ``uri`` (0 if it does not exist)."""
    return sum(name.endswith(suffix) for name in storage.listdir(uri))


def _progress(cfg: Config, stage: str, folder: str, fp: str) -> str | None:
    """What an unfinished stage of this config has already written, or None."""
    if stage == "encode":
        n = _count(storage.join(folder, "shards"), ".parquet")
        return f"{n} shards written" if n else None
    if stage == "pretrain":
        started = storage.isdir(storage.join(folder, "ray", f"{stage}-{fp}"))  # Ray Train's run folder
        return "resumes from its last checkpoint" if started else None
    if stage == "finetune":  # one Ray Train run per variant, under finetune/<method>/
        n = sum(storage.isdir(storage.join(folder, v, "ray")) for v in storage.listdir(folder))
        return f"{n} variant(s) started, resumed from their checkpoints" if n else None
    if stage == "sample":
        n = sum(_count(storage.join(folder, v, "classes"), ".json") for v in ("minimax", "diffusion"))
        return f"{n} classes sampled" if n else None
    n = _count(storage.join(folder, "trials"), ".json")
    return f"{n} trial results written" if n else None


def stage_states(cfg: Config, only: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per planned stage (or per stage in ``only``): stage, state, folder and a detail."""
    unknown = [s for s in only or [] if s not in run.STAGES]
    if unknown:
        close = difflib.get_close_matches(unknown[0], run.STAGES, 1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown stage {unknown[0]!r}{hint}; stages: {', '.join(run.STAGES)}")
    stages = run.planned_stages(cfg)
    manifests: dict[str, dict[str, Any]] = {}  # stages found complete and current
    rows = []
    for stage in run.STAGES:
        folder = artifacts.stage_dir(cfg, stage)
        if stage not in stages:
            if stage in (only or []):
                rows.append({"stage": stage, "state": "unused", "folder": folder, "detail": "not run by this config"})
            if storage.exists(storage.join(folder, schema.MANIFEST)):  # given latents (cfg.latents)
                manifests[stage] = storage.read_json(storage.join(folder, schema.MANIFEST))
            continue
        uri = storage.join(folder, schema.MANIFEST)
        manifest = storage.read_json(uri) if storage.exists(uri) else None
        waiting = [k for k in upstream_kinds(cfg, stage) if k not in manifests]
        if waiting:
            state, detail = "to do", f"after {waiting[-1]}"
        else:
            ups = [manifests[k] for k in upstream_kinds(cfg, stage)]
            if stage == "finetune":  # its upstream includes the backbone's weights
                from mmdist.finetune import upstream_manifests

                ups = upstream_manifests(cfg)
            if stage == "evaluate":  # its own fingerprint: adding a row reruns only that row's trials
                from mmdist.evaluate import fingerprint

                fp = fingerprint(cfg, ups)
            else:
                fp = artifacts.fingerprint(cfg, stage, ups)
            if manifest and manifest.get("fingerprint") == fp:
                state, detail = "done", manifest.get("created", "")
                manifests[stage] = manifest
            elif manifest:
                changed = changes(manifest.get("config", {}), to_dict(cfg), artifacts.SECTIONS[stage])
                state = "stale"
                detail = (f"changed: {', '.join(changed[:4])}" if changed else artifacts.upstream_changed(stage)) + (
                    "; redone (--overwrite)" if cfg.overwrite else "; --overwrite redoes it")
            else:
                progress = _progress(cfg, stage, folder, fp)
                state, detail = ("current", progress) if progress else ("to do", "")
        if only is None or stage in only:
            rows.append({"stage": stage, "state": state, "folder": folder, "detail": detail})
    return rows


def changes(old: dict, new: dict, sections: tuple[str, ...]) -> list[str]:
    """'field: old -> new' for each config field that differs within ``sections``."""
    out = []
    for name in artifacts._changed_fields(old, new, sections):
        a, b = old, new
        for part in name.split("."):
            a = a.get(part) if isinstance(a, dict) else None
            b = b.get(part) if isinstance(b, dict) else None
        out.append(f"{name} {a!r} -> {b!r}")
    return out


def main(cfg: Config, only: list[str] | None = None) -> list[dict[str, Any]]:
    """Print the plan as a table; returns its rows."""
    rows = stage_states(cfg, only)
    width = max(len(r["stage"]) for r in rows) if rows else 5
    print(f"plan for {cfg.output}:")
    for r in rows:
        print(f"  {r['stage']:<{width}}  {r['state']:<7}  {r['detail']}".rstrip())
    return rows
