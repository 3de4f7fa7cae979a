"""Fine-tune benchmark: Ray Train overhead over a plain PyTorch loop, and the all-gather's share.

    python benchmarks/finetune.py [--quick]  ->  benchmarks/results/finetune.json (or finetune.quick.json)

Setup (built here, shared by every measurement): Fashion-MNIST from
/usr/share/datasets/fashion-mnist in pixel space (identity encoder, 28x28x1, all 10 classes; the
whole 60,000-image train split in full mode, as the default job, so no run wraps around an epoch,
100 per class in quick mode), encoded once with ``mmdist.encode.main``; a randomly initialised
DiT of the ``fashion-mnist`` size (6 layers, 4 heads x 32, patch 4, learned sigma) saved with
``save_dit`` as the backbone; the default fine-tune section otherwise (DiffFit parameters,
minimax terms on with memory 64 and dataset-mean centring, label dropout, EMA, hflip), global
batch 64, checkpoint only at the last step, no preview grids (``preview_every=0``: the plain loop
draws none).

``ray_over_plain`` (time ratio, lower is better, goal <= 1.10) -- THE KEY FIGURE
    End-to-end seconds per step of ``mmdist.finetune.main`` with 1 Ray Train worker (1/the
    history's ``steps_per_second``: Ray Data batch fetching, collation and the step), divided by
    the end-to-end seconds per step of a plain loop in this process that calls
    ``training.train_step`` on batches sliced from the same latents held in memory (a shuffled
    permutation per epoch), with the same model, objective, step context, batch, seed and torch
    threads as the worker. It is the price of running the step under Ray Train + Ray Data.

``ray_over_plain_step_seconds`` (time ratio, reported, not the key)
    The same ratio of ``step_seconds``: the time inside ``train_step`` only. It isolates
    interference (Ray Data's prefetch threads in the worker, Ray's own processes) from the data
    path; fetching is excluded on both sides.

``allgather_share`` (fraction, goal <= 0.02)
    With 2 Ray Train workers (gloo, 1 torch thread each, global batch 64 = 32 per worker), the
    time per step spent in the memory all-gather (``allgather_seconds``, mean per step) divided
    by the time per step inside ``train_step`` (``step_seconds``), averaged over the measured
    windows of rank 0's history. The all-gather is also a barrier: it absorbs any skew between
    the two ranks, which on 2 shared cores can dominate its pure communication cost.

``allgather_share_without_skew`` (fraction, reported beside the key)
    The same all-gathers alone: 2 processes (torch.multiprocessing, gloo, 1 thread each, no Ray)
    call the minimax objective of the same shapes (32 latents per rank, the data's classes and
    latent size, the configured memories) on random latents, with a barrier before each call, so
    the timer holds the transfers and not one rank waiting for the other; divided by the 2-worker
    ``step_seconds`` above. ``allgather_share`` minus this is the ranks' skew.

``allgather_packed_over_separate`` (time ratio, reported)
    In the same 2 processes, after each objective call, the same tensors sent as five all-gathers
    (labels, the two terms' per-class extrema, real and predicted embeddings: what the objective
    sent before it packed them into one): the objective's one collective ÷ those five.

Every history is aggregated over its log windows, leaving out the first (warm-up), weighted by
steps. The plain loop runs before and after the 1-worker Ray run (A, Ray, B), and the two are
pooled so a drift in the machine's load shows and partly cancels. ``ray.init`` (2 CPUs) is timed
separately and excluded; each ``fit()`` also pays Ray Train's fixed start-up, reported as
``wall_seconds`` but not in the per-step figures. Machine facts are under ``machine``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets RAY_AUTH_MODE and sys.path before Ray or mmdist load)

FMNIST = "/usr/share/datasets/fashion-mnist"
FULL = dict(per_class=None, shard_rows=4096, steps=120, log_every=20, batch=64)
QUICK = dict(per_class=100, shard_rows=250, steps=30, log_every=10, batch=32)


def make_config(tmp: str, p: dict) -> object:
    """Fashion-MNIST pixel space, encode into tmp/latents; fine-tune settings from ``p``."""
    from mmdist.config import Config, DataConfig, EncodeConfig, absolute_paths

    base = Config()
    ft = dataclasses.replace(base.finetune, steps=p["steps"], log_every=p["log_every"],
                             checkpoint_every=p["steps"], global_batch_size=p["batch"], num_workers=1)
    # no preview grids: the plain loop draws none (a grid at step 100 took ~15 s of the Ray run)
    return absolute_paths(dataclasses.replace(
        base, name="bench-finetune", output=os.path.join(tmp, "run"), latents=os.path.join(tmp, "latents"),
        preview_every=0,
        data=DataConfig(train=FMNIST, max_per_class=p["per_class"], download=False),
        encode=EncodeConfig(shard_rows=p["shard_rows"]), finetune=ft))


def make_backbone(folder: str, latents: dict, seed: int = 0) -> str:
    """A random ``fashion-mnist``-size DiT with learned sigma, saved with save_dit."""
    import torch

    from mmdist.models.diffusion import create_dit, save_dit

    torch.manual_seed(seed)
    c, h, _ = latents["latent_shape"]
    save_dit(create_dit("fashion-mnist", sample_size=h, in_channels=c, num_classes=len(latents["classes"]),
                        learn_sigma=True), folder)
    return folder


def worker_threads(num_workers: int) -> int:
    """The torch threads a Ray Train worker gets on this 2-CPU cluster.

    Mirrors ``distributed.fit`` (share with reserve=1.0, then ``torch_threads``), which computes
    it inline and has no function to call.
    """
    from mmdist import ray_runtime

    return ray_runtime.torch_threads(ray_runtime.share(ray_runtime.cluster_cpus(), num_workers, reserve=1.0))


# ----------------------------------------------------------------------------------------------
# The two sides
# ----------------------------------------------------------------------------------------------


def plain_loop(cfg: object, latents: dict, backbone: str, threads: int) -> dict:
    """``training.train_step`` in this process on in-memory batches, logged like the Ray worker."""
    import numpy as np
    import torch
    from safetensors.numpy import load as load_tensors

    from mmdist import artifacts, distributed, schema, shards, storage, training
    from mmdist.models import diffusion
    from mmdist.models.gaussian_diffusion import GaussianDiffusion
    from mmdist.models.minimax import SingleProcess
    from mmdist.seeding import derive_seed

    common.set_torch_threads(threads)
    stage, tcfg = "finetune", cfg.finetune
    folder = artifacts.stage_dir(cfg, "encode")
    stats = load_tensors(storage.read_bytes(storage.join(folder, schema.STATS)))
    parts = [shards.read_shard(storage.join(folder, s)) for s in latents["shards"]]
    mean = torch.from_numpy(np.concatenate([s[schema.LATENT_MEAN] for s in parts]))
    labels = torch.from_numpy(np.concatenate([s[schema.LABEL] for s in parts]))
    std = (None if latents["deterministic"]
           else torch.from_numpy(np.concatenate([s[schema.LATENT_STD] for s in parts])))

    # the worker's setup (distributed.train_worker), rank 0 of 1, CPU
    torch.manual_seed(derive_seed(tcfg.seed, stage, 0))
    device = torch.device("cpu")
    model = diffusion.load_dit(backbone)  # what distributed.build_model loads for this config
    objective = distributed.build_objective(cfg, stage, latents, stats, device)
    state = training.build_state(model, trainable=distributed.trainable_set(cfg, stage), lr=tcfg.lr,
                                 weight_decay=tcfg.weight_decay, objective=objective)
    ctx = training.StepContext(  # copied from distributed.train_worker: there is no shared builder
        diffusion=GaussianDiffusion(), class_ids=torch.tensor(latents["model_class_ids"]),
        null_id=diffusion.num_classes_of(state.model), class_dropout=cfg.finetune.class_dropout,
        scaling_factor=latents["scaling_factor"], hflip=tcfg.hflip, ema_decay=tcfg.ema_decay, autocast="no")
    collective = SingleProcess()
    order = torch.Generator().manual_seed(tcfg.seed)
    batch = tcfg.global_batch_size
    history, running = [], {"loss": [], "step_seconds": []}
    load = common.loadavg()
    start = tick = time.time()
    while state.step < tcfg.steps:
        perm = torch.randperm(len(mean), generator=order)
        for first in range(0, len(perm) - batch + 1, batch):  # drop_last, as the worker
            idx = perm[first: first + batch]
            b_mean, b_std, b_lab = mean[idx], (None if std is None else std[idx]), labels[idx]
            step_start = time.perf_counter()
            metrics = training.train_step(state, ctx, b_mean, b_std, b_lab, state.model, collective)
            running["step_seconds"].append(time.perf_counter() - step_start)
            running["loss"].append(metrics["loss"])
            if state.step % tcfg.log_every == 0 or state.step >= tcfg.steps:
                history.append({"step": float(state.step),
                                "step_seconds": float(np.mean(running["step_seconds"])),
                                "steps_per_second": len(running["loss"]) / max(time.time() - tick, 1e-9)})
                running, tick = {"loss": [], "step_seconds": []}, time.time()
            if state.step >= tcfg.steps:
                break
    out = common.window_stats(history)
    out.update(threads=threads, wall_seconds=time.time() - start, loadavg_before=load, rows=len(mean),
               final_loss=metrics["loss"])
    common.set_torch_threads(1)
    return out


def ray_run(cfg: object, output: str, backbone: str, workers: int) -> dict:
    """``mmdist.finetune.main`` with ``workers`` Ray Train workers; its history aggregated."""
    ft = dataclasses.replace(cfg.finetune, backbone=backbone, num_workers=workers)
    manifest, out = common.timed_finetune(dataclasses.replace(cfg, output=output, finetune=ft))
    out.update(workers=workers, threads_per_worker=worker_threads(workers), final_loss=manifest["final"].get("loss"))
    return out


def _allgather_worker(rank: int, shapes: dict, port: int, results: object) -> None:
    """One of 2 gloo processes: the minimax objective's all-gathers per call, a barrier before each."""
    import torch
    import torch.distributed as dist

    from mmdist.distributed import TorchCollective
    from mmdist.models.minimax import MinimaxObjective

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    comm = TorchCollective()
    obj = MinimaxObjective(shapes["classes"], shapes["dim"], **shapes["minimax"])
    g = torch.Generator().manual_seed(rank)
    packed, separate = [], []
    for i in range(shapes["calls"]):
        labels = torch.randint(0, shapes["classes"], (shapes["local_batch"],), generator=g)
        pred, real = (torch.randn(shapes["local_batch"], shapes["dim"], generator=g) for _ in range(2))
        dist.barrier()
        comm.seconds = 0.0
        obj(pred.requires_grad_(), real, labels, comm)
        measured = i >= shapes["calls"] // 4  # the first quarter fills the memories
        if measured:
            packed.append(comm.seconds)
        # the baseline: the same tensors as one collective each (labels, 2 extrema, 2 embeddings),
        # what the objective sent before it packed them
        dist.barrier()
        comm.seconds = 0.0
        for t in (labels, torch.zeros(shapes["classes"]), torch.zeros(shapes["classes"]), real, pred.detach()):
            comm.all_gather(t)
        if measured:
            separate.append(comm.seconds)
    if rank == 0:
        results.put((sum(packed) / len(packed), sum(separate) / len(separate)))
    dist.destroy_process_group()


def allgather_without_skew(cfg: object, latents: dict, local_batch: int, calls: int = 400) -> tuple[float, float]:
    """Seconds per step in the memories' all-gather with the ranks in step (see the docstring), and
    in the same tensors sent as five separate all-gathers (the baseline)."""
    import math
    import socket

    import torch.multiprocessing as mp

    mm = cfg.finetune.minimax
    shapes = {"classes": len(latents["classes"]), "dim": math.prod(latents["latent_shape"]),
              "local_batch": local_batch, "calls": calls,
              "minimax": {"memory_size": mm.memory_size, "lambda_rep": mm.lambda_rep, "lambda_div": mm.lambda_div}}
    with socket.socket() as sock:  # a free port for the process group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_allgather_worker, args=(r, shapes, port, results)) for r in range(2)]
    for proc in procs:
        proc.start()
    seconds = results.get(timeout=600)
    for proc in procs:
        proc.join()
    return seconds


def pooled(runs: list[dict]) -> dict:
    """Several runs' measured windows pooled: seconds per step end to end, and inside train_step."""
    steps = sum(r["steps_measured"] for r in runs)
    return {"seconds_per_step_end_to_end": sum(r["steps_measured"] * r["seconds_per_step_end_to_end"]
                                               for r in runs) / steps,
            "step_seconds": sum(r["steps_measured"] * r["step_seconds"] for r in runs) / steps,
            "steps_measured": steps}


def main() -> None:
    """Encode, build the backbone, run plain A / Ray 1 worker / plain B / Ray 2 workers; report."""
    args = common.parse_args(__doc__, "finetune")
    p = QUICK if args.quick else FULL
    facts = common.machine_facts()
    common.set_torch_threads(1)
    tmp = common.scratch("finetune")
    try:
        ray_start = common.start_ray(num_cpus=2)
        from mmdist import encode

        cfg = make_config(tmp, p)
        latents = encode.main(cfg)
        backbone = make_backbone(os.path.join(tmp, "backbone"), latents)
        threads = worker_threads(1)
        common.log.info("plain loop A (%d thread)", threads)
        plain_a = plain_loop(cfg, latents, backbone, threads)
        common.log.info("Ray Train, 1 worker")
        ray1 = ray_run(cfg, os.path.join(tmp, "ray1"), backbone, 1)
        common.log.info("plain loop B")
        plain_b = plain_loop(cfg, latents, backbone, threads)
        common.log.info("Ray Train, 2 workers")
        ray2 = ray_run(cfg, os.path.join(tmp, "ray2"), backbone, 2)
        common.log.info("all-gathers alone, 2 gloo processes")
        gather_alone, gather_separate = allgather_without_skew(cfg, latents, p["batch"] // 2)
    finally:
        common.stop_ray()
        common.cleanup(tmp, args.keep)

    plain = pooled([plain_a, plain_b])
    result = {
        "ray_over_plain": common.ratio(ray1["seconds_per_step_end_to_end"],
                                       plain["seconds_per_step_end_to_end"]),
        "ray_over_plain_step_seconds": common.ratio(ray1["step_seconds"], plain["step_seconds"]),
        "allgather_share": common.ratio(ray2["allgather_seconds"], ray2["step_seconds"]),
        "allgather_seconds_without_skew": gather_alone,
        "allgather_share_without_skew": common.ratio(gather_alone, ray2["step_seconds"]),
        "allgather_seconds_separate": gather_separate,
        "allgather_packed_over_separate": common.ratio(gather_alone, gather_separate),
        "key": "ray_over_plain (end to end, from steps_per_second); "
               "ray_over_plain_step_seconds is train_step only",
        "quick": args.quick,
        "plain": plain, "plain_a": plain_a, "plain_b": plain_b, "ray_1_worker": ray1, "ray_2_workers": ray2,
        "two_workers_over_one_steps_per_second": common.ratio(ray2["steps_per_second"],
                                                              ray1["steps_per_second"]),
        "ray_start_seconds": ray_start,
        "sizes": {**p, "rows": latents["rows"], "latent_shape": latents["latent_shape"],
                  "classes": len(latents["classes"]),
                  "dit": "fashion-mnist size (6 layers, 4 heads x 32, patch 4), learned sigma, random init",
                  "trainable": cfg.finetune.trainable, "minimax": dataclasses.asdict(cfg.finetune.minimax)},
        "machine": common.finish_facts(facts),
    }
    common.write_json(args.out, common.rnd(result))
    print(f"machine: {facts['cpu_count']} CPUs, loadavg {facts['loadavg_start']} -> {facts['loadavg_end']}, "
          f"others busy {facts['cpu_busy_fraction_start']:.0%} at start; "
          f"ray start-up {ray_start:.1f} s (excluded)")
    rows = (("plain A", plain_a), ("plain B", plain_b), ("ray 1 worker", ray1), ("ray 2 workers", ray2))
    for name, r in rows:
        print(f"{name:14s} {1 / r['seconds_per_step_end_to_end']:6.2f} steps/s end to end, "
              f"train_step {r['step_seconds'] * 1e3:7.1f} ms, "
              f"all-gather {r['allgather_seconds'] * 1e3:6.2f} ms")
    print(f"ray_over_plain = {result['ray_over_plain']:.3f} (key, end to end; goal <= 1.10); "
          f"step_seconds only: {result['ray_over_plain_step_seconds']:.3f}")
    print(f"allgather_share = {result['allgather_share']:.4f} (2 workers; goal <= 0.02); "
          f"without the ranks' skew: {result['allgather_share_without_skew']:.4f} "
          f"({gather_alone * 1e3:.2f} ms per step; the same tensors as five collectives: "
          f"{gather_separate * 1e3:.2f} ms, packed/separate {result['allgather_packed_over_separate']:.2f})")


if __name__ == "__main__":
    main()
