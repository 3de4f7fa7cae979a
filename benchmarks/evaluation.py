"""Evaluation benchmark: what a test pass and a trial of the default run cost on the CPU, today's way and others.

    python benchmarks/evaluation.py [--quick]  ->  benchmarks/results/evaluation.json

Evaluation is most of ``mmdist run`` on a laptop: 6 trials (minimax, diffusion, random x 2 seeds),
each training ConvNet-3 on 100 Fashion-MNIST images (IPC 10) for 100 epochs with the hard
protocol and testing it twice on the 10,000 test images. This measures, in one process and one
run, on real Fashion-MNIST (a random IPC-10 subset, seed 0):

``test_pass``
    One ``protocols.accuracy`` pass over the test set at several test batch sizes (today: 500),
    1 torch thread, rounds interleaved, median of the rounds. Accuracy and the largest logit
    difference against batch 500 show that the batch size does not change results.
``trial``
    ``protocols.fit`` with the default protocol, today's test batch (500) against the fastest of
    the sweep (which ``protocols.TEST_BATCH_SIZE["cpu"]`` then takes), A/B/A order; best and last
    accuracy must be identical.
``threads``
    Two trials side by side in two processes with 1 torch thread each (what ``mmdist.evaluate``
    schedules on 2 CPUs) against the same two one after another with 2 threads each: trials per
    minute. The grid's choice of parallel trials stands or falls with this figure.
``compile``
    ``torch.compile`` (inductor) of the network for a test pass: compile seconds, compiled pass
    seconds, and how many test passes a trial would need to earn its compile time back.

Wall seconds and process CPU seconds are both recorded: on a shared machine CPU seconds are the
steadier of the two. Machine facts (load before and after, the busiest other processes) are
under ``machine``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets sys.path before mmdist loads)

FMNIST = "/usr/share/datasets/fashion-mnist"
FULL = dict(epochs=100, evals=2, rounds=2, batch_sizes=(500, 16, 32, 64, 128), test_images=10_000,
            compile=True)
QUICK = dict(epochs=4, evals=2, rounds=1, batch_sizes=(500, 64), test_images=1_000, compile=False)
TODAY_TEST_BATCH = 500  # protocols.accuracy's batch before this benchmark


def load_data(p: dict, seed: int = 0) -> tuple:
    """A random IPC-10 train subset and the test set, float [0, 1] at 28 px (as run_trial makes them)."""
    import numpy as np
    import torch

    from mmdist import protocols
    from mmdist.datasets import load_fashion_mnist

    images, labels = load_fashion_mnist(FMNIST, "train", False)
    rng = np.random.default_rng(seed)
    pick = np.concatenate([rng.choice(np.flatnonzero(labels == k), 10, replace=False) for k in range(10)])
    test_images, test_labels = load_fashion_mnist(FMNIST, "test", False)
    n = p["test_images"]

    def prep(x: np.ndarray) -> torch.Tensor:
        return protocols.to_float(torch.from_numpy(x[:, None].copy()), 28)

    return (prep(images[pick]), torch.from_numpy(labels[pick].copy()), prep(test_images[:n]),
            torch.from_numpy(test_labels[:n].copy()))


def network(seed: int = 0) -> object:
    """ConvNet-3 for 1-channel 28-px images, initialised from ``seed``."""
    import torch

    from mmdist.models import classifiers

    torch.manual_seed(seed)
    return classifiers.create("convnet", in_channels=1, num_classes=10, image_size=28)


def protocol(p: dict) -> object:
    """The default run's hard protocol at IPC 10 (its augmentation as configured: DSA at 28 px)."""
    from mmdist import protocols
    from mmdist.config import EvaluateConfig

    e = EvaluateConfig()
    return protocols.make_protocol("hard", ipc=10, num_classes=10, epochs=p["epochs"], batch_size=e.batch_size,
                                   lr=e.lr, evals=p["evals"], augment=e.augment, temperature=e.temperature,
                                   resolution=28)


def timed(fn: object) -> tuple[object, float, float]:
    """(result, wall seconds, process CPU seconds) of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------


def test_pass(p: dict, data: tuple) -> dict:
    """``accuracy`` over the test set at each batch size, rounds interleaved; results must match."""
    import torch

    from mmdist import protocols

    _, _, tx, ty = data
    model = network().to(memory_format=torch.channels_last)
    tx = tx.contiguous(memory_format=torch.channels_last)
    protocols.accuracy(model, tx[:500], ty[:500])  # warm-up: oneDNN primitives
    rows: dict[int, dict] = {b: {"wall": [], "cpu": []} for b in p["batch_sizes"]}
    for _ in range(p["rounds"]):
        for b in p["batch_sizes"]:
            acc, wall, cpu = timed(lambda b=b: protocols.accuracy(model, tx, ty, b))
            rows[b]["wall"].append(wall)
            rows[b]["cpu"].append(cpu)
            rows[b]["accuracy"] = acc
    with torch.no_grad():
        model.eval()
        reference = torch.cat([model(protocols.normalize(tx[i: i + 500])) for i in range(0, len(tx), 500)])
        for b in p["batch_sizes"]:
            logits = torch.cat([model(protocols.normalize(tx[i: i + b])) for i in range(0, len(tx), b)])
            rows[b]["max_logit_diff_vs_500"] = float((logits - reference).abs().max())
    out = {str(b): {"wall_seconds": statistics.median(r["wall"]), "cpu_seconds": statistics.median(r["cpu"]),
                    "accuracy": r["accuracy"], "max_logit_diff_vs_500": r["max_logit_diff_vs_500"],
                    "rounds_wall": r["wall"]} for b, r in rows.items()}
    today = out[str(TODAY_TEST_BATCH)]["cpu_seconds"]
    for r in out.values():
        r["cpu_over_today"] = r["cpu_seconds"] / today
    return {"images": len(tx), "threads": 1, "by_batch_size": out,
            "fastest_cpu": min(out, key=lambda b: out[b]["cpu_seconds"])}


def trial(p: dict, data: tuple, test_batch: int) -> dict:
    """One ``fit`` of the default protocol with a given test batch; its accuracies and times."""
    from mmdist import protocols

    x, y, tx, ty = data
    model = network()
    out, wall, cpu = timed(lambda: protocols.fit(model, x, y, tx, ty, protocol(p), seed=0, test_batch_size=test_batch))
    return {"test_batch_size": test_batch, "wall_seconds": wall, "cpu_seconds": cpu, "best_acc": out["best_acc"],
            "last_acc": out["last_acc"], "curve": out["curve"]}


def _trial_process(args: tuple) -> tuple[float, float]:
    """Process body: one fit with ``threads`` torch threads; (wall seconds, best accuracy)."""
    p, threads, seed = args
    import torch

    from mmdist import protocols

    torch.set_num_threads(threads)
    x, y, tx, ty = load_data(p, seed)
    start = time.perf_counter()
    out = protocols.fit(network(seed), x, y, tx, ty, protocol(p), seed=seed)
    return time.perf_counter() - start, out["best_acc"]


def threads(p: dict) -> dict:
    """Two trials side by side at 1 thread each vs one after another at 2 threads each."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        start = time.perf_counter()
        parallel = pool.map(_trial_process, [(p, 1, 0), (p, 1, 1)])
        parallel_wall = time.perf_counter() - start
    with ctx.Pool(1) as pool:
        start = time.perf_counter()
        serial = pool.map(_trial_process, [(p, 2, 0), (p, 2, 1)])
        serial_wall = time.perf_counter() - start
    return {"parallel_1_thread": {"wall_seconds": parallel_wall, "trial_seconds": [r[0] for r in parallel],
                                  "trials_per_minute": 2 * 60 / parallel_wall},
            "serial_2_threads": {"wall_seconds": serial_wall, "trial_seconds": [r[0] for r in serial],
                                 "trials_per_minute": 2 * 60 / serial_wall},
            "parallel_over_serial": serial_wall / parallel_wall,
            "same_results": [r[1] for r in parallel] == [r[1] for r in serial],
            "note": "process start-up and data loading excluded from trial_seconds, included in wall_seconds"}


def compiled(p: dict, data: tuple, test_batch: int) -> dict:
    """A test pass through ``torch.compile(model)``: compile cost against the eager pass."""
    import torch

    from mmdist import protocols

    _, _, tx, ty = data
    model = network().to(memory_format=torch.channels_last)
    tx = tx.contiguous(memory_format=torch.channels_last)
    eager_acc, eager_wall, eager_cpu = timed(lambda: protocols.accuracy(model, tx, ty, test_batch))
    fast = torch.compile(model)
    _, compile_wall, _ = timed(lambda: protocols.accuracy(fast, tx[: 2 * test_batch], ty[: 2 * test_batch],
                                                           test_batch))
    acc, wall, cpu = timed(lambda: protocols.accuracy(fast, tx, ty, test_batch))
    saved = eager_wall - wall
    return {"eager_wall_seconds": eager_wall, "eager_cpu_seconds": eager_cpu,
            "compile_and_first_batches_seconds": compile_wall, "compiled_wall_seconds": wall,
            "compiled_cpu_seconds": cpu, "same_accuracy": acc == eager_acc,
            "passes_to_break_even": compile_wall / saved if saved > 0 else None}


def main() -> None:
    """Run the measurements and write the figures."""
    args = common.parse_args(__doc__, "evaluation")
    p = QUICK if args.quick else FULL
    facts = common.machine_facts()
    common.set_torch_threads(1)
    from mmdist import protocols

    data = load_data(p)
    common.log.info("test pass at batch sizes %s", p["batch_sizes"])
    passes = test_pass(p, data)
    common.log.info("trials: today's test batch, the fastest one, today's again")
    chosen = int(passes["fastest_cpu"])
    trials = [trial(p, data, TODAY_TEST_BATCH), trial(p, data, chosen), trial(p, data, TODAY_TEST_BATCH)]
    common.log.info("threads: 2 parallel trials x 1 thread vs 2 serial x 2 threads")
    thread_row = threads(p)
    compile_row = compiled(p, data, chosen) if p["compile"] else None
    today_cpu = (trials[0]["cpu_seconds"] + trials[2]["cpu_seconds"]) / 2
    today_wall = (trials[0]["wall_seconds"] + trials[2]["wall_seconds"]) / 2
    result = {
        "trial_cpu_over_today": trials[1]["cpu_seconds"] / today_cpu,
        "trial_wall_over_today": trials[1]["wall_seconds"] / today_wall,
        "trial_results_unchanged": all((t["best_acc"], t["last_acc"]) == (trials[0]["best_acc"], trials[0]["last_acc"])
                                       for t in trials),
        "test_pass_cpu_over_today": passes["by_batch_size"][str(chosen)]["cpu_over_today"],
        "chosen_test_batch_size": chosen, "today_test_batch_size": TODAY_TEST_BATCH,
        "protocols_test_batch_size": protocols.TEST_BATCH_SIZE.get("cpu"),
        "test_pass": passes, "trials": trials, "threads": thread_row, "compile": compile_row,
        "quick": args.quick, "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in p.items()},
        "machine": common.finish_facts(facts),
    }
    common.write_json(args.out, common.rnd(result))
    print(f"machine: loadavg {facts['loadavg_start']} -> {facts['loadavg_end']}, "
          f"others busy {facts['cpu_busy_fraction_start']:.0%} at start")
    for b, r in passes["by_batch_size"].items():
        print(f"test pass, batch {b:>5}: {r['cpu_seconds']:.2f} s CPU ({r['cpu_over_today']:.3f} of today), "
              f"accuracy {r['accuracy']:.2f}, max logit diff {r['max_logit_diff_vs_500']:.1e}")
    print(f"trial: {result['trial_cpu_over_today']:.3f} of today's CPU time, results unchanged: "
          f"{result['trial_results_unchanged']}")
    print(f"threads: 2 parallel x 1 thread {thread_row['parallel_1_thread']['trials_per_minute']:.2f} trials/min, "
          f"2 serial x 2 threads {thread_row['serial_2_threads']['trials_per_minute']:.2f}")
    if compile_row:
        print(f"compile: {compile_row['compile_and_first_batches_seconds']:.1f} s to compile, pass "
              f"{compile_row['compiled_wall_seconds']:.2f} s vs eager {compile_row['eager_wall_seconds']:.2f} s")


if __name__ == "__main__":
    main()
