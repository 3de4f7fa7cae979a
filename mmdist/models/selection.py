"""Sampling-time selection (beyond the paper, opt-in): keep the candidates that cover the real data.

Peers after Minimax Diffusion (CaO2 2025, IMS3 2026) draw more candidates than IPC and keep the
best. Our rule stays in the minimax spirit, in the same centred-cosine space as the fine-tuning
objective: every real latent of the class should have a kept image close to it
(representativeness), and a second image close to the same reals adds nothing (diversity). That
is facility location,

    S* = argmax_{|S| = k} sum_{m in M_c} max_{s in S} cos(s, m),

maximised greedily (a (1 - 1/e) approximation, since the objective is monotone submodular). The
greedy order is nested: the first j picks are the greedy answer for j, so IPC j of a selected
set is its first j images, as for every other set. k-centre (max over reals of the min distance)
was not used: it favours outliers, which train worse at small IPC (K-Center trails random real in
the paper's Table 1). Plain PyTorch, no Ray.
"""

from __future__ import annotations

import torch


def facility_location(candidates: torch.Tensor, reference: torch.Tensor, k: int) -> list[int]:
    """Greedy facility location over unit vectors: indices of ``k`` candidates, best first.

    candidates [N, D] and reference [R, D] are L2-normalised; ties go to the lowest index, so the
    choice is deterministic.
    """
    if k > candidates.shape[0]:
        raise ValueError(f"cannot keep {k} of {candidates.shape[0]} candidates")
    sims = candidates.float() @ reference.float().T  # [N, R]
    covered = torch.full((reference.shape[0],), -1.0)  # the best cosine each real has so far
    taken = torch.zeros(candidates.shape[0], dtype=torch.bool)
    chosen: list[int] = []
    for _ in range(k):
        gain = (torch.maximum(sims, covered) - covered).sum(1)
        gain[taken] = -float("inf")
        best = int(torch.argmax(gain))
        chosen.append(best)
        taken[best] = True
        covered = torch.maximum(covered, sims[best])
    return chosen
