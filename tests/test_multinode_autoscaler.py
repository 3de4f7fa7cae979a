"""Pools sized by demand, proven with Ray's own autoscaler: a head with no worker nodes at all (Ray's
fake_multinode provider, which starts real raylets on this machine when demand asks), jobs
submitted to it, worker nodes launched for them, the jobs finished.

Sampling is submitted once the autoscaler has taken every idle worker node away again: a pool
sized from what that cold cluster has (a head with no CPUs) would hold one actor; a pool that
declares its range asks for one actor per class, and the autoscaler launches nodes for them.

Jobs go without --working-dir: fake_multinode's nodes share the head's session folder, and a node
the autoscaler takes away deletes the job's unpacked working_dir under the driver still running in
it (seen here: the driver's cwd vanished). The nodes import the installed package instead.
"""

import os
import time

import pytest
from conftest import smoke_config
from helpers import tiny_dit
from multinode import LocalCluster, credentials_file, job_hex_id, submit, upload_fashion_mnist

pytestmark = pytest.mark.slow


def test_a_cold_cluster_grows_for_the_jobs_and_they_finish(s3_server, tmp_path_factory, tmp_path):
    import s3fs
    from ray.util.state import list_actors, list_nodes

    from mmdist import finetune

    fs = s3fs.S3FileSystem()
    name = f"mn-autoscale-{os.getpid()}"
    fs.mkdir(name)
    train, test = upload_fashion_mnist(f"s3://{name}")
    out = f"s3://{name}/run"
    data = ["data.source=parquet", f"data.train={train}", f"data.test={test}"]
    base = str(tmp_path_factory.mktemp("autoscale"))
    cluster = LocalCluster(base, credentials=credentials_file(base))
    try:
        cluster.start_head(autoscale={"cpu_1": {"resources": {"CPU": 1}, "max_workers": 3}})
        time.sleep(5)  # a few autoscaler rounds: it must not start anything without demand
        assert len(list_nodes(address=cluster.dashboard_url)) == 1  # the head, with 0 CPUs
        status, logs, _ = submit(cluster, "encode", ["encode", "--smoke", "--output", out, *data], module="mmdist",
                                 working_dir=False)
        assert status == "SUCCEEDED", logs[-4000:]

        cfg = smoke_config(out, data={"source": "parquet", "train": train, "test": test})
        # a stand-in for the fine-tune: the sampling pool is what is tested here
        finetune.adopt(cfg, tiny_dit(str(tmp_path / "dit"), classes=2, size=16, channels=1))

        def alive():  # filtered here: the state API's own filter counts dead nodes as truncated output
            return sum(n.state == "ALIVE" for n in list_nodes(address=cluster.dashboard_url))

        deadline = time.time() + 180
        while time.time() < deadline and alive() > 1:
            time.sleep(2)
        assert alive() == 1, "idle worker nodes were not taken away"
        status, logs, _ = submit(cluster, "sample", ["sample", "--smoke", "--output", out, *data,
                                                     "sample.baseline=false", "sample.ipc=4", "sample.steps=20"],
                                 module="mmdist",
                                 working_dir=False)
        assert status == "SUCCEEDED", logs[-4000:]
        nodes = {n.node_id: n for n in list_nodes(address=cluster.dashboard_url, detail=True)}
        job = job_hex_id(cluster, "sample")
        samplers = [a for a in list_actors(address=cluster.dashboard_url, detail=True,
                                           filters=[("class_name", "=", "ClassSampler")]) if a.job_id == job]
        assert len(samplers) == 2  # one per class, asked of a cluster that had no CPU for any
        placed = [nodes[a.node_id] for a in samplers if a.node_id in nodes]
        assert placed and all(n.resources_total.get("CPU") == 1 for n in placed)  # on launched nodes
        assert fs.exists(f"{name}/run/samples/manifest.json")
    finally:
        cluster.stop()
        fs.rm(name, recursive=True)
