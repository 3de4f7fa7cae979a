"""Stage 3 — finetune: minimax fine-tuning of a pretrained DiT (docs/method.md §1) on Ray Train.

DiffFit parameters by default, label dropout on, EMA kept; the two minimax terms are computed
over per-class memories that are all-gathered every step. The exported ``model_ema`` folder is a
plain diffusers DiTTransformer2DModel (DiffFit scales folded in), which the sampler loads.
"""

from __future__ import annotations

import logging
from typing import Any

from mmdist import artifacts, distributed
from mmdist.config import Config

log = logging.getLogger("mmdist")


def main(cfg: Config) -> dict[str, Any]:
    """Fine-tune and export <output>/finetune/model{,_ema}; skip if current."""
    folder = artifacts.stage_dir(cfg, "finetune")
    latents = artifacts.require(artifacts.stage_dir(cfg, "encode"), "encode")
    upstream = [latents]
    if cfg.finetune.backbone == "pretrain":
        upstream.append(artifacts.require(artifacts.stage_dir(cfg, "pretrain"), "pretrain"))
    fp = artifacts.fingerprint(cfg, "finetune", upstream)
    done = artifacts.existing(folder, "finetune", fp, cfg, cfg.overwrite)
    if done:
        log.info("finetune: %s is complete, skipping", folder)
        return done
    fields = distributed.fit(cfg, "finetune", fp)
    return artifacts.publish(folder, "finetune", fp, cfg, model="model", model_ema="model_ema",
                             backbone=cfg.finetune.backbone, **fields)
