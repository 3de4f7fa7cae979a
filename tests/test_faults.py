"""Faults survived (issue 8): storage outage mid-encode, SIGINT at every stage of `mmdist run`.

The worker-kill and actor-kill faults live beside their stages (test_distributed, test_sample)
and carry the same `fault` marker.
"""

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import _free_port
from helpers import image_folder

from mmdist import schema

pytestmark = pytest.mark.fault


def _hashes(folder):
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            if f.endswith(".png"):
                path = os.path.join(dirpath, f)
                out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def test_sigint_at_every_stage_then_rerun_reuses_work_and_matches_an_uninterrupted_run(smoke_run, tmp_path):
    """Interrupt `mmdist run` once in each stage; the final rerun gives the uninterrupted run's bytes."""
    import ray

    ref_cfg, ref = smoke_run
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "mmdist", "run", "--smoke", "--output", out,
           "evaluate.methods=[minimax, diffusion, random]", "evaluate.ipcs=[1, 2]"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    codes = []
    for target in ("encode", "pretrain", "finetune", "sample", "evaluate"):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seen = threading.Event()

        def watch(p=proc, stage=target, flag=seen):
            for line in p.stderr:
                if f"stage {stage}: start" in line:
                    flag.set()

        threading.Thread(target=watch, daemon=True).start()
        if seen.wait(timeout=300):
            time.sleep(3)  # well inside the stage
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        codes.append(proc.returncode)
    assert sum(c != 0 for c in codes) >= 3, f"the interrupts did not interrupt: {codes}"
    final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, final.stderr[-3000:]
    for variant in ("minimax", "diffusion"):
        want = _hashes(os.path.join(ref_cfg.output, "samples", variant, "images"))
        assert want and _hashes(os.path.join(out, "samples", variant, "images")) == want, variant
    import json

    got = json.load(open(os.path.join(out, "eval", "results.json")))
    assert sorted((r["method"], r["ipc"], r["mean"]) for r in got) == \
        sorted((r["method"], r["ipc"], r["mean"]) for r in ref["evaluate"]["rows"])


def test_s3_outage_mid_encode_then_rerun_publishes_whole_shards(ray_cluster, s3_server, tmp_path):
    """Stop the object store while `mmdist encode` writes to it, restart it, rerun: complete and whole."""
    import s3fs
    from moto.server import ThreadedMotoServer

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    fs.mkdir("outage")
    root = image_folder(str(tmp_path / "train"), {f"c{i}": 10 for i in range(4)}, size=48)
    fs.put(root, "outage/train", recursive=True)
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_MAX_ATTEMPTS": "2"}
    env.pop("RAY_ADDRESS", None)
    args = ["--smoke", "--output", "s3://outage/run", "data.source=imagefolder", "data.train=s3://outage/train",
            "data.classes=null", "data.channels=3", "data.image_size=32", "data.max_per_class=null",
            "encode.shard_rows=2", "encode.num_actors=1", "ray.num_cpus=1"]
    proc = subprocess.Popen([sys.executable, "-m", "mmdist", "encode", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(fs.glob("outage/run/latents/shards/*.parquet")) < 2:
        time.sleep(0.05)
        fs.invalidate_cache()
    server.stop()
    time.sleep(4)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        _, err = proc.communicate(timeout=300)
        if proc.returncode != 0:  # it did not ride through the outage: it must say why in one line
            assert "mmdist: error:" in err and "Traceback" not in err.split("mmdist: error:")[-1], err[-2000:]
            assert "object storage" in err or "storage error" in err, err[-2000:]
        fs.invalidate_cache()
        assert not fs.exists(f"outage/run/latents/{schema.MANIFEST}") or proc.returncode == 0
        rerun = subprocess.run([sys.executable, "-m", "mmdist", "encode", *args], env=env, capture_output=True,
                               text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        fs.invalidate_cache()
        with fs.open(f"outage/run/latents/{schema.MANIFEST}") as f:
            import json

            manifest = json.load(f)
        assert manifest["rows"] == 40 and len(manifest["shards"]) == 20
        for rel in manifest["shards"]:
            with fs.open(f"outage/run/latents/{rel}", "rb") as f:
                import pyarrow.parquet as pq

                assert pq.read_table(f).num_rows == 2  # every listed shard is whole
    finally:
        server.stop()
