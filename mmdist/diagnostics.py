"""Why a distilled set is good or bad: class fidelity and coverage in a teacher's feature space.

For every generated set, a teacher trained on the real train split (the soft protocol's teacher)
gives:

- ``fidelity``: its top-1 accuracy on the generated images, in percent — do they look like their
  class?
- ``precision``, ``recall``, ``density``, ``coverage`` (Naeem et al., ICML 2020, k = 5), per class
  in the teacher's penultimate features against a fixed sample of real train images of the
  class, then averaged: precision and density say how much of the generated set lies on the real
  manifold; recall and coverage how much of the real manifold the set reaches. At IPC 10 recall
  and coverage are small for any set; they are for comparing rows of one run.

Plain PyTorch, no Ray; ``mmdist.evaluate`` calls it on the driver.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mmdist import protocols
from mmdist.models.classifiers import penultimate

REFERENCE_PER_CLASS = 500  # real train images per class that the generated sets are compared with


@torch.no_grad()
def features(teacher: nn.Module, images: np.ndarray, resolution: int, batch_size: int = 500
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features, predicted labels) of uint8 images [N, C, H, W]."""
    teacher.eval()
    feats, preds = [], []
    for i in range(0, len(images), batch_size):
        x = protocols.normalize(protocols.to_float(torch.from_numpy(np.array(images[i: i + batch_size])), resolution))
        f, logits = penultimate(teacher, x)
        feats.append(f.float())
        preds.append(logits.argmax(1))
    return torch.cat(feats), torch.cat(preds)


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage of ``fake`` against ``real`` features (k-NN balls)."""
    k_fake = min(k, len(fake) - 1)
    if len(real) <= k or k_fake < 1:
        raise ValueError(f"need more than {k} real and 2 generated samples (got {len(real)}, {len(fake)})")
    real_radius = torch.cdist(real, real).kthvalue(k + 1, dim=1).values  # the point itself is 0
    fake_radius = torch.cdist(fake, fake).kthvalue(k_fake + 1, dim=1).values
    dist = torch.cdist(real, fake)  # [R, F]
    inside_real = dist <= real_radius[:, None]  # fake j inside real i's ball
    return {
        "precision": float(inside_real.any(0).float().mean()),
        "recall": float((dist <= fake_radius[None, :]).any(1).float().mean()),
        "density": float(inside_real.float().sum(0).mean() / k),
        "coverage": float((dist.min(1).values <= real_radius).float().mean()),
    }


def diagnose(teacher: nn.Module, images: np.ndarray, labels: np.ndarray, real: tuple[torch.Tensor, np.ndarray],
             resolution: int, k: int = 5) -> dict[str, float]:
    """Fidelity and class-averaged PRDC of a labelled set; ``real`` = (features, labels) of the reference."""
    feats, preds = features(teacher, images, resolution)
    out = {"fidelity": round(100.0 * float((preds.numpy() == labels).mean()), 2)}
    # PRDC needs k-NN balls on both sides: a class with under k+1 reference images or under 2
    # generated ones (IPC 1) has none, so it is left out; with no class left the figures are None.
    per_class = [prdc(real[0][real[1] == c], feats[labels == c], k) for c in np.unique(labels)
                 if (real[1] == c).sum() > k and (labels == c).sum() >= 2]
    for key in ("precision", "recall", "density", "coverage"):
        out[key] = round(float(np.mean([p[key] for p in per_class])), 4) if per_class else None
    return out
