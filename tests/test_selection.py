"""Sampling-time selection and distilled-set diagnostics: plain PyTorch, no Ray."""

import numpy as np
import pytest
import torch

from mmdist import diagnostics
from mmdist.models import classifiers
from mmdist.models.minimax import embed
from mmdist.models.selection import facility_location


def _clusters(n_per: int, centres: torch.Tensor, noise: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([c + noise * torch.randn(n_per, centres.shape[1], generator=g) for c in centres])


def test_facility_location_covers_every_cluster_before_repeating_one():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3
    reference = embed(_clusters(30, centres, 0.3, 1))
    # 10 candidates near cluster 0 and 2 near each of the others: a random pick of 4 usually misses
    candidates = embed(torch.cat([_clusters(10, centres[:1], 0.3, 2), _clusters(2, centres[1:], 0.3, 3)]))
    picked = facility_location(candidates, reference, 4)
    cluster_of = [0] * 10 + [1, 1, 2, 2, 3, 3]
    assert sorted(cluster_of[i] for i in picked) == [0, 1, 2, 3]
    # greedy is nested (the first j picks are the answer for j) and deterministic
    assert facility_location(candidates, reference, 2) == picked[:2]
    assert facility_location(candidates, reference, 4) == picked


def test_facility_location_prefers_a_central_candidate_to_an_outlier():
    reference = embed(torch.tensor([[1.0, 0.1], [1.0, -0.1], [1.0, 0.0]]))
    candidates = embed(torch.tensor([[0.2, 1.0], [1.0, 0.0]]))  # an outlier, then the centre
    assert facility_location(candidates, reference, 1) == [1]
    with pytest.raises(ValueError, match="cannot keep 3 of 2"):
        facility_location(candidates, reference, 3)


def test_prdc_separates_matching_and_disjoint_sets():
    real = _clusters(200, torch.zeros(1, 8), 1.0, 0)
    same = _clusters(50, torch.zeros(1, 8), 1.0, 1)
    far = _clusters(50, torch.full((1, 8), 10.0), 1.0, 2)
    good, bad = diagnostics.prdc(real, same), diagnostics.prdc(real, far)
    assert good["precision"] > 0.8 and good["coverage"] > 0.5 and good["density"] > 0.5
    assert bad["precision"] == 0 and bad["coverage"] == 0 and bad["recall"] == 0
    # a collapsed set (one point repeated) sits on the manifold but covers almost none of it
    collapsed = diagnostics.prdc(real, same[:1].repeat(50, 1))
    assert collapsed["coverage"] < 0.1 < collapsed["precision"]


@pytest.mark.parametrize("arch", ["convnet", "resnet_ap10", "timm:resnet10t"])
def test_penultimate_features_feed_the_classifier(arch):
    model = classifiers.create(arch, in_channels=1, num_classes=5, image_size=28).eval()
    x = torch.rand(3, 1, 28, 28)
    feats, logits = classifiers.penultimate(model, x)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert feats.shape == (3, head.in_features)
    assert torch.allclose(head(feats), logits, atol=1e-5)


def test_diagnose_reports_fidelity_of_a_teacher():
    # a "teacher" that calls dark images class 0 and bright ones class 1
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 2))
    with torch.no_grad():
        teacher[1].weight.copy_(torch.stack([-torch.ones(256), torch.ones(256)]) / 256)
        teacher[1].bias.zero_()
    rng = np.random.default_rng(0)

    def images(n: int) -> tuple[np.ndarray, np.ndarray]:
        dark = rng.integers(0, 100, (n, 1, 16, 16), dtype=np.uint8)
        bright = rng.integers(155, 255, (n, 1, 16, 16), dtype=np.uint8)
        return np.concatenate([dark, bright]), np.repeat([0, 1], n)

    rx, ry = images(30)
    real = diagnostics.features(teacher, rx, 16)[0], ry
    x, y = images(10)
    out = diagnostics.diagnose(teacher, x, y, real, 16, k=3)
    assert out["fidelity"] == 100.0 and out["precision"] > 0.5
    flipped = diagnostics.diagnose(teacher, x, 1 - y, real, 16, k=3)
    assert flipped["fidelity"] == 0.0 and flipped["precision"] == 0.0
    # IPC 1: no k-NN ball around a lone generated image, so PRDC is None while fidelity still counts
    single = diagnostics.diagnose(teacher, x[[0, 10]], y[[0, 10]], real, 16, k=3)
    assert single["fidelity"] == 100.0 and single["precision"] is None and single["coverage"] is None
