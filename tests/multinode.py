"""The multi-node test cluster: a 0-CPU head and worker nodes that do not share a disk, data on S3.

One cluster per pytest session (``two_nodes``), built by cluster/local_cluster.py as people build
it: `ray start --head` with no CPUs for stage work, and two `ray start --address` worker nodes,
each in its own mount namespace with a private tmpfs over $HOME and /tmp. Every actor, Ray Train
worker and Tune trial therefore runs on a node where the driver's files do not exist. Nodes read
the loopback S3 server with their own credentials file (their "instance role"); the AWS keys of
the test process never reach them. Jobs are submitted as users do: `ray job submit`.

Needs root (mount namespaces), as CI has; on a laptop without it the tests skip, in CI they fail.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
sys.path.insert(0, os.path.join(ROOT, "cluster"))

from local_cluster import AWS_KEYS, LocalCluster, free_ports  # noqa: E402,F401  (free_ports: for tests)

WORKER_CPUS = 3  # one 2-CPU training worker per node, and a CPU left for Ray Data's tasks
CLASSES = ("T-shirt/top", "Trouser")  # the smoke preset's
NODE_CREDENTIALS = "[default]\naws_access_key_id = node-role\naws_secret_access_key = node-role-secret\n"


def unavailable() -> str | None:
    """Why a private-disk cluster cannot be built here (None if it can)."""
    if os.geteuid() != 0:
        return "worker nodes need their own mount namespace (unshare -m): run as root"
    for tool in ("unshare", "mount"):
        if not shutil.which(tool):
            return f"{tool} (util-linux) is not installed"
    return None


def require_root() -> None:
    """Skip on a laptop without root; in CI (CI=true) a missing capability is a failure."""
    reason = unavailable()
    if reason and os.environ.get("CI"):
        pytest.fail(f"the multi-node tests must run in CI: {reason}")
    if reason:
        pytest.skip(reason)


def credentials_file(folder: str) -> str:
    """An AWS credentials file for the nodes (moto accepts any key)."""
    path = os.path.join(folder, "node-credentials")
    with open(path, "w") as f:
        f.write(NODE_CREDENTIALS)
    return path


def start(base: str, workers: int = 2, cpus: int = WORKER_CPUS, head_args: tuple[str, ...] = (),
          env: dict[str, str] | None = None) -> LocalCluster:
    """A head and ``workers`` private-disk worker nodes, started in parallel."""
    cluster = LocalCluster(base, credentials=credentials_file(base), head_args=head_args, env=env)
    try:
        cluster.start_head()
        for _ in range(workers):
            cluster.add_worker(cpus=cpus, wait=False)
        cluster.wait_for_nodes()
    except BaseException:
        cluster.stop()
        raise
    return cluster


# ----------------------------------------------------------------------------------------------
# Data and jobs
# ----------------------------------------------------------------------------------------------


def upload_fashion_mnist(bucket: str, train_per_class: int = 48, test_per_class: int = 50) -> tuple[str, str]:
    """The smoke classes of Fashion-MNIST as Parquet image tables on S3; returns (train, test) URIs."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import s3fs
    from PIL import Image

    from mmdist import schema
    from mmdist.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist

    fs = s3fs.S3FileSystem()
    uris = []
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        images, labels = load_fashion_mnist("/usr/share/datasets/fashion-mnist", split, False)
        pngs, names = [], []
        for name in CLASSES:
            for i in [int(i) for i in (labels == FASHION_MNIST_CLASSES.index(name)).nonzero()[0][:per_class]]:
                buf = io.BytesIO()
                Image.fromarray(images[i]).save(buf, format="PNG")
                pngs.append(buf.getvalue())
                names.append(name)
        table = pa.table({schema.IMAGE_BYTES: pa.array(pngs, pa.binary()), schema.CLASS_NAME: pa.array(names)})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        uri = f"{bucket}/data/{split}.parquet"
        fs.pipe(uri.removeprefix("s3://"), buf.getvalue())
        uris.append(uri)
    return uris[0], uris[1]


def submit(cluster: LocalCluster, job_id: str, args: list[str], module: str = "jobs.smoke",
           timeout: float = 900, working_dir: bool = True) -> tuple[str, str, subprocess.CompletedProcess]:
    """`ray job submit --working-dir <repo> -- python -m <module> <args>`; returns (status, logs, cli).

    ``working_dir=False`` leaves the flag out (the nodes import the installed package).
    """
    from ray.job_submission import JobSubmissionClient

    env = {k: v for k, v in os.environ.items() if k not in AWS_KEYS}
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    client = JobSubmissionClient(cluster.dashboard_url)
    cli = None
    for _attempt in range(6):  # the job agent can lag the dashboard ("No available agent")
        cli = subprocess.run([os.path.join(BIN, "ray"), "job", "submit", "--address", cluster.dashboard_url,
                              "--submission-id", job_id, *(["--working-dir", ROOT] if working_dir else []), "--",
                              "python", "-m", module, *args],
                             env=env, capture_output=True, text=True, timeout=timeout)
        if any(j.submission_id == job_id for j in client.list_jobs()):
            break
        time.sleep(5)
    else:
        pytest.fail(f"ray job submit was refused:\n{cli.stderr[-3000:]}")
    return str(client.get_job_status(job_id)), client.get_job_logs(job_id), cli


def driver_env(cluster: LocalCluster) -> dict[str, str]:
    """The environment of a driver on the head's machine joining the cluster: the head's credentials
    file as its profile, no AWS keys."""
    env = {k: v for k, v in os.environ.items() if k not in AWS_KEYS}
    env.update(RAY_ADDRESS=cluster.gcs_address, AWS_SHARED_CREDENTIALS_FILE=cluster.credentials)
    return env


def error_line(logs: str) -> str:
    """The `mmdist: error:` line of a job's log ('' if none)."""
    return next((line for line in logs.splitlines() if line.startswith("mmdist: error:")), "")


# ----------------------------------------------------------------------------------------------
# Where things ran
# ----------------------------------------------------------------------------------------------


def train_worker_groups(cluster: LocalCluster, job_id: str | None = None) -> list[list[str]]:
    """Node addresses of the Ray Train workers of each training run (grouped by placement group)."""
    from ray.util.state import list_actors, list_nodes

    ips = {n.node_id: n.node_ip for n in list_nodes(address=cluster.dashboard_url, detail=True)}
    groups: dict[str, list[str]] = {}
    for a in list_actors(address=cluster.dashboard_url, filters=[("class_name", "=", "RayTrainWorker")],
                         detail=True, limit=10_000):
        if job_id is None or a.job_id == job_id:
            groups.setdefault(a.placement_group_id or a.actor_id, []).append(ips.get(a.node_id, a.node_id))
    return list(groups.values())


def job_hex_id(cluster: LocalCluster, submission_id: str) -> str | None:
    """The Ray job id (hex) of a submitted job."""
    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(cluster.dashboard_url).get_job_info(submission_id)
    return info.job_id


def read_json_s3(uri: str) -> dict:
    """A JSON object on the loopback S3 server."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    with fs.open(uri.removeprefix("s3://")) as f:
        return json.load(f)
