"""Builders the tests share: image folders with chosen defects, tiny saved models."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image


def png(size=20, mode="RGB", seed=0) -> bytes:
    """A random PNG of the given PIL mode."""
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        arr = rng.integers(0, 65535, (size, size), dtype=np.uint16)
        image = Image.fromarray(arr)
    else:
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        arr = rng.integers(0, 255, (size, size, channels), dtype=np.uint8)
        image = Image.fromarray(arr[:, :, 0] if channels == 1 else arr).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def image_folder(root: str, classes: dict[str, int], size: int = 20, mode: str = "RGB",
                 extra: dict[str, bytes] | None = None) -> str:
    """root/<class>/<i>.png with ``classes[name]`` images each; ``extra`` adds 'class/file': bytes."""
    for c, n in classes.items():
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(n):
            with open(os.path.join(root, c, f"{i:03d}.png"), "wb") as f:
                f.write(png(size, mode, seed=hash((c, i)) % 1000))
    for rel, data in (extra or {}).items():
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
    return root


def tiny_dit(folder: str, classes: int = 2, size: int = 16, channels: int = 1, seed: int = 0) -> str:
    """A tiny DiT saved with save_pretrained (what a user's backbone folder looks like)."""
    import torch

    from mmdist.models.diffusion import create_dit, save_dit

    torch.manual_seed(seed)
    save_dit(create_dit("tiny", sample_size=size, in_channels=channels, num_classes=classes), folder)
    return folder


def publish_finetune(cfg, latents: dict, dit: str) -> None:
    """Stand in for a fine-tune: ``dit`` as <output>/finetune/model{,_ema} under a published manifest."""
    import shutil

    from mmdist import artifacts

    folder = artifacts.stage_dir(cfg, "finetune")
    for name in ("model", "model_ema"):
        shutil.copytree(dit, os.path.join(folder, name))
    artifacts.publish(folder, "finetune", artifacts.fingerprint(cfg, "finetune", [latents]), cfg,
                      backbone=dit, steps=0, history=[], note="test stand-in: no training")
