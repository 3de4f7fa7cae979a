"""Evaluation protocols: train a test network on a (distilled) set, test it on real data.

Plain single-device PyTorch; ``mmdist.evaluate`` runs these as Ray Tune trials.

- ``hard`` — IDC's recipe (docs/method.md §3.3): RandomResizedCrop(scale 0.5-1) + flip + colour jitter
  + PCA lighting (RGB only) + normalisation, CutMix on every batch, SGD 0.01 / 0.9 / 5e-4, batch 64,
  LR x0.2 at 2/3 and 5/6 of training, epochs 2000/1500/1000 by IPC; reports the best and the last
  test accuracy. For small images (<= 64 px: Fashion-MNIST, CIFAR) IDC trains with DSA instead of
  the ImageNet crop (``dsa``), still with CutMix; either can be chosen by name.
- ``soft`` — RDED's recipe (docs/method.md §3.5): a teacher relabels each augmented, CutMix-ed batch;
  the student minimises KL at temperature 20 (x T^2); AdamW 1e-3, wd 0.01, the schedule
  0.5 (1 + cos(pi e / 2E)) that ends at half the LR; 300 epochs. RDED's 2x2 patch mosaics belong
  to its own synthesis, not to the evaluation of other sets, and are not used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# AlexNet PCA lighting (IDC's `Lighting`): ImageNet RGB eigenvalues and eigenvectors
_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])


@dataclass(frozen=True)
class Protocol:
    """A fully specified training recipe."""

    name: str
    epochs: int
    batch_size: int
    lr: float
    evals: int = 10
    augment: str = "idc"  # one of AUGMENTATIONS except "auto" (resolved by make_protocol)
    temperature: float = 20.0

    @property
    def soft(self) -> bool:
        """Whether a teacher provides the labels."""
        return self.name == "soft"


def hard_epochs(ipc: int, num_classes: int) -> int:
    """IDC's epochs by IPC (10 classes); x2/3 rounded down to 100 for 100+ classes (docs/method.md §3.3)."""
    epochs = 2000 if ipc <= 10 else 1500 if ipc <= 50 else 1000
    if num_classes >= 100:
        epochs = epochs * 2 // 3 // 100 * 100
    return epochs


def make_protocol(name: str, *, ipc: int, num_classes: int, epochs: int | None, batch_size: int,
                  lr: float | None, evals: int, augment: str, temperature: float,
                  resolution: int = 224) -> Protocol:
    """Fill a protocol's defaults: epochs by IPC (hard) or 300 (soft), the protocol's LR and augmentation."""
    kind = resolve_augmentation(augment, name, resolution)
    if name == "hard":
        return Protocol("hard", epochs or hard_epochs(ipc, num_classes), batch_size, lr or 0.01, evals, kind)
    if name == "soft":
        return Protocol("soft", epochs or 300, batch_size, lr or 1e-3, evals, kind, temperature)
    raise ValueError(f"unknown protocol {name!r}; choose hard or soft")


# ----------------------------------------------------------------------------------------------
# Batched augmentation (tensor ops, per-sample randomness from one generator)
# ----------------------------------------------------------------------------------------------


def to_float(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float [0, 1] at ``size`` (bilinear, antialiased, square inputs)."""
    x = images.float() / 255.0
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def normalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet statistics for RGB, (0.5, 0.5) for grayscale."""
    if x.shape[1] == 3:
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std
    return (x - 0.5) / 0.5


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """n uniform draws in [lo, hi)."""
    return (torch.rand(n, generator=g) * (hi - lo) + lo).to(device)


def random_resized_crop_flip(x: torch.Tensor, g: torch.Generator, scale: tuple[float, float] = (0.5, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Per-sample RandomResizedCrop(scale, ratio) + horizontal flip, as one grid_sample."""
    n = x.shape[0]
    area = _uniform(n, *scale, g, x.device)
    log_r = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), g, x.device)
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (torch.rand(n, generator=g).to(x.device) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=g).to(x.device) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(n, generator=g).to(x.device) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def color_jitter_lighting(x: torch.Tensor, g: torch.Generator, strength: float = 0.4) -> torch.Tensor:
    """Brightness, contrast, saturation (0.4 each, random order) and PCA lighting (std 0.1); RGB only."""
    n = x.shape[0]
    gray = lambda t: (0.299 * t[:, 0] + 0.587 * t[:, 1] + 0.114 * t[:, 2]).unsqueeze(1)  # noqa: E731
    ops = {
        "brightness": lambda t, f: t * f,
        "contrast": lambda t, f: (t - gray(t).mean(dim=(2, 3), keepdim=True)) * f
        + gray(t).mean(dim=(2, 3), keepdim=True),
        "saturation": lambda t, f: (t - gray(t)) * f + gray(t),
    }
    for i in torch.randperm(3, generator=g).tolist():
        name = list(ops)[i]
        factor = _uniform(n, 1 - strength, 1 + strength, g, x.device).view(n, 1, 1, 1)
        x = ops[name](x, factor).clamp(0, 1)
    alpha = (torch.randn(n, 3, generator=g) * 0.1).to(x.device)
    rgb = (_EIGVEC.to(x.device) @ (alpha * _EIGVAL.to(x.device)).T).T  # [n, 3]
    return x + rgb.view(n, 3, 1, 1)


def cutmix(x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """CutMix with lambda ~ Beta(1, 1): (mixed images, partner permutation, area weight of x)."""
    n, _, h, w = x.shape
    lam = float(torch.rand(1, generator=g))
    perm = torch.randperm(n, generator=g).to(x.device)
    cut = math.sqrt(1 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(torch.randint(h, (1,), generator=g)), int(torch.randint(w, (1,), generator=g))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    mixed = x.clone()
    mixed[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    return mixed, perm, lam


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample ``x`` through per-sample 2x3 affine matrices (zeros outside, as DSA does)."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _shift(x: torch.Tensor, g: torch.Generator, ratio: float) -> torch.Tensor:
    """DSA's crop: pad and shift each image by up to ``ratio`` of its side, in whole pixels."""
    n, _, h, w = x.shape
    dy = torch.randint(-int(h * ratio + 0.5), int(h * ratio + 0.5) + 1, (n,), generator=g)
    dx = torch.randint(-int(w * ratio + 0.5), int(w * ratio + 0.5) + 1, (n,), generator=g)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2], theta[:, 1, 2] = -2.0 * dx / w, -2.0 * dy / h  # normalised coordinates
    return _affine(x, theta.to(x.device))


def dsa(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Differentiable Siamese Augmentation as IDC trains its small-image test networks.

    Strategy ``color_crop_cutout_flip_scale_rotate`` with DSA's parameters (flip 0.5, brightness
    1.0, saturation 2.0, contrast 0.5, crop 0.125, scale 1.2, rotate 15 degrees, cutout 0.5), all
    drawn per image: flip and colour always, then ONE of crop / scale / rotate chosen for the
    whole batch, then cutout (IDC's ``DiffAug(batch=False)`` with single-augmentation mode). Works
    on normalised images; saturation is the identity on one channel.
    """
    n, c, h, w = x.shape
    dev = x.device

    def u(lo: float, hi: float) -> torch.Tensor:
        return _uniform(n, lo, hi, g, dev).view(n, 1, 1, 1)

    x = torch.where(u(0, 1) < 0.5, x.flip(3), x)
    x = x + (u(0, 1) - 0.5) * 1.0  # brightness
    x = (x - x.mean(1, keepdim=True)) * (u(0, 1) * 2.0) + x.mean(1, keepdim=True)  # saturation
    x = (x - x.mean((1, 2, 3), keepdim=True)) * (u(0, 1) + 0.5) + x.mean((1, 2, 3), keepdim=True)  # contrast
    which = int(torch.randint(3, (1,), generator=g))
    if which == 0:
        x = _shift(x, g, 0.125)
    elif which == 1:
        scale = 1.2
        sx, sy = _uniform(n, 1 / scale, scale, g, dev), _uniform(n, 1 / scale, scale, g, dev)
        theta = torch.zeros(n, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 1, 1] = sx, sy
        x = _affine(x, theta)
    else:
        angle = _uniform(n, -15.0, 15.0, g, dev) * math.pi / 180
        theta = torch.zeros(n, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle), -torch.sin(angle)
        theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle), torch.cos(angle)
        x = _affine(x, theta)
    ch, cw = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)  # cutout: a half-side square, zeroed
    cy = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), generator=g).to(dev)
    cx = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), generator=g).to(dev)
    rows = torch.arange(h, device=dev).view(1, h, 1)
    cols = torch.arange(w, device=dev).view(1, 1, w)
    inside = ((rows - cy).abs() <= ch // 2) & ((cols - cx).abs() <= cw // 2)
    return x * (~inside).unsqueeze(1).to(x.dtype)


AUGMENTATIONS = ("auto", "idc", "dsa", "rded", "none")


def resolve_augmentation(name: str, protocol: str, resolution: int) -> str:
    """``auto``: DSA for small images under the hard protocol (IDC's setting for 28-32 px data),
    the ImageNet-style crop otherwise; RDED's crop-and-flip under the soft protocol."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; choose from {list(AUGMENTATIONS)}")
    if name != "auto":
        return name
    if protocol == "soft":
        return "rded"
    return "dsa" if resolution <= 64 else "idc"


def augment_batch(x: torch.Tensor, g: torch.Generator, kind: str = "idc") -> torch.Tensor:
    """Per-image augmentation of float [0, 1] images, normalised; ``kind`` from AUGMENTATIONS.

    ``idc``: RandomResizedCrop(0.5-1) + flip + colour jitter and lighting (RGB); ``dsa``: ``dsa``
    after normalisation; ``rded``: RandomResizedCrop(0.5-1) + flip, no colour (RDED's student
    augmentation); ``none``: normalisation only.
    """
    if kind == "none":
        return normalize(x)
    if kind == "dsa":
        return dsa(normalize(x), g)
    x = random_resized_crop_flip(x, g)
    if kind == "idc" and x.shape[1] == 3:
        x = color_jitter_lighting(x, g)
    return normalize(x)


# ----------------------------------------------------------------------------------------------
# Training and testing
# ----------------------------------------------------------------------------------------------


# Test networks are per-sample in eval mode (instance norm, or batch norm's running statistics),
# so the test batch changes speed, not results. On the CPU small batches keep activations in
# cache: benchmarks/evaluation.py measured 32 fastest for ConvNet-3 (0.74 of 500's time).
TEST_BATCH_SIZE = {"cpu": 32}
DEFAULT_TEST_BATCH_SIZE = 500


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int | None = None) -> float:
    """Top-1 accuracy in percent of ``model`` on float [0, 1] images (batch: by device if None)."""
    batch_size = batch_size or TEST_BATCH_SIZE.get(x.device.type, DEFAULT_TEST_BATCH_SIZE)
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        logits = model(normalize(x[i: i + batch_size]))
        correct += int((logits.argmax(1) == y[i: i + batch_size]).sum())
    model.train()
    return 100.0 * correct / max(x.shape[0], 1)


def fit(model: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
        test_y: torch.Tensor, protocol: Protocol, *, seed: int, teacher: nn.Module | None = None,
        report: Callable[[dict], None] | None = None, progress: Callable[[int], None] | None = None,
        test_batch_size: int | None = None) -> dict:
    """Train ``model`` under ``protocol``; returns best/last test accuracy and the curve.

    Images are float [0, 1] at the evaluation resolution, on the model's device.
    """
    if protocol.soft and teacher is None:
        raise ValueError("the soft protocol needs a teacher")
    # channels-last convolutions are ~1.5x faster on CPU (oneDNN); results are unchanged
    model.to(memory_format=torch.channels_last)
    train_x = train_x.contiguous(memory_format=torch.channels_last)
    test_x = test_x.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    n = train_x.shape[0]
    steps_per_epoch = math.ceil(n / protocol.batch_size)
    total = protocol.epochs * steps_per_epoch
    if protocol.soft:
        opt = torch.optim.AdamW(model.parameters(), lr=protocol.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * (s // steps_per_epoch) / (2 * protocol.epochs))))
        teacher.eval()
    else:
        opt = torch.optim.SGD(model.parameters(), lr=protocol.lr, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [total * 2 // 3, total * 5 // 6], gamma=0.2)
    # exactly `evals` test passes, the last at the end (a test pass costs as much as many steps)
    eval_at = {round(k * protocol.epochs / protocol.evals) for k in range(1, protocol.evals + 1)}
    best, last, curve = 0.0, 0.0, []
    model.train()
    for epoch in range(1, protocol.epochs + 1):
        order = torch.randperm(n, generator=g).to(train_x.device)
        for i in range(0, n, protocol.batch_size):
            idx = order[i: i + protocol.batch_size]
            x, y = train_x[idx], train_y[idx]
            x = augment_batch(x, g, protocol.augment)
            perm, lam = None, 1.0
            if protocol.augment != "none":
                x, perm, lam = cutmix(x, g)
            logits = model(x)
            if protocol.soft:
                with torch.no_grad():
                    target = F.softmax(teacher(x) / protocol.temperature, dim=1)
                loss = F.kl_div(F.log_softmax(logits / protocol.temperature, dim=1), target,
                                reduction="batchmean") * protocol.temperature ** 2
            else:
                loss = lam * F.cross_entropy(logits, y)
                if perm is not None:
                    loss = loss + (1 - lam) * F.cross_entropy(logits, y[perm])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if progress:
            progress(epoch)
        if epoch in eval_at:
            last = accuracy(model, test_x, test_y, test_batch_size)
            best = max(best, last)
            curve.append((epoch, last))
            if report:
                report({"epoch": epoch, "acc": last, "best_acc": best, "loss": loss.item()})
    return {"best_acc": best, "last_acc": last, "curve": curve}


def train_teacher(model: nn.Module, x: torch.Tensor, y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                  *, epochs: int, seed: int = 0, batch_size: int = 256,
                  progress: Callable[[int], None] | None = None) -> float:
    """Train a teacher on the real train split (crop + flip, SGD 0.05 cosine); returns test accuracy."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * math.ceil(x.shape[0] / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps, pct_start=0.15)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(x.shape[0], generator=g).to(x.device)
        for i in range(0, x.shape[0], batch_size):
            idx = order[i: i + batch_size]
            loss = F.cross_entropy(model(augment_batch(x[idx], g)), y[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if progress:
            progress(epoch + 1)
    return accuracy(model, test_x, test_y)

