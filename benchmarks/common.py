"""What the three benchmarks share: environment, machine facts, a private Ray cluster, JSON output.

Every benchmark measures a figure and its baseline in the same run, on the same data and model,
and records the state of the machine next to the numbers: a ratio measured while another
process held the CPU is not the ratio of a quiet machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

# Set before Ray (or anything that may start it) is imported: workers inherit the environment.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("TQDM_MININTERVAL", "5")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
if ROOT not in sys.path:  # `python benchmarks/x.py` from anywhere finds mmdist and this module
    sys.path.insert(0, ROOT)

log = logging.getLogger("bench")
_RAY_TEMP: str | None = None  # the private Ray cluster's session folder (logs), removed by cleanup


# ----------------------------------------------------------------------------------------------
# Command line and output
# ----------------------------------------------------------------------------------------------


def parse_args(doc: str, name: str, root: bool = False,
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """``--quick`` (a 1-2 minute sanity run), ``--out`` and ``--keep`` (keep the scratch folder).

    ``root``: also ``--root``, a persistent folder for a benchmark whose stages resume.
    ``extra``: adds a benchmark's own options to the parser.
    """
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small sizes for a sanity check; writes <name>.quick.json, never <name>.json")
    p.add_argument("--out", default=None, help=f"result JSON (default benchmarks/results/{name}.json)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (images, shards, models)")
    if root:
        p.add_argument("--root", default=None, help="folder of the benchmark's artifacts (kept, resumable)")
    if extra:
        extra(p)
    args = p.parse_args()
    if args.out is None:
        args.out = os.path.join(RESULTS, f"{name}.quick.json" if args.quick else f"{name}.json")
    logging.basicConfig(level=logging.WARNING, format="[%(name)s %(asctime)s] %(message)s",
                        datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    return args


def scratch(name: str) -> str:
    """A fresh scratch folder under the system temp dir."""
    return tempfile.mkdtemp(prefix=f"mmdist-bench-{name}-")


def cleanup(folder: str, keep: bool) -> None:
    """Remove the scratch folder and Ray's session folder unless asked to keep them."""
    folders = [folder] + ([_RAY_TEMP] if _RAY_TEMP else [])
    for f in folders:
        if keep:
            log.info("kept %s", f)
        else:
            shutil.rmtree(f, ignore_errors=True)


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Write the result file (pretty, keys sorted) and say where."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=float)
        f.write("\n")
    print(f"wrote {path}")


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def rnd(x: Any, digits: int = 4) -> Any:
    """Round floats (recursively) for the JSON file."""
    if isinstance(x, float):
        return round(x, digits)
    if isinstance(x, dict):
        return {k: rnd(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [rnd(v, digits) for v in x]
    return x


# ----------------------------------------------------------------------------------------------
# Machine facts
# ----------------------------------------------------------------------------------------------


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages from /proc/loadavg."""
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return []


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def cpu_busy_fraction(seconds: float = 2.0) -> float | None:
    """Fraction of all CPUs busy over ``seconds`` while this process sleeps: other processes' load."""
    try:
        b0, t0 = _cpu_times()
        time.sleep(seconds)
        b1, t1 = _cpu_times()
        return (b1 - b0) / max(t1 - t0, 1)
    except (OSError, ValueError, IndexError):
        return None


def top_processes(n: int = 5) -> list[str]:
    """Other processes using the most CPU (ps: "%cpu pid name", averaged over each one's lifetime)."""
    try:
        out = subprocess.run(["ps", "-eo", "pcpu,pid,comm", "--sort=-pcpu"], capture_output=True, text=True,
                             timeout=5).stdout.splitlines()[1:]
    except (OSError, subprocess.SubprocessError):
        return []
    mine = {str(os.getpid())}
    rows = [line.split() for line in out]
    return [" ".join(r) for r in rows if len(r) >= 3 and r[1] not in mine and r[2] != "ps"][:n]


def _git_sha() -> str:
    """The commit of the checkout the benchmark ran from."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_facts() -> dict[str, Any]:
    """CPU count, versions, date, git SHA and how busy the machine was before the benchmark."""
    import numpy
    import torch

    facts: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "git_sha": _git_sha(),
        "cuda": torch.cuda.is_available(),
        "gpu_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg_start": loadavg(),
    }
    for mod in ("ray", "diffusers", "pyarrow", "s3fs", "moto"):
        try:
            facts[mod] = __import__(mod).__version__
        except Exception:  # not installed, or no __version__
            facts[mod] = None
    facts["cpu_busy_fraction_start"] = cpu_busy_fraction()
    facts["top_processes_start"] = top_processes()
    busy = facts["cpu_busy_fraction_start"]
    facts["machine_busy_at_start"] = bool(busy is not None and busy > 0.15)
    return facts


def finish_facts(facts: dict[str, Any]) -> dict[str, Any]:
    """Add the end-of-run load, so a reader sees whether the load changed during the run."""
    facts["loadavg_end"] = loadavg()
    facts["top_processes_end"] = top_processes()
    return facts


# ----------------------------------------------------------------------------------------------
# Ray and torch
# ----------------------------------------------------------------------------------------------


def set_torch_threads(n: int) -> None:
    """Set torch's intra-op threads (the benchmarks set them deliberately, never by default)."""
    import torch

    torch.set_num_threads(n)


def start_ray(num_cpus: int = 2) -> float:
    """Start a private local Ray cluster (never join another one); returns the start-up seconds.

    ``address="local"`` starts a new cluster even when another is running on this machine, and a
    private temp dir keeps its session files apart from other users' clusters.
    """
    import ray

    global _RAY_TEMP
    start = time.perf_counter()
    temp = _RAY_TEMP = tempfile.mkdtemp(prefix="mmb-ray-", dir="/tmp")  # short: socket paths are capped

    def quiet_train_cleaner() -> None:
        # Without the dashboard (off here: it would share the CPUs being timed) the State API is
        # unreachable, and Ray Train v2's placement-group cleaner warns about it once a second for
        # as long as a fine-tune runs: 9 of 10 lines of a benchmark's log.
        logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(
            logging.ERROR)

    for attempt in range(3):
        try:
            ray.init(address="local", num_cpus=num_cpus, num_gpus=0, include_dashboard=False,
                     logging_level=logging.WARNING, log_to_driver=True, object_store_memory=1024**3,
                     _temp_dir=temp, runtime_env={"worker_process_setup_hook": quiet_train_cleaner})
            break
        except Exception as e:  # Ray gives its raylet a fixed 30 s to register; a loaded machine misses it
            ray.shutdown()
            if attempt == 2:
                raise
            log.warning("ray.init failed (%s); retrying", str(e)[:120])
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return time.perf_counter() - start


def stop_ray() -> None:
    """Shut down the cluster this process started."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def window_stats(history: list[dict[str, float]], skip: int = 1) -> dict[str, Any]:
    """Aggregate a training history's log windows, leaving out the first ``skip`` (warm-up).

    Each row of the history is one log window: ``steps_per_second`` (end to end, batch fetching
    included), ``step_seconds`` (mean time inside ``training.train_step``) and
    ``allgather_seconds`` (mean time per step in the memory all-gather). Windows are weighted by
    their number of steps.
    """
    rows, prev = [], 0.0
    for row in history:
        n = row["step"] - prev
        prev = row["step"]
        rows.append((n, row))
    kept = rows[skip:]
    if not kept:
        raise RuntimeError(f"history has {len(rows)} windows; need more than {skip} (raise steps)")
    steps = sum(n for n, _ in kept)
    wall = sum(n / r["steps_per_second"] for n, r in kept)
    out = {
        "windows_used": len(kept), "windows_skipped": skip, "steps_measured": steps,
        "steps_per_second": steps / wall,
        "seconds_per_step_end_to_end": wall / steps,
        "step_seconds": sum(n * r["step_seconds"] for n, r in kept) / steps,
        "allgather_seconds": sum(n * r.get("allgather_seconds", 0.0) for n, r in kept) / steps,
        "per_window_steps_per_second": [r["steps_per_second"] for _, r in rows],
        "per_window_step_seconds": [r["step_seconds"] for _, r in rows],
    }
    return out


def timed_finetune(run: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``mmdist.finetune.main(run)``; returns the minimax variant's manifest (it holds the history)
    and ``window_stats`` of that history with ``wall_seconds`` and ``loadavg_before`` added."""
    from mmdist import artifacts, finetune

    load = loadavg()
    start = time.perf_counter()
    finetune.main(run)
    manifest = artifacts.require(finetune.variant_dir(run, "minimax"), "finetune")
    stats = window_stats(manifest["history"])
    stats.update(wall_seconds=time.perf_counter() - start, loadavg_before=load)
    return manifest, stats


class Stopwatch:
    """``with Stopwatch() as sw: ...; sw.seconds`` (perf_counter wall time)."""

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        self.load = loadavg()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
