"""Faults survived (issue 8): storage outage mid-encode, SIGINT at every stage of `mmdist run`.

The worker-kill and actor-kill faults live beside their stages (test_distributed, test_sample)
and carry the same `fault` marker.
"""

import dataclasses
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
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


STAGES = ("encode", "pretrain", "finetune", "sample", "evaluate")


def _work_files(out):
    """mtime of every unit of finished work a rerun must reuse: manifests, shards, checkpoints,
    class markers and images, trial results."""
    patterns = ["*/manifest.json", "finetune/*/manifest.json", "latents/shards/*.parquet",
                "*/ray/*/checkpoint_*/state.safetensors", "finetune/*/ray/*/checkpoint_*/state.safetensors",
                "samples/*/classes/*.json", "eval/trials/*.json"]
    files = [p for pat in patterns for p in glob.glob(os.path.join(out, pat))]
    for marker in glob.glob(os.path.join(out, "samples", "*", "classes", "*.json")):  # published classes
        variant = os.path.dirname(os.path.dirname(marker))
        files += glob.glob(os.path.join(variant, "images", os.path.basename(marker)[:-5], "*.png"))
    return {p: os.stat(p).st_mtime_ns for p in files}


def test_sigint_at_every_stage_then_rerun_reuses_work_and_matches_an_uninterrupted_run(smoke_run, tmp_path):
    """Interrupt `mmdist run` inside each stage in turn; the final rerun reuses every finished unit
    of work (same files, untouched) and gives the uninterrupted run's bytes."""
    import ray

    ref_cfg, ref = smoke_run
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "mmdist", "run", "--smoke", "--output", out,
           "evaluate.methods=[minimax, diffusion, random]", "evaluate.ipcs=[1, 2]"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    for i, target in enumerate(STAGES):
        # SIGINT at its default in the child, whoever started pytest: a shell script that starts it
        # in the background (`pytest &`) hands it, and every child, SIGINT ignored (POSIX), and a
        # Python started that way installs no KeyboardInterrupt (every interrupt was then missed)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        started, log = threading.Event(), []

        def watch(p=proc, stage=target, flag=started, lines=log):
            for line in p.stderr:
                lines.append(line)
                if f"stage {stage}: start" in line:
                    flag.set()

        reader = threading.Thread(target=watch, daemon=True)
        reader.start()
        assert started.wait(timeout=300), f"{target} never started: {''.join(log)[-2000:]}"
        time.sleep(0.5)  # inside the stage: each takes seconds (Ray start-up alone)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        reader.join(timeout=10)
        text = "".join(log)
        # the interrupt landed in the target stage: it stopped the run before the next stage started,
        # with our line and status (Ray Train and Tune leave SIGINT handlers of their own behind, so
        # an interrupt in sampling after a fine-tune in the same process used to be ignored)
        nxt = STAGES[i + 1] if i + 1 < len(STAGES) else None
        assert proc.returncode == 130 and "mmdist: interrupted" in text, (target, proc.returncode, text[-2000:])
        assert nxt is None or f"stage {nxt}: start" not in text, f"the interrupt missed {target}"
    before = _work_files(out)
    assert any("/latents/shards/" in p for p in before) and any("manifest.json" in p for p in before)
    final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, final.stderr[-3000:]
    after = _work_files(out)
    redone = [p for p, mtime in before.items() if after.get(p) != mtime]
    assert not redone, f"finished work was redone or lost: {redone[:5]}"
    for variant in ("minimax", "diffusion"):
        want = _hashes(os.path.join(ref_cfg.output, "samples", variant, "images"))
        assert want and _hashes(os.path.join(out, "samples", variant, "images")) == want, variant
    got = json.load(open(os.path.join(out, "eval", "results.json")))
    assert sorted((r["method"], r["ipc"], r["mean"]) for r in got) == \
        sorted((r["method"], r["ipc"], r["mean"]) for r in ref["evaluate"]["rows"])


class OutageProxy:
    """A loopback TCP relay to the S3 server that goes down when the Nth shard PUT arrives.

    The outage is certain to hit mid-encode: it starts with a shard write in flight. While down,
    every connection is accepted and closed unanswered (what a restarting endpoint looks like).
    """

    MARK = b"PUT /outage/run/latents/shards/part-"

    def __init__(self, upstream_port: int):
        import socket

        self.upstream = upstream_port
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.port = self.server.getsockname()[1]
        self.down = threading.Event()
        self.cut_at, self.puts, self.refused = None, 0, 0
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, nth_put: int) -> None:
        """Go down when the ``nth_put``-th shard PUT from now arrives."""
        self.cut_at, self.puts, self.refused = nth_put, 0, 0
        self.down.clear()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.down.is_set():
                self.refused += 1
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src, dst, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_client and self.MARK in data and self.cut_at is not None:
                    self.puts += data.count(self.MARK)
                    if self.puts >= self.cut_at:
                        self.cut_at = None  # one outage per arm(): it lasts until the test clears it
                        self.down.set()
                if self.down.is_set():
                    break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            sock.close()


def _shard_etags(fs, prefix):
    fs.invalidate_cache()
    return {p: fs.info(p)["ETag"] + fs.info(p)["LastModified"].isoformat() for p in fs.glob(f"{prefix}/*.parquet")}


def test_s3_outage_mid_encode_fails_in_one_line_or_rides_through_and_reruns_reuse_shards(s3_server, tmp_path):
    """A permanent outage (2 attempts) ends in one line naming the shard's URL; a 3-second one (the
    default 10 attempts) is ridden through by the client's retries; finished shards are reused."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("outage")
    root = image_folder(str(tmp_path / "train"), {f"c{i}": 10 for i in range(4)}, size=48)
    fs.put(root, "outage/train", recursive=True)
    proxy = OutageProxy(int(s3_server.rsplit(":", 1)[1]))
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "mmdist", "encode", "--smoke", "--output", "s3://outage/run",
           "data.source=imagefolder", "data.train=s3://outage/train", "data.classes=null", "data.channels=3",
           "data.image_size=32", "data.max_per_class=null", "encode.shard_rows=2", "encode.num_actors=1",
           "ray.num_cpus=1"]
    shards_prefix = "outage/run/latents/shards"

    proxy.arm(3)  # the third shard write starts the outage, and it never ends
    failed = subprocess.run(cmd, env={**env, "AWS_MAX_ATTEMPTS": "2"}, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in failed.stderr.splitlines() if ln.startswith("mmdist: error:")]
    assert failed.returncode == 2 and len(lines) == 1, failed.stderr[-3000:]
    assert re.search(r"s3://outage/run/latents/shards/part-\d{5}\.parquet: cannot reach the storage service "
                     r"after the client's retries", lines[0]), lines[0]
    assert proxy.refused >= 1  # the client did retry into the outage
    proxy.down.clear()
    before = _shard_etags(fs, shards_prefix)
    assert 2 <= len(before) < 20 and not fs.exists(f"outage/run/latents/{schema.MANIFEST}")

    proxy.arm(2)  # the second shard write of the rerun starts a 3-second outage
    rerun = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proxy.down.wait(timeout=240), "the rerun wrote no shard"
    time.sleep(3)
    assert rerun.poll() is None  # still running: waiting in the client's retries, not failed
    proxy.down.clear()
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    assert proxy.refused >= 1
    after = _shard_etags(fs, shards_prefix)
    assert {p: after[p] for p in before} == before  # shards finished before the outage were not redone
    with fs.open(f"outage/run/latents/{schema.MANIFEST}") as f:
        manifest = json.load(f)
    assert manifest["rows"] == 40 and len(manifest["shards"]) == 20
    for rel in manifest["shards"]:
        with fs.open(f"outage/run/latents/{rel}", "rb") as f:
            import pyarrow.parquet as pq

            assert pq.read_table(f).num_rows == 2  # every listed shard is whole


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


def test_a_stage_that_fails_gives_its_lease_back_at_once(tmp_path):
    from conftest import smoke_config

    from mmdist import artifacts, run
    from mmdist.errors import DataError

    cfg = smoke_config(str(tmp_path / "run"), data={"source": "imagefolder", "train": str(tmp_path / "missing"),
                                                    "test": None, "classes": None, "max_per_class": None})
    with pytest.raises(DataError):
        run.main(cfg)  # fails after encode took its lease (the data is read under it)
    assert not os.path.exists(artifacts.lease_uri(os.path.join(cfg.output, "latents")))
    artifacts.lease(os.path.join(cfg.output, "latents"), "encode")  # free for the rerun, no wait
    artifacts.release_all()


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
    assert finetune.main(cfg)["variants"]["minimax"]["steps"] == 4
    variant = root / "finetune" / "minimax"
    ckpts = sorted(p for p in glob.glob(str(variant / "ray" / "*" / "checkpoint_*")) if os.path.isdir(p))
    assert len(ckpts) == 2, ckpts
    state = os.path.join(ckpts[-1], "state.safetensors")  # the step-4 checkpoint: truncated
    with open(state, "r+b") as f:
        f.truncate(os.path.getsize(state) // 2)
    for path in (root / "finetune" / "manifest.json", variant / "manifest.json", variant / "model",
                 variant / "model_ema"):  # as if the run died before exporting
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    finetune.main(cfg)  # used to fail on every restart: the same corrupt checkpoint each time
    manifest = json.load(open(variant / "manifest.json"))
    assert manifest["steps"] == 4 and manifest["resumed_at"] == [2], manifest["resumed_at"]
