"""Test networks for evaluation (method.md §3.2), as a registry; single-device plain PyTorch.

- ``convnet``: IDC/DC ConvNet, depth from the resolution (3 at 28-32 px, 6 at 224-256 px), 128
  channels, instance norm, ReLU, 2x2 average pooling. On 1-channel 28 px input the first conv pads
  by 3 (28 -> 32), as DC's ConvNet does for MNIST-like data, so the published Fashion-MNIST
  anchors use the same network.
- ``resnet_ap10``: IDC's ResNet-10 with average-pool downsampling.
- ``resnet18`` / ``resnet18_bn``: timm's ResNet-18 with instance or batch norm; small inputs get a
  3x3 stride-1 stem without max-pool (the usual CIFAR adaptation).
- ``convnet_w32``: the ConvNet at 32 channels, a cheap teacher for the diagnostics on a CPU.
- ``timm:<name>``: any timm model; ``tiny``: a one-layer ConvNet for tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def instance_norm(channels: int, **factory: object) -> nn.Module:
    """Instance norm with affine parameters, as IDC implements it (GroupNorm, groups = channels)."""
    return nn.GroupNorm(channels, channels, affine=True, **factory)


class ConvNet(nn.Module):
    """[conv3x3 -> instance norm -> ReLU -> avgpool2] x depth -> linear."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, depth: int = 3, width: int = 128):
        super().__init__()
        layers: list[nn.Module] = []
        size, channels = image_size, in_channels
        for d in range(depth):
            pad = 3 if (d == 0 and in_channels == 1 and image_size == 28) else 1
            layers += [nn.Conv2d(channels, width, 3, padding=pad), instance_norm(width), nn.ReLU(inplace=True),
                       nn.AvgPool2d(2)]
            size = (size + 2 * pad - 2) // 2
            channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes]."""
        return self.classifier(self.features(x).flatten(1))


class _BlockAP(nn.Module):
    """IDC's BasicBlock: a strided block downsamples with 2x2 average pooling, not stride."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = instance_norm(cout)
        self.pool = nn.AvgPool2d(2) if stride > 1 else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = instance_norm(cout)
        self.shortcut = nn.Identity()
        if stride > 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False),
                                          nn.AvgPool2d(2) if stride > 1 else nn.Identity(), instance_norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(self.pool(out)))
        return torch.relu(out + self.shortcut(x))


class ResNetAP(nn.Module):
    """IDC's ResNetAP-10: one block per stage, widths 64-512, average-pool downsampling."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int):
        super().__init__()
        big = image_size > 128
        stem: list[nn.Module] = [nn.Conv2d(in_channels, 64, 7 if big else 3, padding=3 if big else 1, bias=False),
                                 instance_norm(64), nn.ReLU(inplace=True)]
        if big:
            stem.append(nn.AvgPool2d(4))
        self.stem = nn.Sequential(*stem)
        widths = (64, 128, 256, 512)
        self.stages = nn.Sequential(*[_BlockAP(widths[max(i - 1, 0)], w, 1 if i == 0 else 2)
                                      for i, w in enumerate(widths)])
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        return self.fc(self.stages(self.stem(x)).mean(dim=(2, 3)))


def _timm(name: str, in_channels: int, num_classes: int, image_size: int, norm: str | None = None) -> nn.Module:
    """A timm model from scratch; ResNets get a small-image stem below 64 px."""
    import timm

    kwargs = {}
    if norm == "instance":
        kwargs["norm_layer"] = instance_norm
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)
    if image_size < 64 and isinstance(getattr(model, "conv1", None), nn.Conv2d) and hasattr(model, "maxpool"):
        model.conv1 = nn.Conv2d(in_channels, model.conv1.out_channels, 3, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


def convnet_depth(image_size: int) -> int:
    """3 for 28-32 px, 6 for 224-256 px (log2(size) - 2, clamped)."""
    return int(min(6, max(1, round(math.log2(image_size)) - 2)))


ARCHS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "tiny": lambda c, k, s: ConvNet(c, k, s, depth=1, width=8),
    "convnet": lambda c, k, s: ConvNet(c, k, s, depth=convnet_depth(s)),
    "convnet3": lambda c, k, s: ConvNet(c, k, s, depth=3),
    "convnet6": lambda c, k, s: ConvNet(c, k, s, depth=6),
    # a quarter of the width: ~10x cheaper, a teacher for diagnostics on a CPU
    "convnet_w32": lambda c, k, s: ConvNet(c, k, s, depth=convnet_depth(s), width=32),
    "resnet_ap10": ResNetAP,
    "resnet18": lambda c, k, s: _timm("resnet18", c, k, s, norm="instance"),
    "resnet18_bn": lambda c, k, s: _timm("resnet18", c, k, s),
}


def check_arch(name: str) -> None:
    """Raise KeyError naming the choices if ``name`` is not a known architecture."""
    if name in ARCHS:
        return
    if name.startswith("timm:"):
        import timm

        if timm.is_model(name[5:]):
            return
        raise KeyError(f"unknown timm model {name[5:]!r}")
    raise KeyError(f"unknown architecture {name!r}; choose from {sorted(ARCHS)} or timm:<name>")


def create(name: str, *, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """Build a test network by registry name (or ``timm:<name>``)."""
    check_arch(name)
    if name.startswith("timm:"):
        return _timm(name[5:], in_channels, num_classes, image_size)
    return ARCHS[name](in_channels, num_classes, image_size)


def penultimate(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features entering the last linear layer, logits) of any registry network.

    The features are read with a forward pre-hook on the model's last ``nn.Linear`` (the
    classifier of every network here and of timm's), so no architecture needs a features API.
    """
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    seen: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].flatten(1)))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return seen[-1], logits
