"""Starting or joining a Ray cluster, checking it can run the config, and sizing work for it.

Two kinds of cluster, sized differently:
- **a laptop** (one node with CPUs, no autoscaler: the cluster mmdist starts, or a local
  `ray start --head`): it will never grow, so shares are computed from its CPUs. On 2 cores Ray
  hangs silently when training workers hold every CPU and Ray Data's read tasks cannot be
  scheduled (docs/ray-notes.md), so the shares leave room for them;
- **a cluster** (several nodes, or an autoscaler): pools *declare* what each member needs (one
  CPU, its GPUs) and a range of sizes, and demand drives the autoscaler. Nothing is sized from
  what a cold cluster has now: an autoscaling cluster starts with no GPU workers at all.

Joining a cluster also runs the checks a multi-node run needs before anything is written: every
node that will do stage work can reach the output and the inputs (nodes do not share a disk), the
GPUs the config asks for exist or can be added, and AWS keys in the driver's environment are set
aside (Ray Tune copies them into every trial's runtime_env, which Ray's agents log).
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from typing import Any

import ray

from mmdist.config import Config, RayConfig
from mmdist.errors import ArtifactError, ConfigError

log = logging.getLogger("mmdist")

AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
PROBE_TIMEOUT_S = 300.0  # a node's first task starts a worker process: minutes on a loaded machine
_checked: set[tuple] = set()  # (output, nodes) combinations already probed by this process


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
        set_aside_aws_keys(address)
        ray.init(address=address, **ctx_kwargs)
    else:
        # Ray Tune copies AWS keys from the driver's environment into each trial's runtime_env, and
        # Ray's runtime-env agent logs every runtime_env at INFO: keep the processes of a cluster we
        # start at WARNING so keys never reach its log files
        os.environ.setdefault("RAY_LOGGER_LEVEL", "warning")
        ray.init(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, **ctx_kwargs)


def set_aside_aws_keys(address: str) -> list[str]:
    """Remove AWS keys from this driver's environment before it joins a cluster; returns their names.

    Ray Tune copies AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN from the
    driver's environment into every trial's runtime_env (ray.tune.execution.class_cache), which
    the nodes' runtime-env agents write to their logs. The nodes of a cluster read storage with
    their own credentials; the driver keeps the rest of the standard chain (AWS_PROFILE, its
    instance role).
    """
    found = [k for k in AWS_KEYS if k in os.environ]
    for k in found:
        del os.environ[k]
    if found:
        log.warning("%s removed from this driver's environment before joining the Ray cluster at %s (Ray would "
                    "copy them into runtime_envs and logs): give the nodes an instance role (cluster/aws.yaml) or a "
                    "service account (cluster/kuberay-*.yaml), and the driver AWS_PROFILE or its node's role",
                    ", ".join(found), address)
    return found


def connect(cfg: Config) -> None:
    """``init``, then (on a cluster, once per node set) the checks that keep a run from failing late."""
    init(cfg.ray)
    check_gpus(cfg)
    check_reach(cfg)


# ----------------------------------------------------------------------------------------------
# What the cluster is
# ----------------------------------------------------------------------------------------------


def _alive_nodes() -> list[dict[str, Any]]:
    """ray.nodes() entries of the live nodes."""
    return [n for n in ray.nodes() if n.get("Alive")]


def autoscaler() -> dict[str, float] | None:
    """What an autoscaler may add: its node types' total resources ({} if it does not say); None without one.

    KubeRay and the v2 autoscaler publish their node groups in the GCS; the launcher's v1
    autoscaler (`ray up`, fake_multinode) only publishes a status, without their resources. Every
    head publishes that status, but one without an autoscaling config names each node's type
    after the node itself ("node_<id>"): only a real autoscaler has named node types.
    """
    import json

    try:
        from ray._private.state import state
        from ray.experimental.internal_kv import _internal_kv_get

        most = state.get_max_resources_from_cluster_config()
        if most:
            return {k: float(v) for k, v in most.items()}
        raw = _internal_kv_get("__autoscaling_status")
        report = (json.loads(raw).get("autoscaler_report") or {}) if raw else {}
        types = report.get("node_type_mapping") or {}
        named = any(t != f"node_{node}" for node, t in types.items())
        return {} if named or report.get("pending_launches") else None
    except Exception:  # private APIs: a Ray that moved them has no autoscaler we can see
        return None


def laptop_cpus() -> float | None:
    """CPUs of a cluster that is one node with CPUs and no autoscaler (a laptop); None for a real cluster."""
    nodes = _alive_nodes()
    if len(nodes) != 1 or autoscaler() is not None:
        return None
    cpus = float(nodes[0]["Resources"].get("CPU", 0))
    return cpus or None


def cluster_cpus() -> float:
    """Total CPUs of the cluster."""
    return float(ray.cluster_resources().get("CPU", 1))


def node_cpus() -> float:
    """CPUs of the largest live node: the most one task can be given."""
    return max((float(n["Resources"].get("CPU", 0)) for n in _alive_nodes()), default=1.0)


def cluster_gpus() -> float:
    """Total GPUs of the cluster."""
    return float(ray.cluster_resources().get("GPU", 0))


# ----------------------------------------------------------------------------------------------
# Sizing
# ----------------------------------------------------------------------------------------------


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


def actor_pool(configured: int, items: int, gpus_each: float) -> tuple[int, int, float]:
    """(min size, max size, CPUs per actor) of a pool working through ``items`` work items.

    ``configured`` > 0 fixes the size. Otherwise a laptop gets one actor per CPU (or GPU share) it
    has; a fixed cluster as many as its nodes hold; an autoscaling one a range from 1 to one per
    item, so that demand, not what a cold cluster has now, decides how far it grows.
    """
    items = max(1, items)
    laptop = laptop_cpus()
    if configured:
        lo = hi = min(configured, items)
    elif laptop is not None:
        fits = int(cluster_gpus() / gpus_each) if gpus_each > 0 else int(laptop)
        lo = hi = max(1, min(items, fits))
    elif autoscaler() is not None:
        lo, hi = 1, items
    else:
        lo, hi = 1, max(1, min(items, capacity(1.0, gpus_each)))
    cpus = share(laptop, hi, reserve=0.25) if laptop is not None else 1.0
    return lo, hi, cpus


def capacity(cpus_each: float, gpus_each: float) -> int:
    """How many actors of this shape the live nodes hold when idle."""
    total = 0
    for n in _alive_nodes():
        res = n["Resources"]
        fit = int(res.get("CPU", 0) // cpus_each)
        if gpus_each > 0:
            fit = min(fit, int(res.get("GPU", 0) // gpus_each))
        total += fit
    return total


def worker_cpus(configured: float | None, workers: int) -> float:
    """CPUs per Ray Train worker: configured, a share of a laptop, else one (GPU workers need few)."""
    if configured:
        return configured
    laptop = laptop_cpus()
    # a laptop keeps one whole CPU free: Ray Data's file-listing task asks for 1 CPU and cannot be
    # told otherwise
    return share(laptop, workers, reserve=1.0) if laptop is not None else 1.0


def trial_cpus(configured: float | None, trials: int) -> float:
    """CPUs per Tune trial: configured, one per CPU of a laptop (at most), else one."""
    if configured:
        return configured
    laptop = laptop_cpus()
    return max(0.5, min(1.0, laptop / max(trials, 1))) if laptop is not None else 1.0


# ----------------------------------------------------------------------------------------------
# Checks before a stage writes anything
# ----------------------------------------------------------------------------------------------


def gpu_asks(cfg: Config) -> dict[str, float]:
    """Config fields that ask for GPUs, with the GPUs each actor, worker or trial wants."""
    from mmdist.run import planned_stages

    stages = planned_stages(cfg)
    asks = {"encode.num_gpus_per_actor": cfg.encode.num_gpus_per_actor if "encode" in stages else 0.0,
            "pretrain.use_gpu": float(cfg.pretrain.use_gpu and "pretrain" in stages),
            "finetune.use_gpu": float(cfg.finetune.use_gpu),
            "sample.num_gpus_per_actor": cfg.sample.num_gpus_per_actor,
            "evaluate.gpus_per_trial": cfg.evaluate.gpus_per_trial}
    return {k: v for k, v in asks.items() if v > 0}


def check_gpus(cfg: Config) -> None:
    """Refuse, in one line, a config that asks for GPUs no node has and no autoscaler can add."""
    asks = gpu_asks(cfg)
    if not asks:
        return
    nodes = _alive_nodes()
    most = max((float(n["Resources"].get("GPU", 0)) for n in nodes), default=0.0)
    scaler = autoscaler()
    if most >= max(asks.values()) or (scaler is not None and scaler.get("GPU", 1.0) > 0):
        return  # a v1 autoscaler does not say what it can add: trust it
    shape = ", ".join(f"{n['NodeManagerAddress']} ({_resources(n)})" for n in nodes)
    raise ConfigError(f"{', '.join(asks)} ask for GPUs, but no node of this Ray cluster has one ({shape}) and no "
                      "autoscaler can add one: set them to 0/false for a CPU run, or use a GPU cluster")


def _resources(node: dict[str, Any]) -> str:
    """'CPU 2, GPU 0' for a node."""
    res = node["Resources"]
    return ", ".join(f"{k} {res.get(k, 0):g}" for k in ("CPU", "GPU"))


def _inputs(cfg: Config) -> dict[str, str]:
    """Config fields naming files or folders that code on the nodes reads (hub ids excluded)."""
    from mmdist import storage

    fields = {"data.train": cfg.data.train, "data.test": cfg.data.test, "latents": cfg.latents,
              "finetune.backbone": cfg.finetune.backbone, "encode.encoder": cfg.encode.encoder,
              "sample.decoder": cfg.sample.decoder}
    return {k: v for k, v in fields.items()
            if v and (storage.is_remote(v) or os.path.isabs(v))}


def check_reach(cfg: Config) -> None:
    """Refuse, in one line naming the node, a run some node cannot do: output or inputs out of its reach.

    The driver writes a probe file under the output; a zero-CPU task pinned to each other node
    that can run stage work reads it, writes its own, and checks the inputs exist there; the
    driver then reads the nodes' files. A local output on nodes that do not share that disk, a
    node without credentials for s3://, or a path that exists on the driver only all fail here,
    before the stage writes anything. The probe files are removed.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from mmdist import storage

    here = ray.get_runtime_context().get_node_id()
    nodes = [n for n in _alive_nodes() if n["NodeID"] != here and
             (n["Resources"].get("CPU", 0) > 0 or n["Resources"].get("GPU", 0) > 0)]
    key = (cfg.output, tuple(_inputs(cfg).items()), tuple(sorted(n["NodeID"] for n in nodes)))
    if not nodes or key in _checked:
        return
    folder = storage.join(cfg.output, f".mmdist-probe-{uuid.uuid4().hex[:8]}")
    token = uuid.uuid4().hex
    driver_ip = ray.util.get_node_ip_address()
    try:
        storage.write_bytes(storage.join(folder, "driver"), token.encode())
    except (OSError, ArtifactError) as e:
        raise ArtifactError(f"the driver (node {driver_ip}) cannot write the output {cfg.output}: {e}") from None
    try:
        probe = ray.remote(_probe)
        refs = [(n, probe.options(num_cpus=0, max_retries=0,
                                  scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                 .remote(cfg.output, folder, token, n["NodeID"], _inputs(cfg))) for n in nodes]
        for node, ref in refs:
            try:
                problem = ray.get(ref, timeout=PROBE_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                problem = f"did not answer within {PROBE_TIMEOUT_S:.0f} s"
            except ray.exceptions.RayError as e:
                problem = f"failed ({type(e).__name__})"
            if not problem and not storage.exists(storage.join(folder, node["NodeID"])):
                problem = (f"cannot reach the output {cfg.output}: a file it wrote there is not visible to the "
                           f"driver (node {driver_ip}); its disk is not the driver's: use s3:// or a shared filesystem")
            if problem:
                raise ArtifactError(f"node {node['NodeManagerAddress']} {problem}")
    finally:
        try:
            storage.remove(folder)
        except (OSError, ArtifactError):
            pass
    _checked.add(key)


def _probe(output: str, folder: str, token: str, node_id: str, inputs: dict[str, str]) -> str | None:
    """Ray task on one node: what keeps this node from doing its share of the run (None if nothing)."""
    from mmdist import storage

    try:
        seen = storage.read_bytes(storage.join(folder, "driver")).decode()
    except FileNotFoundError:
        seen = None
    except (OSError, ArtifactError) as e:
        return f"cannot read the output {output}: {e}"
    if seen != token:
        return (f"cannot reach the output {output}: a file the driver wrote there is not visible on this node "
                "(its disk is not the driver's): use s3:// or a shared filesystem")
    try:
        storage.write_bytes(storage.join(folder, node_id), b"ok")
    except (OSError, ArtifactError) as e:
        return f"cannot write the output {output}: {e}"
    for name, uri in inputs.items():
        try:
            found = storage.exists(uri)
        except (OSError, ArtifactError) as e:
            return f"cannot read {name} {uri}: {e}"
        if not found:
            return f"cannot read {name} {uri}: it does not exist on this node (a path on the driver's disk?)"
    return None
