"""The diffusion backbone: DiT and VAE factories, DiffFit, samplers (the loss is in gaussian_diffusion).

This is the only module that imports diffusers. Everything is single-device plain PyTorch.

Two facts about diffusers' ``DiTTransformer2DModel`` shape this file:
- every block carries its own copy of the timestep/class embedder (the DiT checkpoint
  conversion copies one table into all 28 blocks). We tie them back into one module, as in the
  original DiT, so fine-tuning trains one class table (docs/method.md §1.3), and untie on export.
- its label dropout is drawn independently in every block. We set it to 0 and drop labels
  ourselves, once per sample, as DiT does (see ``drop_labels``).
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from mmdist.errors import ArtifactError

_DIFFUSERS_IMPORT = threading.Lock()


def _diffusers(*names: str) -> tuple[type, ...]:
    """Classes from diffusers' top level, imported under a lock. Its lazy module is not safe for
    threads: two threads importing it for the first time at once (the phases of
    ``finetune.class_phases``, exported side by side from the driver's threads) can get
    "ImportError: cannot import name 'DiTTransformer2DModel' from 'diffusers'"."""
    with _DIFFUSERS_IMPORT:
        import diffusers

        return tuple(getattr(diffusers, name) for name in names)


# ----------------------------------------------------------------------------------------------
# DiT sizes (registry; tests use only "tiny")
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiTSize:
    """Shape of a DiT: depth, heads, channels per head, patch size."""

    num_layers: int
    num_heads: int
    head_dim: int
    patch_size: int


DIT_SIZES: dict[str, DiTSize] = {
    "tiny": DiTSize(2, 2, 16, 4),
    # the embedded default: docs/ray-notes.md calibration, 2.1 M parameters, ~150 img/s on one core
    "fashion-mnist": DiTSize(6, 4, 32, 4),
    # DiT paper Table 1 (S/B/L/XL), patch 2
    "DiT-S/2": DiTSize(12, 6, 64, 2),
    "DiT-B/2": DiTSize(12, 12, 64, 2),
    "DiT-L/2": DiTSize(24, 16, 64, 2),
    "DiT-XL/2": DiTSize(28, 16, 72, 2),
}


def create_dit(size: str, *, sample_size: int, in_channels: int, num_classes: int,
               learn_sigma: bool = True) -> nn.Module:
    """A randomly initialised class-conditional DiT (initialised as in the DiT paper)."""
    (DiTTransformer2DModel,) = _diffusers("DiTTransformer2DModel")

    if size not in DIT_SIZES:
        raise KeyError(f"unknown DiT size {size!r}; choose from {sorted(DIT_SIZES)}")
    s = DIT_SIZES[size]
    if sample_size % s.patch_size:
        raise ValueError(f"latent size {sample_size} is not divisible by patch size {s.patch_size} of {size}")
    model = DiTTransformer2DModel(
        num_attention_heads=s.num_heads, attention_head_dim=s.head_dim, in_channels=in_channels,
        out_channels=in_channels * 2 if learn_sigma else in_channels, num_layers=s.num_layers,
        sample_size=sample_size, patch_size=s.patch_size, num_embeds_ada_norm=num_classes,
        norm_eps=1e-6,
    )
    model = prepare_dit(model, tie=True)
    _dit_init(model)
    return model


def _dit_init(model: nn.Module) -> None:
    """DiT's initialisation: xavier linears, N(0, .02) embeddings, zeroed adaLN and output."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    w = model.pos_embed.proj.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.pos_embed.proj.bias)
    emb = model.transformer_blocks[0].norm1.emb
    nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
    nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
    for block in model.transformer_blocks:
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for lin in (model.proj_out_1, model.proj_out_2):
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)


def load_dit(path_or_id: str, subfolder: str | None = None) -> nn.Module:
    """Load a DiTTransformer2DModel with ``from_pretrained`` (hub id or folder)."""
    (DiTTransformer2DModel,) = _diffusers("DiTTransformer2DModel")

    kwargs = {"subfolder": subfolder} if subfolder else {}
    with _loading(path_or_id, subfolder):
        # safetensors only: a .bin (pickle) backbone is refused rather than unpickled
        model = DiTTransformer2DModel.from_pretrained(path_or_id, low_cpu_mem_usage=False, use_safetensors=True,
                                                      **kwargs)
    return prepare_dit(model)


@contextlib.contextmanager
def _loading(path_or_id: str, subfolder: str | None) -> Iterator[None]:
    """One clear ArtifactError for a model folder that is missing, not safetensors, or corrupt."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, ValueError, SafetensorError) as e:
        where = f"{path_or_id} (subfolder {subfolder})" if subfolder else path_or_id
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ArtifactError(f"{where}: cannot load the model from safetensors weights ({first})") from None


def prepare_dit(model: nn.Module, tie: bool | None = None) -> nn.Module:
    """Tie the per-block embedders into one and turn off diffusers' per-block label dropout.

    ``tie=None`` ties only when all copies are equal (a converted DiT checkpoint, or one we saved);
    a model trained with separate embedders is left as it is.
    """
    blocks = model.transformer_blocks
    first = blocks[0].norm1.emb
    if tie is None:
        tie = all(
            torch.equal(a, b)
            for block in blocks[1:]
            for a, b in zip(first.state_dict().values(), block.norm1.emb.state_dict().values())
        )
    if tie:
        for block in blocks[1:]:
            block.norm1.emb = first
    for block in blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0
    return model


def num_classes_of(model: nn.Module) -> int:
    """Number of real classes (the null class id is this number)."""
    return int(model.config.num_embeds_ada_norm)


def learns_sigma(model: nn.Module) -> bool:
    """Whether the model predicts a variance (out_channels == 2 * in_channels)."""
    return model.config.out_channels == 2 * model.config.in_channels


def drop_labels(labels: torch.Tensor, null_id: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by the null class with probability p (one decision per sample)."""
    if p <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_id), labels)


def save_dit(model: nn.Module, folder: str) -> None:
    """``save_pretrained`` a plain diffusers DiT: DiffFit scales folded in, embedders untied."""
    export = copy.deepcopy(model)
    fold_difffit(export)
    blocks = export.transformer_blocks
    for block in blocks[1:]:
        if block.norm1.emb is blocks[0].norm1.emb:
            block.norm1.emb = copy.deepcopy(blocks[0].norm1.emb)
    for block in blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.1  # diffusers' default; we drop labels ourselves
    os.makedirs(folder, exist_ok=True)
    export.save_pretrained(folder, safe_serialization=True)


# ----------------------------------------------------------------------------------------------
# DiffFit (docs/method.md §1.3): biases + per-block scales in the first half + the class table
# ----------------------------------------------------------------------------------------------


def _scale_output(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: multiply a layer's output by its DiffFit scale factor(s)."""
    out = output * module.difffit_gamma
    residual = getattr(module, "difffit_gamma_residual", None)
    return out if residual is None else out * residual


def _last_linear(module: nn.Module) -> nn.Linear:
    """The last nn.Linear inside a module (the feed-forward's output projection)."""
    return [m for m in module.modules() if isinstance(m, nn.Linear)][-1]


def add_difffit_scales(model: nn.Module) -> nn.Module:
    """Add DiffFit's scale factors (all ones) to the first half of the blocks.

    As in the paper's DiT: a scale on q, k, v (the 3*D "qkv" vector) and on the attention
    projection, and residual-branch scales on the attention and MLP outputs. They multiply layer
    outputs, so forward hooks apply them and ``fold_difffit`` can fold them into the weights.
    """
    blocks = model.transformer_blocks
    for block in list(blocks)[: len(blocks) // 2]:
        attn = block.attn1
        if hasattr(attn.to_q, "difffit_gamma"):
            continue
        dim = attn.to_out[0].out_features
        for lin in (attn.to_q, attn.to_k, attn.to_v):
            lin.difffit_gamma = nn.Parameter(torch.ones(lin.out_features))
            lin.register_forward_hook(_scale_output)
        proj = attn.to_out[0]
        proj.difffit_gamma = nn.Parameter(torch.ones(dim))
        proj.difffit_gamma_residual = nn.Parameter(torch.ones(dim))
        proj.register_forward_hook(_scale_output)
        mlp_out = _last_linear(block.ff)
        mlp_out.difffit_gamma = nn.Parameter(torch.ones(mlp_out.out_features))
        mlp_out.register_forward_hook(_scale_output)
    return model


@torch.no_grad()
def fold_difffit(model: nn.Module) -> nn.Module:
    """Fold DiffFit scales into the linear layers and remove them (exact: scales are linear)."""
    for m in model.modules():
        if not isinstance(m, nn.Linear) or not hasattr(m, "difffit_gamma"):
            continue
        scale = m.difffit_gamma.detach().clone()
        if hasattr(m, "difffit_gamma_residual"):
            scale = scale * m.difffit_gamma_residual.detach()
            del m.difffit_gamma_residual
        del m.difffit_gamma
        m.weight.mul_(scale[:, None])
        if m.bias is not None:
            m.bias.mul_(scale)
        for key, hook in list(m._forward_hooks.items()):
            if hook is _scale_output:
                del m._forward_hooks[key]
    return model


def mark_trainable(model: nn.Module, trainable: str) -> dict[str, nn.Parameter]:
    """Set requires_grad for 'full' or 'difffit'; returns the trainable parameters by name.

    DiffFit trains biases, the scale factors and the class-embedding table. diffusers names the
    adaLN modulation ``norm1.linear``, so we match names exactly rather than on 'norm' as the
    paper's code does (DiT's LayerNorms have no affine parameters, so 'norm' matched nothing there).
    """
    if trainable == "difffit":
        add_difffit_scales(model)
    chosen = {}
    for name, p in model.named_parameters():
        keep = trainable == "full" or (
            name.endswith(".bias") or "difffit_gamma" in name or ".class_embedder." in name
        )
        p.requires_grad_(keep)
        if keep:
            chosen[name] = p
    if trainable not in ("full", "difffit"):
        raise ValueError(f"unknown trainable set {trainable!r}")
    return chosen


# ----------------------------------------------------------------------------------------------
# Samplers and the VAE
# ----------------------------------------------------------------------------------------------


def make_scheduler(name: str, learn_sigma: bool, steps: int) -> object:
    """A diffusers scheduler on DiT's training schedule, with ``steps`` inference steps.

    'ddpm' is the paper's sampler: ancestral DDPM with the learned variance, timesteps spaced
    as ADM's ``space_timesteps(1000, "50")`` (linspace over 0..999), no clipping of x0.
    """
    DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler = _diffusers(
        "DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler")

    common = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                  prediction_type="epsilon", timestep_spacing="linspace")
    if name == "ddpm":
        sched = DDPMScheduler(**common, clip_sample=False,
                              variance_type="learned_range" if learn_sigma else "fixed_small")
    elif name == "ddim":
        sched = DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False)
    elif name == "dpm":
        sched = DPMSolverMultistepScheduler(**common)
    else:
        raise ValueError(f"unknown scheduler {name!r}; choose from ddpm, ddim, dpm")
    sched.set_timesteps(steps)
    return sched


def scheduler_uses_variance(name: str) -> bool:
    """Whether the scheduler consumes the model's predicted variance channels."""
    return name == "ddpm"


def load_vae(path_or_id: str, subfolder: str | None = None) -> nn.Module:
    """An AutoencoderKL via ``from_pretrained`` (hub id or folder), in eval mode."""
    (AutoencoderKL,) = _diffusers("AutoencoderKL")

    kwargs = {"subfolder": subfolder} if subfolder else {}
    with _loading(path_or_id, subfolder):
        return AutoencoderKL.from_pretrained(path_or_id, low_cpu_mem_usage=False, use_safetensors=True,
                                             **kwargs).eval()


def vae_config(path_or_id: str, subfolder: str | None = None) -> dict:
    """An AutoencoderKL's config without loading its weights."""
    (AutoencoderKL,) = _diffusers("AutoencoderKL")

    return dict(AutoencoderKL.load_config(path_or_id, subfolder=subfolder))


def dit_config(path_or_id: str, subfolder: str | None = None) -> dict:
    """A DiTTransformer2DModel's config without loading its weights."""
    (DiTTransformer2DModel,) = _diffusers("DiTTransformer2DModel")

    return dict(DiTTransformer2DModel.load_config(path_or_id, subfolder=subfolder))


def vae_scaling_factor(vae: nn.Module) -> float:
    """The latent scale stored in the VAE config (0.18215 for the SD VAE)."""
    return float(getattr(vae.config, "scaling_factor", 0.18215))


@torch.no_grad()
def vae_posterior(vae: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of images in [-1, 1] (unscaled)."""
    dist = vae.encode(images).latent_dist
    return dist.mean, dist.std


@torch.no_grad()
def vae_decode(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Unscaled latents -> images in [-1, 1]."""
    return vae.decode(latents).sample


def dit_forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The model's raw output [B, out_channels, H, W] (eps, then variance channels)."""
    return model(x, timestep=t, class_labels=y, return_dict=False)[0]



class LatentEncoder:
    """Images <-> latents: an AutoencoderKL, or the identity for pixel-space models.

    ``encode`` returns the *unscaled* posterior (mean, std); training multiplies a sample by
    ``scaling_factor``. ``decode`` takes *scaled* latents, as the sampler produces them.
    """

    def __init__(self, name: str, subfolder: str | None = None, scaling_factor: float | None = None,
                 device: torch.device | str = "cpu"):
        self.name = name
        self.device = torch.device(device)
        self.vae = None if name == "identity" else load_vae(name, subfolder).to(self.device)
        default = 1.0 if self.vae is None else vae_scaling_factor(self.vae)
        self.scaling_factor = float(scaling_factor or default)

    @property
    def deterministic(self) -> bool:
        """Whether the posterior has zero variance (identity)."""
        return self.vae is None

    def latent_shape(self, channels: int, size: int) -> tuple[int, int, int]:
        """Latent (C, H, W) for images of (channels, size, size)."""
        if self.vae is None:
            return (channels, size, size)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (int(self.vae.config.latent_channels), size // factor, size // factor)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 images [N, C, H, W] -> (posterior mean, posterior std or None), unscaled."""
        x = images.to(self.device, torch.float32) / 127.5 - 1.0
        if self.vae is None:
            return x, None
        return vae_posterior(self.vae, x)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> uint8 images [N, C, H, W] (DiT's rounding: clamp, *255 + 0.5)."""
        z = latents.to(self.device, torch.float32) / self.scaling_factor
        x = z if self.vae is None else vae_decode(self.vae, z)
        return (((x + 1) / 2).clamp(0, 1) * 255 + 0.5).to(torch.uint8)
