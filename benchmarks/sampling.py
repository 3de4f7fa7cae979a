"""Sampling benchmark: per-class Ray actors (2 vs 1), batched vs batch-1 sampling, DiT-XL/2 on a GPU.

    python benchmarks/sampling.py [--quick]  ->  benchmarks/results/sampling.json (or sampling.quick.json)

Setup (built here): 4 Fashion-MNIST classes in pixel space (identity encoder, 28x28x1) encoded
with ``mmdist.encode.main`` (8 images per class: only the manifest matters here), and a randomly
initialised DiT of the ``fashion-mnist`` size (6 layers, 4 heads x 32, patch 4, learned sigma).
``mmdist.sample.main`` needs a finished fine-tune artifact; instead of training one, the
benchmark publishes that DiT as the minimax variant with ``mmdist.finetune.adopt``
(sampling cost does not depend on the weights). Sampler: the paper's DDPM with the learned
variance, classifier-free guidance 4.0 on every channel, one variant (``sample.baseline`` off and
only the minimax row in ``evaluate.methods``; the default's rows would also draw 'diffusion').

``two_over_one_actor`` (throughput ratio, higher is better, goal >= 1.7 on 2 cores)
    Images per second of ``mmdist.sample.main`` with ``sample.num_actors=2`` divided by the same
    with 1 actor; each actor gets 1 torch thread (``ray_runtime.torch_threads`` of its CPU
    share: 0.75 and 1.75 CPUs), 4 classes x IPC 16, one forward batch per class (batch 16).
    Wall time of the whole stage after ``ray.init`` (timed separately, excluded): it includes
    starting the actors and loading the DiT in each, writing PNGs, Parquet and grids. The full
    mode runs 1, 2, 2, 1 actors (ABBA) and pools each pair. ``two_over_one_actor_class_seconds``
    is the same ratio from the per-class sampling seconds in the class markers (actor start-up
    excluded, perfect balance of 4 classes over 2 actors assumed).

``batched_over_batch1`` (throughput ratio, higher is better)
    In this process, 1 torch thread, the same DiT, steps and guidance: images per second of
    ``sample_latents`` drawing 16 images (4 classes) in one call, divided by 16 calls of one image
    each. Each image has its own generator, so both draw the same images (the maximum absolute
    difference is recorded as a check). The batched call runs before and after the batch-1
    loop (A, B, A) and the two are pooled.

``gpu`` (when ``torch.cuda.is_available()``, else null)
    Seconds per image of a DiT-XL/2-sized model with random weights (``create_dit("DiT-XL/2",
    sample_size=32, in_channels=4, num_classes=1000)``, i.e. 256-px images' latents): one batched
    ``sample_latents`` call, 50 DDPM steps, guidance 4.0 on 3 of 4 channels, bf16 autocast,
    after a 2-step warm-up; VAE decoding not included.

Machine facts (CPU count, versions, date, load at start and end, other processes' CPU share just
before the run) are under ``machine``; ``loadavg_before`` is recorded for each measurement.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets RAY_AUTH_MODE and sys.path before Ray or mmdist load)

FMNIST = "/usr/share/datasets/fashion-mnist"
FULL = dict(classes=4, ipc=16, batch_size=16, steps=50, guidance=4.0, rounds=2, batched_images=16,
            gpu_batch=32)
QUICK = dict(classes=4, ipc=4, batch_size=4, steps=10, guidance=4.0, rounds=1, batched_images=8,
             gpu_batch=8)


def make_config(tmp: str, p: dict) -> object:
    """4 Fashion-MNIST classes, pixel space; sampling settings from ``p``."""
    from mmdist.config import Config, DataConfig, EncodeConfig, EvaluateConfig, SampleConfig, absolute_paths
    from mmdist.datasets import FASHION_MNIST_CLASSES

    return absolute_paths(Config(
        name="bench-sampling", output=os.path.join(tmp, "unused"), latents=os.path.join(tmp, "latents"),
        data=DataConfig(train=FMNIST, classes=FASHION_MNIST_CLASSES[: p["classes"]], max_per_class=8,
                        download=False),
        encode=EncodeConfig(shard_rows=64),
        sample=SampleConfig(ipc=p["ipc"], batch_size=p["batch_size"], scheduler="ddpm", steps=p["steps"],
                            guidance_scale=p["guidance"], baseline=False),
        # only the minimax variant: the default's evaluation rows would also draw 'diffusion'
        evaluate=EvaluateConfig(methods=("minimax",)),
    ))


def make_dit(folder: str, latents: dict, seed: int = 0) -> str:
    """A random ``fashion-mnist``-size DiT with learned sigma, saved with save_dit."""
    import torch

    from mmdist.models.diffusion import create_dit, save_dit

    torch.manual_seed(seed)
    c, h, _ = latents["latent_shape"]
    model = create_dit("fashion-mnist", sample_size=h, in_channels=c, num_classes=len(latents["classes"]))
    save_dit(model, folder)
    return folder


def publish_finetune(cfg: object, latents: dict, dit: str) -> None:
    """Stand in for a fine-tune: the DiT as the minimax variant, published without training."""
    from mmdist import finetune

    finetune.adopt(cfg, dit, note="benchmark stand-in: random weights, no training")


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------


def sample_run(cfg: object, latents: dict, dit: str, output: str, actors: int) -> dict:
    """``mmdist.sample.main`` with ``actors`` actors into a fresh output; stage wall and markers."""
    from mmdist import ray_runtime, sample, storage

    run = dataclasses.replace(cfg, output=output, sample=dataclasses.replace(cfg.sample, num_actors=actors))
    # what sample._sample_variant gives each actor (computed inline there)
    threads = ray_runtime.torch_threads(ray_runtime.share(ray_runtime.cluster_cpus(), actors, reserve=0.25))
    publish_finetune(run, latents, dit)
    load = common.loadavg()
    start = time.perf_counter()
    manifest = sample.main(run)
    seconds = time.perf_counter() - start
    classes = storage.join(output, "samples", "minimax", "classes")
    markers = [storage.read_json(storage.join(classes, n)) for n in storage.listdir(classes)]
    images = sum(m["count"] for m in markers)
    assert images == len(manifest["classes"]) * cfg.sample.ipc, (images, manifest["classes"])
    return {"actors": actors, "threads_per_actor": threads, "images": images, "seconds": seconds,
            "images_per_second": images / seconds,
            "class_seconds": [m["seconds"] for m in markers], "loadavg_before": load}


def pooled(runs: list[dict]) -> dict:
    """Total images / total seconds over runs, and the mean per-class seconds."""
    images, seconds = sum(r["images"] for r in runs), sum(r["seconds"] for r in runs)
    classes = [s for r in runs for s in r["class_seconds"]]
    return {"images_per_second": images / seconds, "images": images, "seconds": seconds,
            "class_seconds_mean": sum(classes) / len(classes)}


def batched_vs_batch1(dit: str, latents: dict, p: dict) -> dict:
    """``sample_latents``: one call for N images vs N calls for 1 (same model, steps, guidance)."""
    import torch

    from mmdist.models.diffusion import load_dit
    from mmdist.models.sampler import sample_latents
    from mmdist.seeding import derive_seed

    common.set_torch_threads(1)
    model = load_dit(dit).eval()
    n, k = p["batched_images"], len(latents["classes"])
    shape = tuple(latents["latent_shape"])
    kw = dict(latent_shape=shape, scheduler="ddpm", steps=p["steps"], guidance_scale=p["guidance"])

    def gens(indices: range) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(derive_seed(0, "sample", i % k, i)) for i in indices]

    sample_latents(model, class_ids=[0, 1], generators=gens(range(2)), **{**kw, "steps": 2})  # warm-up
    timings: dict[str, list[float]] = {"batched": [], "batch1": []}
    load = common.loadavg()
    for which in ("batched", "batch1", "batched"):
        start = time.perf_counter()
        if which == "batched":
            z_batched = sample_latents(model, class_ids=[i % k for i in range(n)], generators=gens(range(n)),
                                       **kw)
        else:
            z_single = torch.cat([sample_latents(model, class_ids=[i % k], generators=gens(range(i, i + 1)),
                                                 **kw) for i in range(n)])
        timings[which].append(time.perf_counter() - start)
    batched = n * len(timings["batched"]) / sum(timings["batched"])
    single = n / sum(timings["batch1"])
    return {"images": n, "steps": p["steps"], "guidance_scale": p["guidance"], "threads": 1,
            "batched_seconds": timings["batched"], "batch1_seconds": timings["batch1"],
            "batched_images_per_second": batched, "batch1_images_per_second": single,
            "batched_over_batch1": batched / single, "loadavg_before": load,
            "max_abs_diff_batched_vs_batch1": float((z_batched - z_single).abs().max())}


def gpu_xl(p: dict, size: str = "DiT-XL/2", device: str = "cuda", steps: int = 50) -> dict:
    """Seconds per image of a random DiT-XL/2 (256-px latents), batched, CFG 4, bf16 autocast."""
    import torch

    from mmdist.models.diffusion import create_dit
    from mmdist.models.sampler import sample_latents

    torch.manual_seed(0)
    model = create_dit(size, sample_size=32, in_channels=4, num_classes=1000).to(device).eval()
    n = p["gpu_batch"]
    kw = dict(latent_shape=(4, 32, 32), scheduler="ddpm", guidance_scale=4.0, guidance_channels=3,
              autocast="bf16")
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    ids = [i * 7 % 1000 for i in range(n)]

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    sample_latents(model, class_ids=ids, generators=gens, steps=2, **kw)  # warm-up (kernels, allocator)
    sync()
    start = time.perf_counter()
    z = sample_latents(model, class_ids=ids, generators=gens, steps=steps, **kw)
    sync()
    seconds = time.perf_counter() - start
    return {"model": size, "parameters": sum(q.numel() for q in model.parameters()), "batch": n,
            "steps": steps,
            "guidance_scale": 4.0, "guidance_channels": 3, "autocast": "bf16", "seconds": seconds,
            "seconds_per_image": seconds / n, "finite": bool(torch.isfinite(z).all()),
            "device": torch.cuda.get_device_name(0) if device == "cuda" else device,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
            "vae_decode": "not included"}


def main() -> None:
    """Encode, build the DiT, run the actor comparison, the batching comparison and the GPU figure."""
    import torch

    args = common.parse_args(__doc__, "sampling")
    p = QUICK if args.quick else FULL
    facts = common.machine_facts()
    common.set_torch_threads(1)
    tmp = common.scratch("sampling")
    try:
        ray_start = common.start_ray(num_cpus=2)
        from mmdist import encode

        cfg = make_config(tmp, p)
        latents = encode.main(cfg)
        dit = make_dit(os.path.join(tmp, "dit"), latents)
        common.log.info("batched vs batch-1 sample_latents")
        batching = batched_vs_batch1(dit, latents, p)
        order = [1, 2, 2, 1] if p["rounds"] == 2 else [1, 2]
        runs: dict[int, list[dict]] = {1: [], 2: []}
        for i, actors in enumerate(order):
            common.log.info("sample.main %d/%d with %d actor(s)", i + 1, len(order), actors)
            runs[actors].append(sample_run(cfg, latents, dit, os.path.join(tmp, f"s{i}-{actors}"), actors))
    finally:
        common.stop_ray()
        common.cleanup(tmp, args.keep)
    one, two = pooled(runs[1]), pooled(runs[2])
    gpu = None
    if torch.cuda.is_available():
        common.log.info("GPU: DiT-XL/2, 50 steps, CFG, bf16")
        try:
            gpu = gpu_xl(p)
        except Exception as e:  # report, do not lose the CPU figures
            gpu = {"error": f"{type(e).__name__}: {e}"}

    result = {
        "two_over_one_actor": common.ratio(two["images_per_second"], one["images_per_second"]),
        "two_over_one_actor_class_seconds": common.ratio(2 * one["class_seconds_mean"],
                                                         two["class_seconds_mean"]),
        "batched_over_batch1": batching["batched_over_batch1"],
        "gpu": gpu,
        "quick": args.quick,
        "actors": {"one": one, "two": two, "runs": runs, "order": order},
        "batching": batching,
        "ray_start_seconds": ray_start,
        "sizes": {**p, "latent_shape": latents["latent_shape"], "scheduler": "ddpm",
                  "dit": "fashion-mnist size (6 layers, 4 heads x 32, patch 4), learned sigma, random init"},
        "machine": common.finish_facts(facts),
    }
    common.write_json(args.out, common.rnd(result))
    print(f"machine: {facts['cpu_count']} CPUs, loadavg {facts['loadavg_start']} -> {facts['loadavg_end']}, "
          f"others busy {facts['cpu_busy_fraction_start']:.0%} at start; "
          f"ray start-up {ray_start:.1f} s (excluded)")
    for name, r in (("1 actor: ", one), ("2 actors:", two)):
        print(f"sample.main {name} {r['images_per_second']:.2f} img/s "
              f"({r['images']} images, {r['seconds']:.1f} s)")
    print(f"two_over_one_actor = {result['two_over_one_actor']:.3f} (goal >= 1.7); "
          f"from per-class seconds: {result['two_over_one_actor_class_seconds']:.3f}")
    print(f"sample_latents batched: {batching['batched_images_per_second']:.2f} img/s, "
          f"batch-1: {batching['batch1_images_per_second']:.2f} img/s")
    print(f"batched_over_batch1 = {result['batched_over_batch1']:.3f}")
    print("gpu: " + ("null (no CUDA device)" if gpu is None else
                     f"{gpu.get('seconds_per_image', float('nan')):.3f} s/image {gpu}"))


if __name__ == "__main__":
    main()
