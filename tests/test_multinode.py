"""Every stage on a 2-node cluster whose nodes do not share a disk, submitted as users submit.

One cluster for the module (tests/multinode.py): a 0-CPU head and two worker nodes with private
home and /tmp, data and outputs on the loopback S3 server. The pipeline job is compared byte for
byte with the same config run on one node; then bad input, credentials and node loss.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import smoke_config
from multinode import (
    CLASSES,
    WORKER_CPUS,
    driver_env,
    error_line,
    job_hex_id,
    read_json_s3,
    require_root,
    start,
    submit,
    train_worker_groups,
    upload_fashion_mnist,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes(s3_server, tmp_path_factory):
    """The cluster, started once for the module and stopped at its end."""
    require_root()
    cluster = start(str(tmp_path_factory.mktemp("nodes")))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def store(s3_server):
    """A bucket for the module with the smoke classes of Fashion-MNIST in it; yields (bucket, train, test)."""
    import s3fs

    fs = s3fs.S3FileSystem()
    name = f"mn-{os.getpid()}"
    fs.mkdir(name)
    train, test = upload_fashion_mnist(f"s3://{name}")
    yield f"s3://{name}", train, test
    fs.rm(name, recursive=True)


def _data_args(train, test):
    return ["data.source=parquet", f"data.train={train}", f"data.test={test}"]


def _objects(prefix, keep=lambda rel: True):
    """{relative path: sha256} of the objects under an s3:// prefix whose path ``keep`` accepts,
    fetched concurrently (one round trip each would take minutes on a busy loopback server).

    A model's config.json is hashed without ``_name_or_path``: diffusers records there the folder
    the model was loaded from, which is a node's cache path, not part of the model.
    """

    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    root = prefix.removeprefix("s3://")
    # keys ending in "/" are folder markers (pyarrow writes them), not files
    paths = [p for p in fs.find(root) if not p.endswith("/") and keep(os.path.relpath(p, root))]
    out = {}
    for path, data in (fs.cat(paths) if paths else {}).items():
        rel = os.path.relpath(path, root)
        if rel.endswith(("model/config.json", "model_ema/config.json")):
            data = json.dumps({k: v for k, v in json.loads(data).items() if k != "_name_or_path"}).encode()
        out[rel] = hashlib.sha256(data).hexdigest()
    return out


def _is_artifact(rel):
    """Whether a file's bytes depend only on the config: no manifests, run records or timings."""
    parts = rel.split("/")
    if parts[-1] in ("manifest.json", "history.json") or \
            {"ray", "tune", "trials", "classes", "tensorboard"} & set(parts):  # run records: times, hosts
        return False
    # The diagnostics' teacher trains with every core of the node it lands on, and float sums
    # follow the thread count: its weights, and the diagnostics they score, are per machine.
    if parts[0] == "teacher" or parts[-1] in ("diagnostics.json", "results.md"):
        return False
    return parts[-1] != "config.json" or parts[-2] in ("model", "model_ema")  # a model's config is its shape


# ----------------------------------------------------------------------------------------------
# The pipeline, as users submit it, against the same config on one node
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(two_nodes, store):
    """`ray job submit` of the smoke job with output on S3 and 2 fine-tuning workers; returns its record."""
    bucket, train, test = store
    args = [f"output={bucket}/two-nodes", *_data_args(train, test), "finetune.num_workers=2"]
    status, logs, cli = submit(two_nodes, "pipeline", args)
    assert status == "SUCCEEDED", f"{status}\n{cli.stderr[-2000:]}\n{logs[-4000:]}"
    return {"logs": logs, "job_id": job_hex_id(two_nodes, "pipeline"), "output": f"{bucket}/two-nodes"}


@pytest.fixture(scope="module")
def one_node(ray_cluster, store):
    """The same config run on the session's one-node cluster; the node-loss tests start from its
    latents and models (what they test is what happens after them)."""
    from mmdist import run

    bucket, train, test = store
    run.main(smoke_config(f"{bucket}/one-node", data={"source": "parquet", "train": train, "test": test},
                          finetune={"num_workers": 2}))
    return f"{bucket}/one-node"


def test_two_node_pipeline_is_byte_identical_to_the_single_node_run(store, pipeline, one_node):
    import s3fs

    fs = s3fs.S3FileSystem()
    for stage in ("latents", "pretrain", "finetune", "samples", "eval"):
        assert fs.exists(f"{pipeline['output']}/{stage}/manifest.json"), f"{stage} was not published"
    kept = _objects(pipeline["output"], _is_artifact)
    assert {"latents/stats.safetensors", "finetune/minimax/model_ema/diffusion_pytorch_model.safetensors",
            "eval/results.json"} <= set(kept)
    assert sum(r.startswith("samples/minimax/images/") for r in kept) == len(CLASSES) * 2  # IPC 2
    assert kept == _objects(one_node, _is_artifact)
    assert "| minimax |" in pipeline["logs"]  # the table the driver printed


def test_two_training_workers_ran_on_two_worker_nodes(two_nodes, pipeline):
    groups = train_worker_groups(two_nodes, pipeline["job_id"])
    workers = {n.ip for n in two_nodes.workers}
    pairs = [g for g in groups if len(g) == 2]
    assert pairs, f"no 2-worker training run among {groups}"
    for nodes in pairs:
        assert set(nodes) <= workers and len(set(nodes)) == 2, nodes  # never on the head, one per node
    history = read_json_s3(f"{pipeline['output']}/finetune/minimax/manifest.json")["history"]
    assert all(h["allgather_seconds"] > 0 for h in history)  # memories were gathered across the pair


# ----------------------------------------------------------------------------------------------
# Bad input: one line naming the node or resource, nothing published
# ----------------------------------------------------------------------------------------------


def test_a_local_output_the_nodes_cannot_reach_is_refused_naming_the_node(two_nodes, store, tmp_path):
    _, train, test = store
    out = tmp_path / "on-the-head-only"
    status, logs, _ = submit(two_nodes, "local-output", [f"output={out}", *_data_args(train, test)])
    line = error_line(logs)
    assert status == "FAILED" and line, logs[-3000:]
    assert "cannot reach the output" in line and any(f"node {n.ip} " in line for n in two_nodes.workers), line
    assert not [f for _, _, files in os.walk(out) for f in files]  # not even the probe is left


def test_an_s3_output_on_a_node_without_credentials_is_refused_naming_it(two_nodes, store):
    import s3fs

    bucket, train, test = store
    bare = two_nodes.add_worker(cpus=1, credentials=False)
    try:
        status, logs, _ = submit(two_nodes, "no-credentials", [f"output={bucket}/no-creds", *_data_args(train, test)])
    finally:
        bare.stop()
    line = error_line(logs)
    assert status == "FAILED" and f"node {bare.ip} " in line and "credentials" in line, logs[-3000:]
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/no-creds".removeprefix("s3://"))


def test_gpus_asked_of_a_cpu_only_cluster_are_refused_naming_the_field(two_nodes, store):
    bucket, train, test = store
    status, logs, _ = submit(two_nodes, "gpus", [f"output={bucket}/gpus", *_data_args(train, test),
                                                 "finetune.use_gpu=true"])
    line = error_line(logs)
    assert status == "FAILED" and "finetune.use_gpu" in line and "no node of this Ray cluster has one" in line, logs
    assert "(CPU 0, GPU 0)" in line and all(f"{n.ip} (CPU {WORKER_CPUS}, GPU 0)" in line
                                          for n in two_nodes.workers if n.alive)
    assert not _objects(f"{bucket}/gpus")


# ----------------------------------------------------------------------------------------------
# Credentials of a driver that joins the cluster
# ----------------------------------------------------------------------------------------------


def test_aws_keys_of_a_joining_driver_reach_no_runtime_env_and_no_log(two_nodes, store, tmp_path):
    from ray.util.state import list_runtime_envs

    bucket, train, test = store
    import uuid

    # fresh values: the suite's own SECRET is in conftest.py, which every job's working_dir upload
    # copies onto the nodes
    keys = {k: f"{k.lower()}-{uuid.uuid4().hex}" for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                            "AWS_SESSION_TOKEN")}
    env = {**driver_env(two_nodes), **keys}
    proc = subprocess.run([sys.executable, "-m", "mmdist", "evaluate", "--smoke", "--output", f"{bucket}/creds",
                           *_data_args(train, test), "evaluate.methods=[random]"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "removed from this driver's environment" in proc.stderr
    assert read_json_s3(f"{bucket}/creds/eval/manifest.json")["rows"]  # Tune trials ran on the nodes
    envs = str([e.runtime_env for e in list_runtime_envs(address=two_nodes.dashboard_url)])
    leaks = []
    for node in [two_nodes.head, *two_nodes.workers]:
        folder = node.temp_dir if node is two_nodes.head else node.root + node.temp_dir  # through its namespace
        for dirpath, _, files in os.walk(folder):
            for f in files:
                try:
                    data = open(os.path.join(dirpath, f), "rb").read()
                except OSError:  # sockets, vanished files
                    continue
                leaks += [(f, k) for k, v in keys.items() if v.encode() in data]
    assert not [k for k, v in keys.items() if v in envs], "AWS keys in a runtime_env"
    assert not leaks, f"AWS keys in node files: {leaks[:5]}"
    assert not [k for k, v in keys.items() if v in proc.stdout + proc.stderr]


# ----------------------------------------------------------------------------------------------
# Losing a node
# ----------------------------------------------------------------------------------------------


def _node_of(two_nodes, class_name):
    """The worker node hosting a live actor of ``class_name`` (None if none is alive yet)."""
    from ray.util.state import list_actors, list_nodes

    ips = {n.node_id: n.node_ip for n in list_nodes(address=two_nodes.dashboard_url)}
    for a in list_actors(address=two_nodes.dashboard_url, filters=[("class_name", "=", class_name),
                                                                    ("state", "=", "ALIVE")]):
        for node in two_nodes.workers:
            if node.alive and ips.get(a.node_id) == node.ip:
                return node
    return None


def _replace_lost_nodes(two_nodes):
    """Bring the cluster back to two live worker nodes."""
    while sum(n.alive for n in two_nodes.workers) < 2:
        two_nodes.add_worker(cpus=WORKER_CPUS)


def _copy(src, dst):
    import s3fs

    s3fs.S3FileSystem().copy(src.removeprefix("s3://"), dst.removeprefix("s3://"), recursive=True)


def _driver(two_nodes, stage, output, args):
    """A driver process joined to the cluster (on the head's disk, like a job's)."""
    return subprocess.Popen([sys.executable, "-m", "mmdist", stage, "--smoke", "--output", output, *args],
                            env=driver_env(two_nodes),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.fault
def test_losing_a_node_mid_finetune_resumes_from_s3_and_finishes(two_nodes, store, one_node):
    import s3fs

    bucket, train, test = store
    out = f"{bucket}/node-loss-ft"
    for stage in ("latents", "pretrain"):
        _copy(f"{one_node}/{stage}", f"{out}/{stage}")
    args = [*_data_args(train, test), "finetune.num_workers=2", "finetune.steps=60", "finetune.checkpoint_every=10",
            "finetune.log_every=10"]
    proc = _driver(two_nodes, "finetune", out, args)
    fs = s3fs.S3FileSystem()
    deadline = time.time() + 400
    victim = None
    while time.time() < deadline and proc.poll() is None and victim is None:
        fs.invalidate_cache()
        if any(_registered(fs, p) for p in fs.glob(f"{out.removeprefix('s3://')}/finetune/minimax/ray/*/"
                                                    "checkpoint_manager_snapshot.json")):
            victim = _node_of(two_nodes, "RayTrainWorker")
        time.sleep(0.2)
    assert victim is not None, "no checkpoint was registered before the run ended"
    victim.kill(signal.SIGKILL)  # the whole node: raylet, object store, its training worker
    _replace_lost_nodes(two_nodes)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-4000:]
    m = read_json_s3(f"{out}/finetune/minimax/manifest.json")
    steps = [h["step"] for h in m["history"]]
    assert m["steps"] == 60 and m["resumed_at"] and 0 < m["resumed_at"][0] < 60
    assert steps == sorted(set(steps)) and steps[-1] == 60  # nothing lost, nothing counted twice


def _registered(fs, path):

    try:
        return bool(json.loads(fs.cat_file(path)).get("latest_checkpoint_result"))
    except (OSError, ValueError):
        return False


@pytest.mark.fault
def test_losing_a_node_mid_sampling_redoes_its_classes_byte_identically(ray_cluster, two_nodes, store, one_node):
    from mmdist import sample

    bucket, train, test = store
    fields = ["sample.ipc=8", "sample.steps=60", "sample.batch_size=1", "sample.baseline=false",
              "finetune.num_workers=2"]  # the config that made the models copied
    reference = f"{bucket}/sampling-one-node"
    out = f"{bucket}/node-loss-sample"
    for dst in (reference, out):
        for stage in ("latents", "pretrain", "finetune"):
            _copy(f"{one_node}/{stage}", f"{dst}/{stage}")
    sample.main(smoke_config(reference, data={"source": "parquet", "train": train, "test": test},
                             sample={"ipc": 8, "steps": 60, "batch_size": 1, "baseline": False},
                             finetune={"num_workers": 2}))
    proc = _driver(two_nodes, "sample", out, [*_data_args(train, test), *fields])
    import s3fs

    fs = s3fs.S3FileSystem()
    victim, deadline = None, time.time() + 400
    while time.time() < deadline and proc.poll() is None and victim is None:
        fs.invalidate_cache()
        if fs.glob(f"{out.removeprefix('s3://')}/samples/minimax/images/*/*.png"):
            victim = _node_of(two_nodes, "ClassSampler")
        time.sleep(0.1)
    assert victim is not None, "sampling ended before a node could be lost"
    victim.kill(signal.SIGKILL)
    replacer = threading.Thread(target=_replace_lost_nodes, args=(two_nodes,), daemon=True)
    replacer.start()  # while sampling goes on: a restarted actor may land on the new node
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-4000:]
    got = _objects(f"{out}/samples/minimax", lambda rel: rel.startswith("images/"))
    want = _objects(f"{reference}/samples/minimax", lambda rel: rel.startswith("images/"))
    assert len(want) == 8 * len(CLASSES) and got == want  # every image once, the same bytes
    from ray.util.state import list_actors

    restarted = [a for a in list_actors(address=two_nodes.dashboard_url, detail=True,
                                        filters=[("class_name", "=", "ClassSampler")]) if a.num_restarts]
    assert restarted, "no sampling actor was restarted: the node was lost after sampling ended"
    replacer.join(timeout=600)  # the next tests want two worker nodes again (one replacement, not two)
    assert sum(n.alive for n in two_nodes.workers) >= 2, "the lost node was not replaced"


# ----------------------------------------------------------------------------------------------
# The ImageNet-1K-shaped rehearsal
# ----------------------------------------------------------------------------------------------


def _imagenet_shaped(store, tmp_path, classes=1000):
    """A generated ImageFolder of ``classes`` wnid-named classes (2 train, 1 val image of 8 px each),
    a DiT backbone and a teacher given by path, as an ImageNet user brings DiT-XL/2 and a
    pretrained classifier in their bucket; returns (train, val, backbone, teacher) URIs."""
    import s3fs
    import torch
    from helpers import png, tiny_dit
    from safetensors.numpy import save

    from mmdist.models import classifiers

    bucket = store[0]
    for split, per_class in (("train", 2), ("val", 1)):
        for c in range(classes):
            folder = tmp_path / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                (folder / f"{i}.png").write_bytes(png(size=8, seed=c * 3 + i))
    fs = s3fs.S3FileSystem()
    fs.put(str(tmp_path / "train"), f"{bucket}/in1k/train".removeprefix("s3://"), recursive=True)
    fs.put(str(tmp_path / "val"), f"{bucket}/in1k/val".removeprefix("s3://"), recursive=True)
    torch.manual_seed(0)
    teacher = classifiers.create("tiny", in_channels=3, num_classes=classes, image_size=8)
    weights = {k: v.detach().numpy() for k, v in teacher.state_dict().items()}
    root = f"{bucket}/in1k/teacher".removeprefix("s3://")
    fs.pipe(f"{root}/model.safetensors", save(weights))
    fs.pipe(f"{root}/manifest.json", b'{"kind": "teacher", "arch": "tiny", "test_acc": 0.0, "resolution": 8}')
    backbone = f"{bucket}/in1k/backbone".removeprefix("s3://")
    fs.put(tiny_dit(str(tmp_path / "backbone"), classes=classes, size=8, channels=3), backbone, recursive=True)
    return f"{bucket}/in1k/train", f"{bucket}/in1k/val", f"s3://{backbone}", f"s3://{root}"


def test_imagenet1k_shaped_rehearsal_runs_every_stage_at_1000_classes_by_both_routes(two_nodes, store, tmp_path):
    """1000 classes through encode, fine-tune of a 1000-class backbone given by path on S3 (2
    workers, 1000-class memories; batches of 256 so that step 2 meets classes step 1 put in
    memory: rows are i.i.d., 2 per class), sampling (1000-class fan-out) and soft-label
    evaluation from a teacher given by path. Pretraining is left out as ImageNet users leave it
    (they bring DiT-XL/2); a 1000-class pretrain is the same Ray Train loop without the memories.

    Then the paper's route on the same latents: ``finetune.class_phases=500``, two phase models
    trained at once, one per worker node, and the classes at the phases' edges sampled each from
    its phase's model."""
    train, val, backbone, teacher = _imagenet_shaped(store, tmp_path)
    out = f"{store[0]}/in1k/run"
    args = [f"output={out}", "data.source=imagefolder", f"data.train={train}", f"data.test={val}",
            "data.classes=null", "data.max_per_class=null", "data.image_size=8", "data.channels=3",
            "encode.shard_rows=256", f"finetune.backbone={backbone}", "finetune.num_workers=2",
            "finetune.global_batch_size=256",
            "sample.ipc=1", "sample.steps=2", "sample.batch_size=1",
            "sample.baseline=false", "evaluate.protocol=soft", f"evaluate.teacher={teacher}", "evaluate.archs=[tiny]",
            "evaluate.methods=[minimax]", "evaluate.ipcs=[1]", "evaluate.seeds=[0]", "evaluate.epochs=1"]
    status, logs, cli = submit(two_nodes, "rehearsal-1000", args, timeout=1800)
    assert status == "SUCCEEDED", f"{cli.stderr[-2000:]}\n{logs[-4000:]}"
    walls = {}
    for stage, folder in (("encode", "latents"), ("finetune", "finetune/minimax"),
                          ("sample", "samples"), ("evaluate", "eval")):
        m = read_json_s3(f"{out}/{folder}/manifest.json")
        walls[stage] = m["wall_seconds"]
        if stage == "encode":
            assert len(m["classes"]) == 1000 and m["rows"] == 2000
        if stage == "finetune":
            assert m["num_workers"] == 2 and m["history"][-1]["minimax_classes"] >= 1
            assert m["backbone"] == backbone
        if stage == "sample":
            assert len(m["classes"]) == 1000
        if stage == "evaluate":
            assert m["rows"][0]["protocol"] == "soft" and m["rows"][0]["n"] == 1

    # the official route: phases of 500 classes, each its own 1-worker Ray Train run of 2 CPUs, so
    # a 3-CPU worker node holds one and the two run at once on the two nodes. Its sampling draws the
    # classes at the phases' edges (the 1000-class fan-out ran above): each from its phase's model
    phased = f"{store[0]}/in1k/phases"
    edges = (0, 499, 500, 999)
    route = [f"output={phased}", f"latents={out}/latents", *args[1:], "finetune.class_phases=500",
             "finetune.num_workers=1", "finetune.cpus_per_worker=2",
             f"sample.classes=[{', '.join(f'n{label:08d}' for label in edges)}]"]
    for stage in ("finetune", "sample"):
        status, logs, cli = submit(two_nodes, f"rehearsal-phases-{stage}", [stage, "--smoke", *route],
                                   module="mmdist", timeout=1800)
        assert status == "SUCCEEDED", f"{cli.stderr[-2000:]}\n{logs[-4000:]}"
        if stage == "finetune":
            assert "2 of 2 phases of 500 classes to train, 2 at a time" in logs
            groups = train_worker_groups(two_nodes, job_hex_id(two_nodes, "rehearsal-phases-finetune"))
            assert sorted(map(len, groups)) == [1, 1], groups
            # one phase per worker node (earlier tests lose and replace nodes: compare with the live ones)
            nodes = {g[0] for g in groups}
            assert len(nodes) == 2 and nodes <= {n.ip for n in two_nodes.workers if n.alive}, groups
    variant = read_json_s3(f"{phased}/finetune/minimax/manifest.json")
    assert [p["labels"] for p in variant["phases"]] == [list(range(500)), list(range(500, 1000))]
    for p in (0, 1):
        m = read_json_s3(f"{phased}/finetune/minimax/phases/{p}/manifest.json")
        assert m["num_workers"] == 1 and m["backbone"] == backbone and len(m["classes"]) == 500
        assert m["history"][-1]["minimax_classes"] >= 1
    walls["finetune (phases)"] = variant["wall_seconds"]
    drawn = read_json_s3(f"{phased}/samples/manifest.json")
    assert len(drawn["classes"]) == len(edges)
    walls["sample (phases, 4 classes)"] = drawn["wall_seconds"]
    for label, p in zip(edges, (0, 0, 1, 1)):
        marker = read_json_s3(f"{phased}/samples/minimax/classes/n{label:08d}.json")
        assert marker["model"] == f"{phased}/finetune/minimax/phases/{p}/model_ema" and marker["count"] == 1
    (tmp_path / "walls.json").write_text(json.dumps(walls))  # for docs/scaling.md: pytest keeps tmp_path
    print("rehearsal wall seconds per stage:", walls)
