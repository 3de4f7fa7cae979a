"""Starting or joining a Ray cluster, and sizing work to the resources it has.

On a 2-core laptop, Ray hangs silently when training workers hold every CPU and Ray Data's read
tasks can never be scheduled (docs/ray-notes.md). So nothing here hard-codes one CPU per worker: shares
are computed from the cluster, leaving room for data tasks.
"""

from __future__ import annotations

import logging
import math
import os

import ray

from mmdist.config import RayConfig

log = logging.getLogger("mmdist")


def init(cfg: RayConfig) -> None:
    """Join the cluster at cfg.address / RAY_ADDRESS, or start a local one (idempotent)."""
    from ray.data import DataContext

    # Ray Data's progress bars fight with ours; its execution banner drowns a laptop's log
    DataContext.get_current().enable_progress_bars = False
    DataContext.get_current().print_on_execution_start = False
    # a failing UDF raises our own error (RayTaskError.cause), not a bare UserCodeException
    DataContext.get_current().raise_original_map_exception = True
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    # Ray's INFO lines drown the log on a laptop
    ctx_kwargs = dict(log_to_driver=True, logging_level=logging.WARNING)
    if address:
        if os.environ.get("AWS_SECRET_ACCESS_KEY") and os.environ.get("RAY_LOGGER_LEVEL", "info") == "info":
            log.warning("AWS keys are in the environment: Ray Tune passes them to its trials and Ray's "
                        "runtime-env agent logs them at INFO on the cluster; prefer an instance role or "
                        "profile, or start the cluster with RAY_LOGGER_LEVEL=warning")
        ray.init(address=address, **ctx_kwargs)
    else:
        # Ray Tune copies AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY from the driver's environment into
        # each trial's runtime_env, and Ray's runtime-env agent logs every runtime_env at INFO: keep
        # the processes of a cluster we start at WARNING so keys never reach its log files
        os.environ.setdefault("RAY_LOGGER_LEVEL", "warning")
        ray.init(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, **ctx_kwargs)


def cluster_cpus() -> float:
    """Total CPUs of the cluster."""
    return float(ray.cluster_resources().get("CPU", 1))


def node_cpus() -> float:
    """CPUs of the largest live node: the most one task can be given."""
    return max((float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=1.0)


def cluster_gpus() -> float:
    """Total GPUs of the cluster."""
    return float(ray.cluster_resources().get("GPU", 0))


def share(total: float, parts: int, reserve: float = 0.5) -> float:
    """CPUs for each of ``parts`` workers, leaving ``reserve`` CPUs for Ray Data's tasks.

    Rounded down to a quarter CPU, at least a quarter: fractional CPUs are scheduling tokens,
    not cores, so this only decides what can run side by side.
    """
    each = max(0.25, (total - reserve) / max(parts, 1))
    return math.floor(each * 4) / 4


def torch_threads(cpus: float) -> int:
    """Torch intra-op threads for a worker given ``cpus`` (2 threads on a shared core run slower)."""
    return max(1, int(cpus))
