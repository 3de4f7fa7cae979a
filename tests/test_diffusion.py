"""The DiT factory, DiffFit, the DiT loss, the sampler pieces and the VAE loading code."""

import numpy as np
import pytest
import torch

from mmdist.models import diffusion as D
from mmdist.models.gaussian_diffusion import GaussianDiffusion
from mmdist.models.sampler import guide, sample_latents


def tiny(classes=10, size=16, channels=1, learn_sigma=True):
    torch.manual_seed(0)
    return D.create_dit("tiny", sample_size=size, in_channels=channels, num_classes=classes, learn_sigma=learn_sigma)


def test_difffit_trainable_set_on_dit_xl2_is_the_papers():
    """docs/method.md §1.3: biases + 14x4 gammas + the whole class table, ~1.74 M on DiT-XL/2."""
    with torch.device("meta"):
        model = D.create_dit("DiT-XL/2", sample_size=32, in_channels=4, num_classes=1000)
    params = D.mark_trainable(model, "difffit")
    # per block: q,k,v,out biases 4*1152, MLP biases 4608+1152, adaLN bias 6912 -> 17280 x 28
    biases = 17280 * 28 + 2 * 1152 + 1152 + 2 * 1152 + 2 * 2 * 8
    gammas = 14 * (3 * 1152 + 3 * 1152)
    table = 1001 * 1152
    assert sum(p.numel() for p in params.values()) == biases + gammas + table == 1_739_552
    assert not any("norm1.linear.weight" in n for n in params)  # adaLN weights stay frozen
    assert sum(p.numel() for p in model.parameters()) == 674_931_488  # DiT-XL/2, one embedder


def test_embedders_are_tied_and_survive_save_load(tmp_path):
    model = tiny()
    blocks = model.transformer_blocks
    assert blocks[1].norm1.emb is blocks[0].norm1.emb
    D.save_dit(model, str(tmp_path))
    loaded = D.load_dit(str(tmp_path))
    assert loaded.transformer_blocks[1].norm1.emb is loaded.transformer_blocks[0].norm1.emb
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([1, 500, 999]), torch.tensor([0, 3, 10])
    assert torch.allclose(D.dit_forward(model, x, t, y), D.dit_forward(loaded, x, t, y), atol=1e-6)


def test_label_dropout_is_ours_once_per_sample():
    model = tiny().train()
    assert all(b.norm1.emb.class_embedder.dropout_prob == 0 for b in model.transformer_blocks)
    labels = torch.zeros(20000, dtype=torch.long)
    dropped = D.drop_labels(labels, null_id=10, p=0.1, generator=torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0, 10}
    assert abs((dropped == 10).float().mean().item() - 0.1) < 0.01


def test_difffit_scales_fold_exactly_into_the_weights(tmp_path):
    model = tiny()
    params = D.mark_trainable(model, "difffit")
    with torch.no_grad():
        for name, p in params.items():
            p.add_(torch.randn_like(p) * 0.1)
    assert sum("difffit_gamma" in n for n in params) == 1 * 6  # first half of 2 blocks: q,k,v,proj x2,mlp
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([10, 900]), torch.tensor([1, 2])
    before = D.dit_forward(model, x, t, y)
    D.save_dit(model, str(tmp_path))
    plain = D.load_dit(str(tmp_path))
    assert not any("difffit" in n for n, _ in plain.named_parameters())
    assert torch.allclose(before, D.dit_forward(plain, x, t, y), atol=1e-5)


def test_x0_prediction_inverts_the_forward_process():
    g = GaussianDiffusion()
    x0, eps = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    assert torch.allclose(g.predict_x0(g.q_sample(x0, t, eps), t, eps), x0, atol=1e-4)


def test_vb_term_vanishes_at_the_true_posterior():
    """KL(q(x_{t-1}|x_t,x0) || p) = 0 when eps is exact and the variance is the posterior's."""
    g = GaussianDiffusion()
    x0, eps = torch.rand(4, 2, 8, 8) * 2 - 1, torch.randn(4, 2, 8, 8)
    t = torch.tensor([1, 50, 400, 999])
    xt = g.q_sample(x0, t, eps)
    exact = torch.cat([eps, -torch.ones_like(eps)], dim=1)  # frac 0 -> posterior log-variance
    out = g.losses(exact, x0, xt, t, eps)
    assert torch.allclose(out["vb"], torch.zeros(4), atol=1e-4) and torch.allclose(out["mse"], torch.zeros(4))
    worse = torch.cat([eps, torch.ones_like(eps)], dim=1)  # frac 1 -> beta_t, not the posterior
    kl = g.losses(worse, x0, xt, t, eps)["vb"]
    assert (kl > 0).all() and kl[0] > 0.1  # beta_t and the posterior variance differ most at small t
    at_zero = g.losses(exact, x0, xt, torch.zeros(4, dtype=torch.long), eps)["vb"]
    assert torch.isfinite(at_zero).all() and (at_zero > 0).all()  # the decoder NLL at t = 0


def test_learned_sigma_loss_has_vb_and_fixed_does_not():
    g = GaussianDiffusion()
    x0 = torch.randn(2, 1, 8, 8)
    assert "vb" in g.losses(torch.randn(2, 2, 8, 8), x0, x0, torch.tensor([3, 4]), x0)
    assert "vb" not in g.losses(torch.randn(2, 1, 8, 8), x0, x0, torch.tensor([3, 4]), x0)


def test_ddpm_timesteps_are_adm_respaced():
    sched = D.make_scheduler("ddpm", learn_sigma=True, steps=50)
    stride = (1000 - 1) / (50 - 1)  # ADM space_timesteps(1000, "50")
    adm = sorted({round(i * stride) for i in range(50)}, reverse=True)
    assert sched.timesteps.tolist() == adm
    assert sched.config.variance_type == "learned_range" and not sched.config.clip_sample


def test_guidance_only_on_the_first_channels():
    cond = torch.randn(2, 8, 4, 4)
    uncond = torch.randn(2, 8, 4, 4)
    out = guide(cond, uncond, 4.0, channels=4, guided=3)
    assert torch.allclose(out[:, :3], uncond[:, :3] + 4 * (cond[:, :3] - uncond[:, :3]))
    assert torch.equal(out[:, 3:], cond[:, 3:])  # 4th eps channel and the variance: conditional pass


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "dpm"])
def test_sampling_depends_only_on_each_images_generator(scheduler):
    model = tiny().eval()
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    both = sample_latents(model, class_ids=[1, 2], generators=gens([5, 6]), latent_shape=(1, 16, 16),
                          scheduler=scheduler, steps=4, guidance_scale=2.0)
    alone = sample_latents(model, class_ids=[2], generators=gens([6]), latent_shape=(1, 16, 16),
                           scheduler=scheduler, steps=4, guidance_scale=2.0)
    assert torch.allclose(both[1], alone[0], atol=1e-5)
    assert torch.isfinite(both).all()


def test_vae_loads_with_from_pretrained_and_round_trips_shapes(tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=16, scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "vae")
    enc = D.LatentEncoder(str(tmp_path / "vae"))
    assert enc.scaling_factor == 0.5 and not enc.deterministic
    assert enc.latent_shape(3, 16) == (4, 8, 8)
    mean, std = enc.encode(torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8))
    assert mean.shape == (2, 4, 8, 8) and (std > 0).all()
    images = enc.decode(mean * enc.scaling_factor)
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 16, 16)


def test_identity_encoder_round_trips_pixels_exactly():
    enc = D.LatentEncoder("identity")
    x = torch.from_numpy(np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16))
    mean, std = enc.encode(x)
    assert std is None and mean.min() == -1 and mean.max() == 1
    assert torch.equal(enc.decode(mean), x)


RACE = """
import threading
names = ["DiTTransformer2DModel", "AutoencoderKL"] * 3
start, errors = threading.Barrier(len(names)), []
def load(name):
    start.wait()
    try:
        from mmdist.models import diffusion
        diffusion._diffusers(name)
    except Exception as e:  # without the lock: ImportError or AttributeError, 'cannot import name' / 'no attribute'
        errors.append(repr(e))
threads = [threading.Thread(target=load, args=(n,)) for n in names]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert not errors, errors
"""


def test_diffusers_imported_from_several_threads_at_once_in_a_fresh_process():
    """The phases of finetune.class_phases export side by side from the driver's threads; diffusers'
    lazy module, imported for the first time by two threads at once, raised "cannot import name
    'DiTTransformer2DModel'" in a 2-node CI run. Each try is a fresh interpreter whose threads
    import it all at once (without the lock every try here failed)."""
    import subprocess
    import sys

    for _ in range(2):
        run = subprocess.run([sys.executable, "-c", RACE], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
