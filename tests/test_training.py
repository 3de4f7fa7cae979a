"""train_step, EMA and checkpoints (plain PyTorch, no Ray)."""

import pytest
import torch

from mmdist import training
from mmdist.errors import DataError
from mmdist.models import diffusion
from mmdist.models.gaussian_diffusion import GaussianDiffusion
from mmdist.models.minimax import MinimaxObjective


def make_state(trainable="difffit", objective=True, seed=0):
    torch.manual_seed(seed)
    model = diffusion.create_dit("tiny", sample_size=16, in_channels=1, num_classes=3)
    obj = MinimaxObjective(3, 256, memory_size=8, center=None) if objective else None
    state = training.build_state(model, trainable=trainable, lr=1e-3, weight_decay=0.0, objective=obj)
    ctx = training.StepContext(diffusion=GaussianDiffusion(), class_ids=torch.tensor([0, 1, 2]),
                               null_id=3, class_dropout=0.1, scaling_factor=1.0, hflip=True, ema_decay=0.9,
                               ema_warmup=False, autocast="no")
    return state, ctx


def batch(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 16, 16, generator=g) * 2 - 1, None, torch.randint(0, 3, (n,), generator=g)


def test_only_the_trainable_set_moves_and_ema_follows():
    state, ctx = make_state()
    frozen = {n: p.detach().clone() for n, p in state.model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in state.trainable.items()}
    for i in range(3):
        metrics = training.train_step(state, ctx, *batch(i))
    assert state.step == 3 and metrics["step"] == 3.0
    for n, p in state.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    moved = [n for n, p in state.trainable.items() if not torch.equal(p, before[n])]
    assert moved
    for n in moved:  # the EMA lags the weights
        assert not torch.equal(state.ema[n], state.trainable[n])
    assert "representativeness" in metrics and metrics["minimax_classes"] >= 1


def test_ema_update_is_the_exponential_average():
    state, ctx = make_state(objective=False)
    name, p = next(iter(state.trainable.items()))
    ema0 = state.ema[name].clone()
    with torch.no_grad():
        p.add_(1.0)
    training.ema_update(state, 0.9)
    assert torch.allclose(state.ema[name], 0.9 * ema0 + 0.1 * p)


def test_training_lowers_the_loss_on_a_fixed_batch():
    state, ctx = make_state(trainable="full", objective=False)
    ctx = training.StepContext(**{**ctx.__dict__, "class_dropout": 0.0, "hflip": False})
    torch.manual_seed(1)
    first = sum(training.train_step(state, ctx, *batch(0))["mse"] for _ in range(5)) / 5
    for _ in range(60):
        training.train_step(state, ctx, *batch(0))
    last = sum(training.train_step(state, ctx, *batch(0))["mse"] for _ in range(5)) / 5
    assert last < 0.7 * first


def test_checkpoint_round_trip_restores_everything(tmp_path):
    state, ctx = make_state()
    for i in range(4):
        training.train_step(state, ctx, *batch(i))
    training.save_checkpoint(state, str(tmp_path))
    fresh, _ = make_state(seed=1)
    training.load_checkpoint(fresh, str(tmp_path))
    assert fresh.step == 4 and fresh.resumed_at == [4]
    for n, p in state.trainable.items():
        assert torch.equal(fresh.trainable[n], p) and torch.equal(fresh.ema[n], state.ema[n])
        for k, v in state.optimizer.state[p].items():
            assert torch.equal(fresh.optimizer.state[fresh.trainable[n]][k], v), (n, k)
    assert torch.equal(fresh.objective.pred.buffer, state.objective.pred.buffer)
    assert torch.equal(fresh.objective.real.count, state.objective.real.count)
    # the next step is identical from the original and the restored state
    torch.manual_seed(7)
    a = training.train_step(state, ctx, *batch(9))
    torch.manual_seed(7)
    b = training.train_step(fresh, ctx, *batch(9))
    assert abs(a["loss"] - b["loss"]) < 1e-6


def test_checkpoint_of_another_model_is_refused(tmp_path):
    from mmdist.errors import ArtifactError

    state, ctx = make_state()
    for i in range(2):  # the saved weights differ from a fresh model's
        training.train_step(state, ctx, *batch(i))
    training.save_checkpoint(state, str(tmp_path))
    other, _ = make_state(trainable="full")
    before = {n: p.detach().clone() for n, p in other.trainable.items()}
    with pytest.raises(ArtifactError, match="does not match the model") as e:
        training.load_checkpoint(other, str(tmp_path))
    assert "\n" not in str(e.value) and other.step == 0
    assert all(torch.equal(before[n], p) for n, p in other.trainable.items())  # refused before any change


def test_nan_latents_are_refused_before_the_step():
    state, ctx = make_state()
    x, _, y = batch()
    x[0, 0, 0, 0] = float("nan")
    before = {k: v.detach().clone() for k, v in state.trainable.items()}
    with pytest.raises(DataError, match="step 1: the batch has NaN/Inf latents"):
        training.train_step(state, ctx, x, None, y)
    assert state.step == 0 and all(torch.equal(before[k], v) for k, v in state.trainable.items())


def test_ema_warmup_schedule_and_the_share_of_the_start_left():
    assert training.ema_decay_at(1, 0.999, warmup=True) == pytest.approx(2 / 11)
    assert training.ema_decay_at(100_000, 0.999, warmup=True) == 0.999
    assert training.ema_decay_at(1, 0.999, warmup=False) == 0.999
    # docs/method.md §1.10: 300 steps at 0.999 keep 74 % of the backbone; 12k at 0.9999 keep 30 %
    assert training.ema_start_share(300, 0.999, warmup=False) == pytest.approx(0.999 ** 300)
    assert training.ema_start_share(12_000, 0.9999, warmup=False) == pytest.approx(0.30, abs=0.01)
    assert training.ema_start_share(300, 0.999, warmup=True) < 1e-6


def _two_class_pretrain(warmup: bool, steps: int = 400) -> torch.nn.Module:
    """A tiny DiT pretrained from scratch on two flat 8x8 classes (-0.8 and +0.8); its EMA model."""
    torch.manual_seed(0)
    model = diffusion.create_dit("tiny", sample_size=8, in_channels=1, num_classes=2)
    state = training.build_state(model, trainable="full", lr=3e-3, weight_decay=0.0, objective=None)
    ctx = training.StepContext(diffusion=GaussianDiffusion(), class_ids=torch.tensor([0, 1]), null_id=2,
                               class_dropout=0.1, scaling_factor=1.0, hflip=False, ema_decay=0.999,
                               autocast="no", ema_warmup=warmup)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        labels = torch.randint(0, 2, (32,), generator=g)
        x = (labels.float() * 1.6 - 0.8).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
        training.train_step(state, ctx, x, None, labels)
    return training.apply_weights(state.model, {f"ema/{k}": v for k, v in state.ema.items()}, "ema")


def test_a_short_pretrains_ema_samples_its_classes_not_noise():
    """Issue 12 cause 1: at decay 0.999 without warm-up, 400 steps leave 67 % of the random
    initialisation in the EMA and its samples are noise; with warm-up they are the classes."""
    from mmdist.models.sampler import sample_latents

    def class_means(model):
        out = []
        for c in (0, 1):
            gens = [torch.Generator().manual_seed(k) for k in range(6)]
            z = sample_latents(model.eval(), class_ids=[c] * 6, generators=gens, latent_shape=(1, 8, 8),
                               steps=25, guidance_scale=1.0)
            out.append((float(z.mean()), float(z.std(dim=(1, 2, 3)).mean())))
        return out

    (m0, s0), (m1, s1) = class_means(_two_class_pretrain(warmup=True))
    assert m0 < -0.3 and m1 > 0.3 and s0 < 0.3 and s1 < 0.3, (m0, s0, m1, s1)
    (n0, t0), (n1, t1) = class_means(_two_class_pretrain(warmup=False))
    assert not (n0 < -0.3 and n1 > 0.3 and t0 < 0.3 and t1 < 0.3), (n0, t0, n1, t1)


def test_epoch_cache_deals_every_kept_row_once_per_epoch_in_a_seeded_order():
    from mmdist.training import EpochCache

    rows = {"x": torch.arange(22.0)[:, None].repeat(1, 3), "label": torch.arange(22) % 5}
    batches = [{k: v[i:i + 8] for k, v in rows.items()} for i in range(0, 22, 8)]  # 8, 8, 6 rows
    cache = EpochCache(budget_bytes=10_000)
    for b in batches:
        cache.add(b)
    assert not cache.ready  # only once the first epoch was read to its end
    cache.epoch_done()
    assert cache.ready
    one = list(cache.batches(4, seed=1))
    assert [len(b["x"]) for b in one] == [4] * 5  # 22 rows: five full batches, the rest dropped
    seen = torch.cat([b["x"][:, 0] for b in one]).long()
    assert len(set(seen.tolist())) == 20 and all(b["label"].tolist() == (b["x"][:, 0].long() % 5).tolist() for b in one)
    again = torch.cat([b["x"][:, 0] for b in cache.batches(4, seed=1)])
    other = torch.cat([b["x"][:, 0] for b in cache.batches(4, seed=2)])
    assert torch.equal(again.long(), seen) and not torch.equal(other.long(), seen)

    small = EpochCache(budget_bytes=200)  # 22 rows of 3 float32 + an int64 label: over budget
    for b in batches:
        small.add(b)
    small.epoch_done()
    assert not small.ready and small.parts == []
