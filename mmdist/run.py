"""`mmdist run`: every stage in order, skipping those whose artifacts are complete and current."""

from __future__ import annotations

import importlib
import logging
import time
from typing import Any

from mmdist import artifacts, storage, tracking
from mmdist.config import Config

log = logging.getLogger("mmdist")

STAGES = ("encode", "pretrain", "finetune", "sample", "evaluate")


def planned_stages(cfg: Config) -> list[str]:
    """The stages this config needs: pretrain only when fine-tuning our own backbone."""
    out = []
    for stage in STAGES:
        if stage == "encode" and cfg.latents:
            continue
        if stage == "pretrain" and cfg.finetune.backbone != "pretrain":
            continue
        out.append(stage)
    return out


def main(cfg: Config, stages: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Run the (selected) stages; print a per-stage cost summary at the end."""
    todo = [s for s in planned_stages(cfg) if stages is None or s in stages]
    cfg.check_stages(todo)
    tracking.mlflow_uri(cfg)  # refuses a missing MLflow, or warns about an unreachable one, before any stage
    if "evaluate" in todo and cfg.evaluate.teacher:
        from mmdist.teacher import check_teacher

        check_teacher(cfg)  # a teacher that cannot label this data fails now, not after sampling
    results: dict[str, Any] = {}
    summary = []
    for stage in todo:
        start = time.time()
        log.info("stage %s: start", stage)
        module = importlib.import_module(f"mmdist.{stage}")
        with artifacts.leases_back_on_failure():
            results[stage] = module.main(cfg)
        manifest = results[stage]
        summary.append((stage, time.time() - start, manifest.get("wall_seconds", 0.0),
                        manifest.get("accelerator_seconds", 0.0)))
    print(cost_table(summary))
    if "evaluate" in results:
        print(results["evaluate"].get("table_markdown", ""))
        print(f"tables: {artifacts.stage_dir(cfg, 'evaluate')}")
    if "sample" in results:
        print(f"distilled images: {storage.join(artifacts.stage_dir(cfg, 'sample'), 'minimax', 'grid.png')}")
    return results


def cost_table(rows: list[tuple[str, float, float, float]]) -> str:
    """Markdown table of stage costs: wall time now (0 if skipped) and as recorded when made."""
    lines = ["| stage | this run (s) | when made (s) | accelerator-s |", "|---|---|---|---|"]
    for stage, now, made, accel in rows:
        lines.append(f"| {stage} | {now:.1f} | {made:.1f} | {accel:.1f} |")
    return "\n".join(lines)
