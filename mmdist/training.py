"""One optimisation step of DiT training, with or without the minimax terms, and its state.

Plain single-device PyTorch: the Ray Train worker (``mmdist.distributed``) is a short loop that
calls ``train_step`` on each batch of its shard. Pretraining and fine-tuning share everything;
they differ in the initial weights, the trainable set and whether the objective is attached.
Checkpoints are safetensors (tensors) plus JSON (step, history): nothing is pickled.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mmdist.errors import ArtifactError, DataError
from mmdist.models import diffusion
from mmdist.models.gaussian_diffusion import GaussianDiffusion
from mmdist.models.minimax import Collective, MinimaxObjective


@dataclass
class TrainState:
    """Everything a training run carries from step to step."""

    model: nn.Module
    trainable: dict[str, nn.Parameter]
    ema: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer
    objective: MinimaxObjective | None
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_at: list[int] = field(default_factory=list)  # steps at which a restart resumed


@dataclass(frozen=True)
class StepContext:
    """Per-run constants of a step."""

    diffusion: GaussianDiffusion
    class_ids: torch.Tensor  # local label -> model class id
    null_id: int
    class_dropout: float
    scaling_factor: float
    hflip: bool
    ema_decay: float
    autocast: str  # "no" or "bf16"
    ema_warmup: bool = True


def build_state(model: nn.Module, *, trainable: str, lr: float, weight_decay: float,
                objective: MinimaxObjective | None) -> TrainState:
    """Mark the trainable set, start the EMA from the current weights, and make AdamW."""
    params = diffusion.mark_trainable(model, trainable)
    ema = {name: p.detach().clone() for name, p in params.items()}
    # AdamW with the default betas (0.9, 0.999), constant lr (DiffFit / docs/method.md §1.8)
    opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=weight_decay)
    return TrainState(model, params, ema, opt, objective)


def to_device(state: TrainState, device: torch.device) -> None:
    """Move the model, EMA and memories to ``device`` (parameters keep their identity)."""
    state.model.to(device)
    for k in state.ema:
        state.ema[k] = state.ema[k].to(device)
    if state.objective is not None:
        for mem in (state.objective.real, state.objective.pred):
            for name, t in mem.state_dict().items():
                setattr(mem, name, t.to(device))
        if state.objective.center is not None:
            state.objective.center = state.objective.center.to(device)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The EMA decay used after optimiser step ``step`` (1-based).

    With warm-up (diffusers' ``EMAModel`` default) the decay is min(decay, (1 + step) / (10 + step)):
    the EMA follows the weights closely early on and the starting weights' share vanishes
    polynomially, so a short run (300 fine-tuning steps, a 1,500-step pretrain) samples what it
    trained rather than mostly its initialisation. Without warm-up the share left after T steps is
    decay**T (the paper's 0.9999 over 12k steps keeps 30 % of the pretrained DiT: docs/method.md §1.10).
    """
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def ema_start_share(steps: int, decay: float, warmup: bool) -> float:
    """Share of the starting weights still in the EMA after ``steps`` steps (the product of decays)."""
    share = 1.0
    for step in range(1, steps + 1):
        share *= ema_decay_at(step, decay, warmup)
        if share < 1e-12:
            return 0.0
    return share


@torch.no_grad()
def ema_update(state: TrainState, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * params."""
    for name, p in state.trainable.items():
        state.ema[name].mul_(decay).add_(p.detach(), alpha=1 - decay)


def train_step(state: TrainState, ctx: StepContext, mean: torch.Tensor, std: torch.Tensor | None,
               labels: torch.Tensor, model: nn.Module | None = None,
               collective: Collective | None = None) -> dict[str, float]:
    """One step on a batch of latent posteriors; returns the logged metrics.

    ``model`` is the (possibly DDP-wrapped) module to call; by default ``state.model``.
    """
    model = model or state.model
    if not torch.isfinite(mean).all() or (std is not None and not torch.isfinite(std).all()):
        # before any update: the last checkpoint and the memories stay clean
        raise DataError(f"step {state.step + 1}: the batch has NaN/Inf latents (shards written by another "
                        "tool or a broken encoder; re-encode)")
    x0 = mean if std is None else mean + std * torch.randn_like(mean)
    x0 = x0.float() * ctx.scaling_factor
    if ctx.hflip:
        flip = torch.rand(x0.shape[0], device=x0.device) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    t = torch.randint(0, ctx.diffusion.num_timesteps, (x0.shape[0],), device=x0.device)
    noise = torch.randn_like(x0)
    xt = ctx.diffusion.q_sample(x0, t, noise)
    y = diffusion.drop_labels(ctx.class_ids[labels], ctx.null_id, ctx.class_dropout)
    amp = (torch.autocast(device_type=x0.device.type, dtype=torch.bfloat16)
           if ctx.autocast == "bf16" else nullcontext())
    with amp:
        out = diffusion.dit_forward(model, xt, t, y)
    parts = ctx.diffusion.losses(out.float(), x0, xt, t, noise)
    loss = parts["loss"].mean()
    metrics = {"loss_diffusion": loss.item(), "mse": parts["mse"].mean().item()}
    if not math.isfinite(metrics["loss_diffusion"]):
        raise ArithmeticError(f"step {state.step + 1}: the diffusion loss is {metrics['loss_diffusion']}: "
                              "training diverged (lower the learning rate)")
    if "vb" in parts:
        metrics["vb"] = parts["vb"].mean().item()
    if state.objective is not None:
        # label dropout stays on; dropped samples still enter the terms under their real class (§1.4)
        terms = state.objective(parts["pred_x0"], x0, labels, collective)
        loss = loss + terms.loss
        metrics.update(representativeness=terms.representativeness.item(),
                       diversity=terms.diversity.item(), minimax_classes=float(terms.active_classes),
                       loss_minimax=terms.loss.item())
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    state.step += 1
    ema_update(state, ema_decay_at(state.step, ctx.ema_decay, ctx.ema_warmup))
    metrics["loss"] = loss.item()
    metrics["step"] = float(state.step)
    return metrics


class EpochCache:
    """The rows one worker saw in its first epoch, kept in memory when they fit ``budget_bytes``,
    and dealt again in a new seeded order every later epoch.

    Why: each epoch of a streaming read starts Ray Data's executor and read tasks anew, seconds
    that dominate when an epoch is a few steps (a user's small ImageFolder, a class phase, a
    laptop): tests/test_own_data.py, which pretrains 400 steps on 150 glyph images per class,
    took 205 s streaming every epoch and 129 s with this cache on a 2-core machine. A data set
    over the budget (ImageNet's latents) is never cached and keeps streaming; the decision
    depends only on the row count, which Ray Data's equal split makes the same on every rank, so
    DDP ranks always take the same number of steps.
    """

    # Fashion-MNIST's 60k latents are 188 MB and are kept; ImageNet-1K's (21 GB) stream every epoch
    def __init__(self, budget_bytes: int = 1 << 30) -> None:
        self.budget = budget_bytes
        self.parts: list[dict[str, torch.Tensor]] = []
        self.size = 0
        self.rows: dict[str, torch.Tensor] | None = None

    @property
    def ready(self) -> bool:
        """Whether the rows are kept (the first epoch was read and fitted the budget)."""
        return self.rows is not None

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        """Keep a batch of the first epoch (until the budget is exceeded; then keep nothing)."""
        if self.rows is not None or self.size > self.budget:
            return
        self.size += sum(t.numel() * t.element_size() for t in batch.values())
        if self.size > self.budget:
            self.parts = []
        else:
            self.parts.append(batch)

    def epoch_done(self) -> None:
        """The first epoch was read to its end: its rows become the cache, if they fit."""
        if self.rows is None and self.parts and self.size <= self.budget:
            self.rows = {k: torch.cat([p[k] for p in self.parts]) for k in self.parts[0]}
            self.parts = []

    def batches(self, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        """Full batches of the cached rows in a permutation drawn from ``seed`` (the last
        partial batch is dropped, like the streaming read's ``drop_last``)."""
        assert self.rows is not None
        n = len(next(iter(self.rows.values())))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        for i in range(0, n - batch_size + 1, batch_size):
            idx = order[i:i + batch_size].to(next(iter(self.rows.values())).device)
            yield {k: v[idx] for k, v in self.rows.items()}


# ----------------------------------------------------------------------------------------------
# Checkpoints: safetensors + JSON
# ----------------------------------------------------------------------------------------------

STATE_FILE = "state.safetensors"
META_FILE = "meta.json"


def save_checkpoint(state: TrainState, folder: str, extra: dict[str, Any] | None = None) -> None:
    """Trainable weights, EMA, optimizer moments, memories -> folder/state.safetensors + meta.json."""
    tensors = {}
    for name, p in state.trainable.items():
        tensors[f"param/{name}"] = p.detach()
        tensors[f"ema/{name}"] = state.ema[name]
        for key, value in state.optimizer.state.get(p, {}).items():
            tensors[f"opt/{name}/{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    if state.objective is not None:
        for mem_name, mem in (("real", state.objective.real), ("pred", state.objective.pred)):
            for key, t in mem.state_dict().items():
                tensors[f"memory/{mem_name}/{key}"] = t
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, os.path.join(folder, STATE_FILE))
    with open(os.path.join(folder, META_FILE), "w") as f:
        json.dump({"step": state.step, "history": state.history, "resumed_at": state.resumed_at, **(extra or {})}, f)


class CorruptCheckpoint(ArtifactError):
    """A checkpoint folder that cannot be read (truncated or damaged files): try an older one."""


def read_checkpoint(folder: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and JSON metadata of a checkpoint; CorruptCheckpoint if either is unreadable."""
    try:
        tensors = load_file(os.path.join(folder, STATE_FILE))
        with open(os.path.join(folder, META_FILE)) as f:
            meta = json.load(f)
        int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CorruptCheckpoint(f"checkpoint {folder} is unreadable ({type(e).__name__}: {first})") from None
    return tensors, meta


def load_checkpoint(state: TrainState, folder: str) -> dict[str, Any]:
    """Restore what ``save_checkpoint`` wrote; returns the JSON metadata.

    Everything is read and checked before anything is changed, so a checkpoint that fails
    (CorruptCheckpoint, or an ArtifactError for one of another model) leaves ``state`` as it was.
    """
    tensors, meta = read_checkpoint(folder)
    names = {k.split("/", 1)[1] for k in tensors if k.startswith("param/")}
    if names != set(state.trainable):
        missing = sorted(set(state.trainable) - names)[:3]
        raise ArtifactError(f"checkpoint {folder} does not match the model (missing {missing}): it was made by a "
                            "different model or trainable set; pass --overwrite to start this stage again")
    for name, p in state.trainable.items():
        for key in (f"param/{name}", f"ema/{name}"):
            if key not in tensors or tensors[key].shape != p.shape:
                got = tuple(tensors[key].shape) if key in tensors else "nothing"
                raise ArtifactError(f"checkpoint {folder} does not match the model: {key} has shape {got}, "
                                    f"the model {tuple(p.shape)}; pass --overwrite to start this stage again")
    if state.objective is not None:
        for mem_name, mem in (("real", state.objective.real), ("pred", state.objective.pred)):
            for k, t in mem.state_dict().items():
                src = tensors.get(f"memory/{mem_name}/{k}")
                if src is None or src.shape != t.shape:
                    raise ArtifactError(f"checkpoint {folder} does not match the model: its {mem_name} memory "
                                        "differs (another class count, latent shape or memory size)")
    with torch.no_grad():
        for name, p in state.trainable.items():
            p.copy_(tensors[f"param/{name}"])
            state.ema[name] = tensors[f"ema/{name}"].to(p.device)
    opt_state = {}
    for i, (name, p) in enumerate(state.trainable.items()):
        entry = {k.rsplit("/", 1)[1]: v.to(p.device) for k, v in tensors.items() if k.startswith(f"opt/{name}/")}
        if entry:
            entry["step"] = entry["step"].cpu()  # AdamW keeps `step` on the CPU
            opt_state[i] = entry
    sd = state.optimizer.state_dict()
    state.optimizer.load_state_dict({"state": opt_state, "param_groups": sd["param_groups"]})
    if state.objective is not None:
        for mem_name, mem in (("real", state.objective.real), ("pred", state.objective.pred)):
            mem.load_state_dict({k: tensors[f"memory/{mem_name}/{k}"].to(mem.buffer.device)
                                 for k in ("buffer", "count", "head")})
    state.step = int(meta["step"])
    state.history = list(meta.get("history", []))
    state.resumed_at = list(meta.get("resumed_at", [])) + [state.step]
    return meta


def apply_weights(model: nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> nn.Module:
    """Copy ``prefix/<name>`` tensors (e.g. 'ema') into the model's parameters of that name."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith(prefix + "/"):
                params[key[len(prefix) + 1:]].copy_(value)
    return model
