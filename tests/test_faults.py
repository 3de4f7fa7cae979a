"""Faults survived (issue 8): storage outage mid-encode, SIGINT at every stage of `mmdist run`.

The worker-kill and actor-kill faults live beside their stages (test_distributed, test_sample)
and carry the same `fault` marker.
"""

import dataclasses
import glob
import hashlib
import json
import os
import shutil
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


# ----------------------------------------------------------------------------------------------
# One writer per stage folder; --overwrite replaces the whole stage
# ----------------------------------------------------------------------------------------------


def _hold_lease(folder):
    """A subprocess that takes the lease on ``folder`` and waits; returns it once it holds it."""
    code = (f"from mmdist import artifacts; artifacts.lease({folder!r}, 'encode'); print('held', flush=True); "
            "import time; time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_holder_until_the_holder_dies(tmp_path):
    from mmdist import artifacts
    from mmdist.errors import ArtifactError

    out = str(tmp_path / "run")
    folder = os.path.join(out, "latents")
    holder = _hold_lease(folder)
    try:
        # the CLI refuses in one line, before Ray starts
        cli = subprocess.run([sys.executable, "-m", "mmdist", "encode", "--smoke", "--output", out],
                             capture_output=True, text=True, timeout=300)
        lines = [ln for ln in cli.stderr.splitlines() if ln.startswith("mmdist: error:")]
        assert cli.returncode == 2 and len(lines) == 1 and "Traceback" not in cli.stderr, cli.stderr[-2000:]
        assert "is being written by another run (" in lines[0] and f":{holder.pid}, encode stage" in lines[0]
        assert not os.path.exists(folder)  # nothing was written
        with pytest.raises(ArtifactError, match=f":{holder.pid}, encode stage"):
            artifacts.lease(folder, "encode")
    finally:
        holder.kill()
        holder.wait()
    artifacts.lease(folder, "encode")  # its holder died: taken over at once, no expiry wait
    lease = json.load(open(artifacts.lease_uri(folder)))
    assert lease["pid"] == os.getpid()
    artifacts.release(folder)
    assert not os.path.exists(artifacts.lease_uri(folder))


def test_a_lease_on_object_storage_expires_after_its_holders_last_renewal(bucket):
    from mmdist import artifacts, storage
    from mmdist.errors import ArtifactError

    folder = f"{bucket}/run/samples"
    other = {"holder": "node-7:4242", "host": "node-7", "pid": 4242, "stage": "sample", "token": "t"}
    storage.write_json(artifacts.lease_uri(folder), {**other, "since": time.time(), "renewed": time.time()})
    with pytest.raises(ArtifactError, match=r"being written by another run \(node-7:4242, sample stage"):
        artifacts.lease(folder, "sample")
    stale = time.time() - artifacts.LEASE_SECONDS - 1
    storage.write_json(artifacts.lease_uri(folder), {**other, "since": stale, "renewed": stale})
    artifacts.lease(folder, "sample")  # expired: taken over
    assert storage.read_json(artifacts.lease_uri(folder))["pid"] == os.getpid()
    artifacts.release(folder)
    assert not storage.exists(artifacts.lease_uri(folder))


def test_overwrite_replaces_the_whole_stage(smoke_run, tmp_path):
    """Sampling IPC 2 over a finished IPC 4 with --overwrite leaves IPC 2 images, not 2 stale ones per class."""
    from mmdist import sample

    cfg, _ = smoke_run
    root = tmp_path / "run"
    for stage in ("latents", "pretrain", "finetune"):
        shutil.copytree(os.path.join(cfg.output, stage), root / stage, ignore=shutil.ignore_patterns("ray"))
    big = dataclasses.replace(cfg, output=str(root), sample=dataclasses.replace(cfg.sample, ipc=4, steps=2,
                                                                              baseline=False))
    sample.main(big)
    (root / "samples" / "stale-extra-file").write_bytes(b"left by the earlier run")
    small = dataclasses.replace(big, overwrite=True, sample=dataclasses.replace(big.sample, ipc=2))
    sample.main(small)
    images = root / "samples" / "minimax" / "images"
    assert sorted(len(os.listdir(images / c)) for c in os.listdir(images)) == [2, 2]
    assert not (root / "samples" / "stale-extra-file").exists()


# ----------------------------------------------------------------------------------------------
# A corrupt latest checkpoint falls back to the previous one
# ----------------------------------------------------------------------------------------------


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(smoke_run, tmp_path, caplog):
    from mmdist import finetune

    cfg, _ = smoke_run
    root = tmp_path / "run"
    for stage in ("latents", "pretrain"):
        shutil.copytree(os.path.join(cfg.output, stage), root / stage, ignore=shutil.ignore_patterns("ray"))
    cfg = dataclasses.replace(cfg, output=str(root), finetune=dataclasses.replace(
        cfg.finetune, steps=4, checkpoint_every=2, log_every=2))
    assert finetune.main(cfg)["steps"] == 4
    ckpts = sorted(glob.glob(str(root / "finetune" / "ray" / "*" / "checkpoint_*")))
    assert len(ckpts) == 2, ckpts
    state = os.path.join(ckpts[-1], "state.safetensors")  # the step-4 checkpoint: truncated
    with open(state, "r+b") as f:
        f.truncate(os.path.getsize(state) // 2)
    for name in ("manifest.json", "model", "model_ema"):  # as if the run died before exporting
        path = root / "finetune" / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    manifest = finetune.main(cfg)  # used to fail on every restart: the same corrupt checkpoint each time
    assert manifest["steps"] == 4 and manifest["resumed_at"] == [2], manifest["resumed_at"]
