"""GPU benchmark: DiT-XL/2 fine-tuning and sampling through mmdist's own code, on one GPU, in minutes.

    python benchmarks/gpu.py                  ->  benchmarks/results/gpu.json   (one CUDA GPU, < 8 min)
    python benchmarks/gpu.py --tiny --device cpu --out x.json   (a tiny DiT: what the test suite runs)

Models (random weights, nothing downloaded): DiT-XL/2 built from its published configuration
(``DIT_XL_2``: 28 blocks, 16 heads x 72, patch 2, 4x32x32 latents of 256-px images, learned
sigma, 1000 classes) and the SD VAE architecture (``SD_VAE``). Every weight is drawn from
N(0, 0.02), so no zero-initialised layer short-cuts the arithmetic.

``finetune`` -- ``training.train_step`` as a Ray Train worker calls it: DiffFit trainable set,
    minimax objective (1000 classes, 64-entry memories in bf16, dataset-mean centring off as in
    the recipes), bf16 autocast, AdamW, EMA; ``batch`` images per step (32 = the ImageNet-1K job's
    per-GPU batch). Steps/s and images/s after warm-up steps; MFU = images/s x 2F / peak (DiffFit
    skips the frozen weights' gradients, docs/scaling.md §3), with the 3F bound beside it.
``sampling`` -- ``sampler.sample_latents`` for ``sample_batch`` images in one call, 50 DDPM steps,
    guidance 4.0 on 3 of 4 channels (the doubled batch), bf16 autocast, in four variants: eager
    with PyTorch's default attention kernel choice, eager forced to flash attention, eager forced
    to the math kernel (no fused attention), and ``torch.compile`` with flash attention. Seconds
    per image and MFU = images/s x 100 F / peak; the largest difference of each variant's latents
    from the default's (same generators) shows they draw the same images.
``vae_decode`` -- ``LatentEncoder.decode`` (fp32, what the sample stage runs) and the same under
    bf16 autocast: seconds per 256-px image.
Peak memory is ``torch.cuda.max_memory_allocated`` per section. F, the FLOPs of one forward, is
docs/scaling.md's count: 2 x (L x 12 D^2 T + L x 2 T^2 D) (237 GFLOP for DiT-XL/2 at 256 px).
Sections run in order under a time budget (``--budget``); one that would start past it is
recorded as skipped, so a short lease still brings back the figures measured so far.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets sys.path before mmdist loads)

# DiT-XL/2 as published (DiT paper Table 1; facebook/DiT-XL-2-256 transformer config), and the
# Stable Diffusion VAE (stabilityai/sd-vae-ft-mse config).
DIT_XL_2 = dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, patch_size=2, sample_size=32,
                in_channels=4, out_channels=8, num_embeds_ada_norm=1000)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
              block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256, scaling_factor=0.18215)
TINY_DIT = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, patch_size=2, sample_size=8,
                in_channels=4, out_channels=8, num_embeds_ada_norm=10)
TINY_VAE = dict(SD_VAE, layers_per_block=1, norm_num_groups=8, block_out_channels=(8, 16),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                sample_size=16)
FULL = dict(dit=DIT_XL_2, vae=SD_VAE, batch=32, warmup_steps=5, steps=30, sample_batch=64, sample_steps=50,
            decode_batch=32)
TINY = dict(dit=TINY_DIT, vae=TINY_VAE, batch=8, warmup_steps=1, steps=3, sample_batch=4, sample_steps=4,
            decode_batch=4)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense bf16 (vendor sheets)


def forward_flops(dit: dict[str, Any]) -> float:
    """FLOPs of one forward per image: 2 x (L x 12 D^2 T + L x 2 T^2 D) (docs/scaling.md §3)."""
    d = dit["num_attention_heads"] * dit["attention_head_dim"]
    tokens = (dit["sample_size"] // dit["patch_size"]) ** 2
    layers = dit["num_layers"]
    return 2.0 * (layers * 12 * d * d * tokens + layers * 2 * tokens * tokens * d)


def peak_flops(device: str, given_tflops: float | None = None) -> float | None:
    """The GPU's dense bf16 peak (given, else by name); None on the CPU or an unknown GPU (no MFU)."""
    import torch

    if given_tflops:
        return given_tflops * 1e12
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def build_dit(dit: dict[str, Any], device: str) -> Any:
    """A DiT from a published-style config, random N(0, 0.02) weights, embedders tied as mmdist does."""
    import torch
    from diffusers import DiTTransformer2DModel

    from mmdist.models.diffusion import prepare_dit

    torch.manual_seed(0)
    model = prepare_dit(DiTTransformer2DModel(**dit, norm_eps=1e-6), tie=True)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.to(device)


def build_vae(vae: dict[str, Any], folder: str) -> str:
    """The VAE architecture with random weights, saved where ``LatentEncoder`` loads it (from_pretrained)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(**vae).save_pretrained(folder, safe_serialization=True)
    return folder


class Clock:
    """Wall time with the device synchronised, and the peak memory since the last reset."""

    def __init__(self, device: str):
        import torch

        self.device, self.torch = device, torch

    def sync(self) -> None:
        """Wait for queued kernels."""
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        """Start a new peak-memory window."""
        if self.device == "cuda":
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        """Peak memory allocated since ``reset_peak`` (None on the CPU)."""
        return self.torch.cuda.max_memory_allocated() / 2**30 if self.device == "cuda" else None


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


def finetune(p: dict, device: str, clock: Clock, peak: float | None) -> dict:
    """DiffFit + minimax train steps in bf16 at ``batch`` images: steps/s, images/s, MFU."""
    import torch

    from mmdist import training
    from mmdist.models.gaussian_diffusion import GaussianDiffusion
    from mmdist.models.minimax import MinimaxObjective, SingleProcess

    dit = p["dit"]
    model = build_dit(dit, device)
    shape = (dit["in_channels"], dit["sample_size"], dit["sample_size"])
    classes = dit["num_embeds_ada_norm"]
    objective = MinimaxObjective(classes, int(torch.tensor(shape).prod()), memory_size=64, lambda_rep=0.002,
                                 lambda_div=0.008, use_rep=True, use_div=True, center=None,
                                 memory_dtype="bfloat16", device=torch.device(device))
    state = training.build_state(model, trainable="difffit", lr=1e-4, weight_decay=0.0, objective=objective)
    ctx = training.StepContext(diffusion=GaussianDiffusion(), class_ids=torch.arange(classes, device=device),
                               null_id=classes, class_dropout=0.1, scaling_factor=0.18215, hflip=True,
                               ema_decay=0.9999, autocast="bf16" if device == "cuda" else "no")
    g = torch.Generator().manual_seed(0)
    batch = p["batch"]
    mean = torch.randn(batch, *shape, generator=g).to(device)
    std = (0.1 * torch.rand(batch, *shape, generator=g)).to(device)
    labels = torch.randint(0, classes, (batch,), generator=g).to(device)
    collective = SingleProcess()
    for _ in range(p["warmup_steps"]):
        training.train_step(state, ctx, mean, std, labels, None, collective)
    clock.sync()
    clock.reset_peak()
    start = time.perf_counter()
    for _ in range(p["steps"]):
        metrics = training.train_step(state, ctx, mean, std, labels, None, collective)
    clock.sync()
    seconds = time.perf_counter() - start
    images_per_second = p["steps"] * batch / seconds
    f = forward_flops(dit)
    return {"batch": batch, "steps": p["steps"], "seconds": seconds, "steps_per_second": p["steps"] / seconds,
            "images_per_second": images_per_second, "autocast": ctx.autocast,
            "trainable_parameters": sum(t.numel() for t in state.trainable.values()),
            "mfu_2f": None if peak is None else images_per_second * 2 * f / peak,
            "mfu_3f_bound": None if peak is None else images_per_second * 3 * f / peak,
            "peak_memory_gib": clock.peak_gib(), "final_loss": metrics["loss"]}


def sampling_variant(model: Any, p: dict, device: str, clock: Clock, peak: float | None, attention: str,
                     compiled: bool, backend: str) -> tuple[dict, Any]:
    """One batched ``sample_latents`` call in bf16 under an attention kernel choice, eager or compiled."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mmdist.models.sampler import sample_latents

    dit, n = p["dit"], p["sample_batch"]
    classes = dit["num_embeds_ada_norm"]
    kernels = {"flash": sdpa_kernel([SDPBackend.FLASH_ATTENTION]), "math": sdpa_kernel([SDPBackend.MATH]),
               "default": nullcontext()}
    net = torch.compile(model, backend=backend) if compiled else model
    kw = dict(class_ids=[i * 7 % classes for i in range(n)],
              latent_shape=(dit["in_channels"], dit["sample_size"], dit["sample_size"]), scheduler="ddpm",
              guidance_scale=4.0, guidance_channels=3, autocast="bf16")

    def gens() -> list:
        return [torch.Generator().manual_seed(i) for i in range(n)]

    with kernels[attention]:
        warm = time.perf_counter()
        sample_latents(net, generators=gens(), steps=2, **kw)  # kernels, allocator; compilation
        clock.sync()
        warmup_seconds = time.perf_counter() - warm
        clock.reset_peak()
        start = time.perf_counter()
        z = sample_latents(net, generators=gens(), steps=p["sample_steps"], **kw)
        clock.sync()
    seconds = time.perf_counter() - start
    per_image = seconds / n
    flops = 2 * p["sample_steps"] * forward_flops(dit)  # conditional + unconditional pass per step
    return {"attention": attention, "compiled": compiled, "compile_backend": backend if compiled else None,
            "batch": n, "steps": p["sample_steps"], "seconds": seconds, "seconds_per_image": per_image,
            "warmup_seconds": warmup_seconds, "mfu": None if peak is None else flops / per_image / peak,
            "peak_memory_gib": clock.peak_gib(), "finite": bool(torch.isfinite(z).all())}, z


def sampling(p: dict, device: str, clock: Clock, peak: float | None, backend: str, deadline: float) -> dict:
    """The four sampling variants on one model; differences of their latents from the default's."""
    model = build_dit(p["dit"], device).eval()
    out, reference = {}, None
    for name, attention, compiled in (("eager_default", "default", False), ("eager_flash", "flash", False),
                                      ("eager_math", "math", False), ("compiled_flash", "flash", True)):
        if time.time() > deadline:
            out[name] = {"skipped": "time budget spent"}
            continue
        common.log.info("sampling: %s", name)
        try:
            row, z = sampling_variant(model, p, device, clock, peak, attention, compiled, backend)
        except Exception as e:  # a kernel the device lacks must not cost the other figures
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        reference = z if reference is None else reference
        row["max_abs_diff_vs_default"] = float((z - reference).abs().max())
        out[name] = row
    timed = {k: v["seconds_per_image"] for k, v in out.items() if "seconds_per_image" in v}
    out["best"] = min(timed, key=timed.get) if timed else None
    return out


def vae_decode(p: dict, device: str, clock: Clock, folder: str) -> dict:
    """Seconds per image of ``LatentEncoder.decode`` (fp32) and of the same under bf16 autocast."""
    import torch

    from mmdist.models.diffusion import LatentEncoder

    decoder = LatentEncoder(build_vae(p["vae"], folder), device=device)
    dit = p["dit"]
    z = torch.randn(p["decode_batch"], dit["in_channels"], dit["sample_size"], dit["sample_size"],
                    generator=torch.Generator().manual_seed(0))
    out = {"batch": p["decode_batch"]}
    for name in ("fp32", "bf16"):
        amp = torch.autocast(device_type=device, dtype=torch.bfloat16) if name == "bf16" else nullcontext()
        with amp:
            images = decoder.decode(z[:2])  # warm-up
            clock.sync()
            clock.reset_peak()
            start = time.perf_counter()
            images = decoder.decode(z)
            clock.sync()
        seconds = time.perf_counter() - start
        out[name] = {"seconds": seconds, "seconds_per_image": seconds / len(z), "peak_memory_gib": clock.peak_gib(),
                     "image_shape": list(images.shape[1:])}
    return out


def summary(result: dict) -> dict:
    """The headline figures beside the issue's goals (<= 0.1 s per image sampling, >= 35 % MFU)."""
    ft, smp = result.get("finetune", {}), result.get("sampling", {})
    best = smp.get(smp.get("best")) if isinstance(smp, dict) and smp.get("best") else None
    return {"finetune_images_per_second": ft.get("images_per_second"), "finetune_mfu_2f": ft.get("mfu_2f"),
            "sampling_best_variant": smp.get("best") if best else None,
            "sampling_seconds_per_image": best["seconds_per_image"] if best else None,
            "sampling_mfu": best["mfu"] if best else None,
            "vae_decode_seconds_per_image": result.get("vae_decode", {}).get("fp32", {}).get("seconds_per_image"),
            "goals": {"sampling_seconds_per_image": 0.1, "finetune_mfu": 0.35}}


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Command line: --tiny, --device, --budget, --compile-backend, --peak-tflops, --out."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny DiT and VAE (CPU check of this script)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds after which sections are skipped")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (tests: eager)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak FLOPS for MFU (default: by GPU name)")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/gpu.json)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the sections in order within the budget; print and write the figures."""
    import tempfile

    import torch

    args = parse(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not args.tiny and device != "cuda":
        raise SystemExit("gpu.py measures DiT-XL/2 on a CUDA GPU; none here (use --tiny --device cpu to check it)")
    out = args.out or os.path.join(common.RESULTS, "gpu.json" if not args.tiny else "gpu.tiny.json")
    p = TINY if args.tiny else FULL
    common.log.setLevel("INFO")
    start = time.time()
    deadline = start + args.budget
    facts = common.machine_facts()
    torch.backends.cuda.matmul.allow_tf32 = True
    clock, peak = Clock(device), peak_flops(device, args.peak_tflops)
    result: dict[str, Any] = {
        "model": "tiny DiT" if args.tiny else "DiT-XL/2", "dit_config": p["dit"],
        "vae_config": {k: list(v) if isinstance(v, tuple) else v for k, v in p["vae"].items()},
        "forward_gflops_per_image": forward_flops(p["dit"]) / 1e9, "peak_flops": peak, "device": device,
        "sizes": {k: v for k, v in p.items() if k not in ("dit", "vae")},
    }
    sections = (("finetune", lambda: finetune(p, device, clock, peak)),
                ("sampling", lambda: sampling(p, device, clock, peak, args.compile_backend, deadline)),
                ("vae_decode", lambda: vae_decode(p, device, clock, tempfile.mkdtemp(prefix="mmdist-bench-vae-"))))
    for name, run in sections:
        if time.time() > deadline:
            result[name] = {"skipped": "time budget spent"}
            continue
        common.log.info("%s", name)
        try:
            result[name] = run()
        except Exception as e:  # report and go on: the other sections' figures still count
            result[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        if device == "cuda":
            torch.cuda.empty_cache()
    result["wall_seconds"] = time.time() - start
    result["summary"] = summary(result)
    result["machine"] = common.finish_facts(facts)
    common.write_json(out, common.rnd(result, 6))
    ft, smp = result["finetune"], result["sampling"]
    if "images_per_second" in ft:
        print(f"finetune: {ft['steps_per_second']:.2f} steps/s, {ft['images_per_second']:.1f} img/s at batch "
              f"{ft['batch']}, MFU(2F) {ft['mfu_2f'] if ft['mfu_2f'] is None else round(ft['mfu_2f'], 3)}")
    for name, row in smp.items() if isinstance(smp, dict) else ():
        if isinstance(row, dict) and "seconds_per_image" in row:
            print(f"sampling {name}: {row['seconds_per_image']:.4f} s/image, MFU {row['mfu']}")
    return result


if __name__ == "__main__":
    main()
