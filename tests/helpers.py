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
    """Stand in for a fine-tune: ``dit`` as the minimax variant, published without training."""
    from mmdist import finetune

    finetune.adopt(cfg, dit, note="test stand-in: no training")


GLYPHS = ("top", "bottom", "centre", "frame")


def glyphs_folder(root: str, per_class: int, size: int = 16, seed: int = 0) -> str:
    """An ImageFolder of our own that no pretrained backbone has seen: root/<glyph>/<i>.png, a
    bright shape on black — a bar across the top or the bottom, a centred square, or a frame —
    with random brightness, thickness and offset. Each class is left-right symmetric, so the
    horizontal flips of training keep it in its class."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    for glyph in GLYPHS:
        os.makedirs(os.path.join(root, glyph), exist_ok=True)
        for i in range(per_class):
            image = Image.new("L", (size, size), 0)
            draw = ImageDraw.Draw(image)
            fill = int(rng.integers(170, 256))
            w = int(rng.integers(size // 6, size // 3))  # thickness
            o = int(rng.integers(0, size // 8 + 1))  # offset from the edge
            if glyph == "top":
                draw.rectangle([0, o, size - 1, o + w], fill=fill)
            elif glyph == "bottom":
                draw.rectangle([0, size - 1 - o - w, size - 1, size - 1 - o], fill=fill)
            elif glyph == "centre":
                draw.rectangle([size // 2 - w, size // 2 - w, size // 2 + w - 1, size // 2 + w - 1], fill=fill)
            else:
                draw.rectangle([o, o, size - 1 - o, size - 1 - o], outline=fill, width=max(1, w // 2))
            image.save(os.path.join(root, glyph, f"{i:04d}.png"))
    return root
