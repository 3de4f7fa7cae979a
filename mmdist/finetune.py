"""Stage 3 — finetune: minimax fine-tuning of a pretrained DiT (docs/method.md §1) on Ray Train.

Every weight of the embedded DiT by default (the recipes: the paper's DiffFit set; docs/method.md
§1.3), label dropout on, EMA kept; the two minimax terms are computed
over per-class memories that are all-gathered every step. Besides ``minimax`` (the paper), the
ablation rows of ``evaluate.methods`` are fine-tuned here too, each the same run with other loss
weights: ``finetune`` (both weights 0: what fine-tuning alone does), ``representativeness`` and
``diversity`` (one term only). Same seed, same data order, same noise: the rows are paired.

    <output>/finetune/<method>/model_ema/   a plain diffusers DiTTransformer2DModel (sampled)
    <output>/finetune/<method>/model/       the raw weights; ray/ (checkpoints); manifest.json
    <output>/finetune/manifest.json         the stage: every variant's fingerprint

Each variant is its own artifact: adding a row later trains only the new variant. With
``finetune.class_phases=K`` each variant is instead K-class phase models under
finetune/<method>/phases/<p>/, each its own artifact and Ray Train run (mmdist.phases).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from mmdist import artifacts, distributed, phases, schema, storage
from mmdist.config import FINETUNED_METHODS, Config, base_method

log = logging.getLogger("mmdist")


def variants(cfg: Config) -> list[str]:
    """The fine-tuned methods this run needs: minimax, then the ablations the evaluation lists."""
    wanted = {base_method(m) for m in cfg.evaluate.methods}
    return ["minimax"] + [m for m in FINETUNED_METHODS if m != "minimax" and m in wanted]


def variant_config(cfg: Config, method: str) -> Config:
    """The run's config with the fine-tuning of ``method`` (its loss weights)."""
    return dataclasses.replace(cfg, finetune=cfg.finetune.variant(method))


def variant_dir(cfg: Config, method: str) -> str:
    """Where the fine-tuned ``method`` lives."""
    return storage.join(artifacts.stage_dir(cfg, "finetune"), method)


def adopt(cfg: Config, model_dir: str, method: str = "minimax", note: str = "") -> dict[str, Any]:
    """Publish an existing diffusers DiT folder as the fine-tuned ``method``, without training.

    For a model fine-tuned elsewhere (and for tests and benchmarks that need a stand-in): the
    sample stage then draws from it as from one this stage trained.
    """
    from mmdist.model_folders import put_folder

    upstream = upstream_manifests(cfg, adopted=True)  # as main() computes it: main() then reuses this
    vcfg = variant_config(cfg, method)
    vfolder = variant_dir(cfg, method)
    for name in ("model", "model_ema"):
        put_folder(model_dir, storage.join(vfolder, name))
    vfp = artifacts.fingerprint(vcfg, "finetune", upstream)
    manifest = artifacts.publish(vfolder, "finetune", vfp, vcfg, method=method, model="model", model_ema="model_ema",
                                 backbone=model_dir, steps=0, history=[], note=note or "adopted, not trained here")
    summary = {method: {"fingerprint": vfp, "steps": 0, "note": manifest["note"]}}
    return artifacts.publish(artifacts.stage_dir(cfg, "finetune"), "finetune",
                             artifacts.fingerprint(cfg, "finetune", upstream), cfg, variants=summary)


def upstream_manifests(cfg: Config, adopted: bool = False) -> list[dict[str, Any]]:
    """What the stage's fingerprint covers beside its config: the latents and the backbone's weights.

    ``adopted``: for a model adopted instead of trained, a pretrain stage that never ran is no
    input (it is one if it did run: main() would then see the same list)."""
    from mmdist.model_folders import backbone_upstream

    upstream = [artifacts.require(artifacts.stage_dir(cfg, "encode"), "encode"), *backbone_upstream(cfg)]
    pretrained = artifacts.stage_dir(cfg, "pretrain")
    if cfg.finetune.backbone == "pretrain":
        if not adopted or storage.exists(storage.join(pretrained, schema.MANIFEST)):
            upstream.append(artifacts.require(pretrained, "pretrain"))
    return upstream


def main(cfg: Config) -> dict[str, Any]:
    """Fine-tune every variant not yet current, then publish the stage's manifest."""
    folder = artifacts.stage_dir(cfg, "finetune")
    upstream = upstream_manifests(cfg)
    latents = upstream[0]
    fp = artifacts.fingerprint(cfg, "finetune", upstream)  # covers every variant's loss weights
    stage = artifacts.existing(folder, "finetune", fp, cfg, cfg.overwrite)
    done = dict(stage.get("variants", {})) if stage else {}
    if stage and set(variants(cfg)) <= set(done):
        log.info("finetune: %s is complete, skipping", folder)
        return stage
    for method in variants(cfg):
        if method in done:
            continue
        vcfg = variant_config(cfg, method)
        vfolder = variant_dir(cfg, method)
        vfp = artifacts.fingerprint(vcfg, "finetune", upstream)
        manifest = artifacts.existing(vfolder, "finetune", vfp, vcfg, cfg.overwrite)
        if manifest:
            log.info("finetune %s: %s is complete, skipping", method, vfolder)
        elif vcfg.finetune.class_phases:
            manifest = phases.fit_variant(vcfg, method, vfolder, vfp, latents)
        else:
            log.info("finetune %s: lambda_rep=%g lambda_div=%g, %d steps", method,
                     vcfg.finetune.minimax.lambda_rep, vcfg.finetune.minimax.lambda_div, vcfg.finetune.steps)
            fields = distributed.fit(vcfg, "finetune", vfp, folder=vfolder)
            manifest = artifacts.publish(vfolder, "finetune", vfp, vcfg, method=method, model="model",
                                         model_ema="model_ema", backbone=cfg.finetune.backbone, **fields)
        done[method] = {k: manifest.get(k) for k in
                        ("fingerprint", "steps", "final", "wall_seconds", "accelerator_seconds", "ema_start_share")}
    wall = sum(v.get("wall_seconds") or 0.0 for v in done.values())
    accel = sum(v.get("accelerator_seconds") or 0.0 for v in done.values())
    return artifacts.publish(folder, "finetune", fp, cfg, variants=done,
                             wall_seconds=round(wall, 2), accelerator_seconds=round(accel, 2))
