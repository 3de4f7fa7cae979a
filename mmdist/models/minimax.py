"""The minimax objective of Minimax Diffusion (docs/method.md §1.5-1.7), single-device plain PyTorch.

Per class c, with P_c the batch's predicted clean latents of class c, M_c the real-latent memory
and D_c the prediction memory (both FIFO, detached, updated after the loss):

    R_c = 1 - min_{p in P_c, m in M_c} cos(p, m)      (representativeness, pulls the worst pair)
    V_c =     max_{p in P_c, d in D_c} cos(p, d)      (diversity, pushes the closest pair apart)
    L_mm = 1/|C_B| * sum_{c in C_B, D_c non-empty} (lambda_rep R_c + lambda_div V_c)

with C_B every class in the batch (classes whose prediction memory is still empty count in |C_B|
but add no term, as in the paper's code).

Data-parallel training: the min and max run over the *global* batch. Each rank reduces its own
predictions, the ranks exchange these per-class extrema, and only the rank holding the global
extremum keeps its gradient; the loss is scaled by world size so that DDP's gradient average
equals the single-process gradient. Every rank pushes the all-gathered global batch into its
memories in rank order, so all ranks hold the memories one process with the global batch would.
Labels, extrema and both embeddings travel in one all-gather per step: a collective's fixed cost
(a few ms on gloo) dominates at these sizes, and five of them were 4 % of a 2-worker CPU step.
The collective is passed in (``Collective``); this module never imports torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Collective(Protocol):
    """The two collectives the objective needs; the Ray layer backs them with torch.distributed."""

    world_size: int
    rank: int

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's tensor along dim 0, in rank order (same shapes)."""
        ...


class SingleProcess:
    """The collective of one process: gathering is the identity."""

    world_size = 1
    rank = 0

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Return the tensor itself."""
        return tensor


def embed(x: torch.Tensor, center: torch.Tensor | None = None) -> torch.Tensor:
    """Flatten, centre and L2-normalise latents: [B, C, H, W] -> [B, C*H*W] unit vectors (docs/method.md §1.5)."""
    v = x.float().flatten(1)
    if center is not None:
        v = v - center.reshape(1, -1).to(v)
    return v / v.norm(dim=1, keepdim=True).clamp(min=1e-12)


class ClassMemory:
    """Per-class FIFO ring buffers of unit vectors: [classes, size, dim] preallocated on device.

    Entries are stored centred and L2-normalised, so a cosine is a dot product.
    """

    def __init__(self, num_classes: int, size: int, dim: int, dtype: str = "float32",
                 device: torch.device | str = "cpu"):
        self.size = size
        self.buffer = torch.zeros(num_classes, size, dim, dtype=_DTYPES[dtype], device=device)
        self.count = torch.zeros(num_classes, dtype=torch.long, device=device)  # valid entries
        self.head = torch.zeros(num_classes, dtype=torch.long, device=device)  # next slot to write

    @torch.no_grad()
    def push(self, labels: torch.Tensor, vectors: torch.Tensor) -> None:
        """Append vectors (in order) to their classes' queues; the oldest fall out when full."""
        same = labels[None, :] == labels[:, None]
        # k-th occurrence of its class within this push, and how many of its class follow it
        order = torch.tril(same, diagonal=-1).sum(1)
        per_class = torch.bincount(labels, minlength=self.count.shape[0])
        keep = order >= per_class[labels] - self.size  # only the last `size` of a class survive
        slot = (self.head[labels] + order) % self.size
        self.buffer[labels[keep], slot[keep]] = vectors[keep].to(self.buffer.dtype)
        self.head = (self.head + per_class) % self.size
        self.count = torch.clamp(self.count + per_class, max=self.size)

    def entries(self, c: int) -> torch.Tensor:
        """The stored vectors of class c (order within the ring is irrelevant to min/max)."""
        return self.buffer[c, : int(self.count[c])]

    def nbytes(self) -> int:
        """Bytes held by the buffer."""
        return self.buffer.numel() * self.buffer.element_size()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint."""
        return {"buffer": self.buffer, "count": self.count, "head": self.head}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from ``state_dict``; shapes must match."""
        if state["buffer"].shape != self.buffer.shape:
            raise ValueError(f"memory shape {tuple(state['buffer'].shape)} != {tuple(self.buffer.shape)}")
        self.buffer.copy_(state["buffer"])
        self.count.copy_(state["count"])
        self.head.copy_(state["head"])


@dataclass
class MinimaxTerms:
    """The objective's value and its parts (global over ranks, detached parts for logging)."""

    loss: torch.Tensor  # what to add to the diffusion loss on this rank (carries gradient)
    representativeness: torch.Tensor  # mean over active classes of R_c
    diversity: torch.Tensor  # mean over active classes of V_c
    active_classes: int


class MinimaxObjective:
    """Representativeness and diversity over per-class memories (see the module docstring)."""

    def __init__(self, num_classes: int, dim: int, *, memory_size: int = 64, lambda_rep: float = 0.002,
                 lambda_div: float = 0.008, use_rep: bool = True, use_div: bool = True,
                 center: torch.Tensor | None = None, memory_dtype: str = "float32",
                 device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.lambda_rep = lambda_rep if use_rep else 0.0
        self.lambda_div = lambda_div if use_div else 0.0
        self.center = None if center is None else center.reshape(1, -1).to(device=device, dtype=torch.float32)
        self.real = ClassMemory(num_classes, memory_size, dim, memory_dtype, device)
        self.pred = ClassMemory(num_classes, memory_size, dim, memory_dtype, device)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flatten, centre and L2-normalise latents: [B, C, H, W] -> [B, C*H*W] unit vectors."""
        return embed(x, self.center)

    def __call__(self, pred_x0: torch.Tensor, real_x0: torch.Tensor, labels: torch.Tensor,
                 collective: Collective | None = None) -> MinimaxTerms:
        """Terms for this rank's batch against the memories, then push the global batch."""
        comm = collective or SingleProcess()
        p = self.embed(pred_x0)
        with torch.no_grad():
            r = self.embed(real_x0)
        # this rank's per-class extrema against the memories as they stand before this step's push
        local = {}
        if self.lambda_rep > 0:
            local["rep"] = self._extremum(p, labels, self.real, "amin")
        if self.lambda_div > 0:
            local["div"] = self._extremum(p, labels, self.pred, "amax")
        all_labels, per_rank, all_r, all_p = self._gather(comm, labels, [e.detach() for e in local.values()],
                                                          r, p.detach())
        everyone = dict(zip(local, per_rank))  # each term's extrema of every rank, [world, K]
        present = torch.bincount(all_labels, minlength=self.num_classes) > 0
        active = present & (self.pred.count > 0)  # a class counts once its prediction memory is non-empty
        n_active = int(active.sum())
        n_present = int(present.sum())  # the paper divides by |C_B|, every class in the batch
        rep = div = torch.zeros((), device=p.device)
        grad_part = p.sum() * 0.0  # keeps the graph connected when no term is active
        value = torch.zeros((), device=p.device)
        if n_active:
            scale = comm.world_size / n_present
            if "rep" in local:
                mine, best = self._owned(local["rep"], everyone["rep"], active, comm, "amin")
                grad_part = grad_part - self.lambda_rep * scale * mine.sum()
                rep = (1 - best[active]).mean()
                value = value + self.lambda_rep * (1 - best[active]).sum() / n_present
            if "div" in local:
                mine, best = self._owned(local["div"], everyone["div"], active, comm, "amax")
                grad_part = grad_part + self.lambda_div * scale * mine.sum()
                div = best[active].mean()
                value = value + self.lambda_div * best[active].sum() / n_present
        # the value is the global objective on every rank; the gradient is this rank's share
        loss = value.detach() + grad_part - grad_part.detach()
        self.real.push(all_labels, all_r)
        self.pred.push(all_labels, all_p)
        return MinimaxTerms(loss, rep.detach(), div.detach(), n_active)

    def _gather(self, comm: Collective, labels: torch.Tensor, extrema: list[torch.Tensor], r: torch.Tensor,
                p: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """One all-gather of every rank's (labels, per-class extrema, real and predicted embeddings).

        Returns the global labels [world*B], each extremum per rank [world, K], and the global
        embeddings [world*B, D], all in rank order. Labels ride as float32 (exact below 2**24).
        """
        b, k, d = labels.shape[0], self.num_classes, r.shape[1]
        packed = torch.cat([labels.to(torch.float32), *extrema, r.flatten(), p.flatten()])
        rows = comm.all_gather(packed).view(comm.world_size, -1)
        all_labels = rows[:, :b].reshape(-1).round().long()
        per_rank = [rows[:, b + i * k: b + (i + 1) * k] for i in range(len(extrema))]
        vectors = rows[:, b + len(extrema) * k:].reshape(comm.world_size, 2, b, d)
        return all_labels, per_rank, vectors[:, 0].reshape(-1, d), vectors[:, 1].reshape(-1, d)

    def _extremum(self, p: torch.Tensor, labels: torch.Tensor, memory: ClassMemory, reduce: str) -> torch.Tensor:
        """Per-class min or max of cos(prediction, memory entry) over this rank's samples: [K]."""
        mem = memory.buffer[labels].float()  # [B, S, D]
        sims = torch.einsum("bd,bsd->bs", p, mem)
        valid = torch.arange(memory.size, device=p.device)[None, :] < memory.count[labels][:, None]
        fill = float("inf") if reduce == "amin" else float("-inf")
        sims = torch.where(valid, sims, torch.full_like(sims, fill))
        per_sample = sims.amin(1) if reduce == "amin" else sims.amax(1)
        init = torch.full((self.num_classes,), fill, device=p.device, dtype=per_sample.dtype)
        return init.scatter_reduce(0, labels, per_sample, reduce=reduce, include_self=True)

    def _owned(self, local: torch.Tensor, gathered: torch.Tensor, active: torch.Tensor, comm: Collective,
               reduce: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(this rank's extrema where it holds the global one, else 0; the global extrema), given every
        rank's extrema [world, K]."""
        best = gathered.amin(0) if reduce == "amin" else gathered.amax(0)
        owner = (gathered == best[None]).float().argmax(0)  # lowest rank holding the extremum
        mine = (owner == comm.rank) & active
        return torch.where(mine, local, torch.zeros_like(local)), best
