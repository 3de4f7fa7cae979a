"""Stage 2 (optional) — pretrain: a class-conditional DiT from scratch on the latent shards.

The paper starts from a public ImageNet DiT-XL/2. For data sets without such a backbone (the
embedded Fashion-MNIST default ships one made by this stage: recipe in jobs/pretrain_fashion_mnist.py)
this trains one with the same loop as fine-tuning: all parameters, no minimax terms.
"""

from __future__ import annotations

import logging
from typing import Any

from mmdist import artifacts, distributed
from mmdist.config import Config

log = logging.getLogger("mmdist")


def main(cfg: Config) -> dict[str, Any]:
    """Pretrain on <output>/latents and export <output>/pretrain/model_ema; skip if current."""
    folder = artifacts.stage_dir(cfg, "pretrain")
    latents = artifacts.require(artifacts.stage_dir(cfg, "encode"), "encode")
    fp = artifacts.fingerprint(cfg, "pretrain", [latents])
    done = artifacts.existing(folder, "pretrain", fp, cfg, cfg.overwrite)
    if done:
        log.info("pretrain: %s is complete, skipping", folder)
        return done
    fields = distributed.fit(cfg, "pretrain", fp)
    return artifacts.publish(folder, "pretrain", fp, cfg, model="model", model_ema="model_ema", **fields)
