"""Class-conditional sampling with classifier-free guidance, single-device plain PyTorch.

The guidance loop is ours because diffusers' DiTPipeline hard-codes 1000 classes (docs/ray-notes.md).
Guidance follows DiT's ``forward_with_cfg``: the conditional and unconditional passes run as one
doubled batch; guided eps = uncond + s * (cond - uncond) on the first ``guidance_channels``
channels (DiT and the paper: 3 of 4); the other eps channels and the variance come from the
conditional pass. Noise for image k is drawn only from its own generator, so an image does not
depend on which other images share its batch.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from mmdist.models import diffusion


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float, channels: int, guided: int) -> torch.Tensor:
    """DiT's guidance: guided eps on the first ``guided`` of ``channels`` eps channels; the rest of
    eps and the variance channels come from the conditional pass."""
    eps = cond[:, :channels].clone()
    eps[:, :guided] = uncond[:, :guided] + scale * (cond[:, :guided] - uncond[:, :guided])
    return torch.cat([eps, cond[:, channels:]], dim=1)


@torch.no_grad()
def sample_latents(model: nn.Module, *, class_ids: list[int], generators: list[torch.Generator],
                   latent_shape: tuple[int, int, int], scheduler: str = "ddpm", steps: int = 50,
                   guidance_scale: float = 4.0, guidance_channels: int | None = None,
                   autocast: str = "no") -> torch.Tensor:
    """Draw one latent per (class id, generator); returns scaled latents [N, C, H, W]."""
    device = next(model.parameters()).device
    learn_sigma = diffusion.learns_sigma(model)
    sched = diffusion.make_scheduler(scheduler, learn_sigma, steps)
    c = latent_shape[0]
    noise = torch.stack([torch.randn(latent_shape, generator=g) for g in generators])
    x = (noise * sched.init_noise_sigma).to(device)
    y = torch.tensor(class_ids, device=device)
    null = torch.full_like(y, diffusion.num_classes_of(model))
    guided = guidance_scale != 1.0
    g_ch = min(guidance_channels or c, c)
    amp = (torch.autocast(device_type=device.type, dtype=torch.bfloat16 if autocast == "bf16" else torch.float16)
           if autocast != "no" and device.type == "cuda" else nullcontext())
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t)
        tt = torch.full((x.shape[0],), int(t), device=device, dtype=torch.long)
        with amp:
            if guided:
                out = diffusion.dit_forward(model, torch.cat([inp, inp]), torch.cat([tt, tt]), torch.cat([y, null]))
            else:
                out = diffusion.dit_forward(model, inp, tt, y)
        out = out.float()
        if guided:
            cond, uncond = out.chunk(2)
            out = guide(cond, uncond, guidance_scale, c, g_ch)
        if not diffusion.scheduler_uses_variance(scheduler):
            out = out[:, :c]
        x = sched.step(out, t, x, generator=generators).prev_sample
    return x
