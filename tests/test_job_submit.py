"""`ray job submit --working-dir . -- python -m jobs.smoke` against a real `ray start --head`.

The head gets its own ports and temp dir and runs under `ray start --block` in a new process
session: stopping it is SIGTERM to that process (Ray's own shutdown), then SIGKILL to the session.
`ray stop` is never used, because it would stop every Ray instance on the machine.

Where the multi-node tests run in the same session (root, as in CI), their pipeline job submits
this same job, the same way, to a real head with two worker nodes and asserts all this and more;
this test then steps aside rather than spend three minutes repeating it.
"""

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import fmnist_available
from multinode import free_ports, unavailable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def _wait_for_dashboard(url, head, deadline):
    while time.time() < deadline:
        assert head.poll() is None, "ray start --head exited"
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"no dashboard at {url}")


def _stop(head):
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(head.pid, signal.SIGKILL)  # stragglers of this session only
    except ProcessLookupError:
        pass
    head.wait(timeout=10)


@pytest.fixture
def not_covered_by_the_multinode_job(request):
    superset = "test_multinode.py::test_two_node_pipeline_is_byte_identical_to_the_single_node_run"
    if unavailable() is None and any(item.nodeid.endswith(superset) for item in request.session.items):
        pytest.skip("the multi-node pipeline job in this session submits the same job to a real head")


@pytest.mark.skipif(not fmnist_available(), reason="needs the Debian Fashion-MNIST package")
def test_submit_smoke(not_covered_by_the_multinode_job, tmp_path, tmp_path_factory):
    gcs, dash, client_port, agent, agent_grpc, metrics, runtime_env, node_mgr, obj_mgr = free_ports(9)
    # Unix socket paths under the temp dir must stay under ~107 bytes: a short session folder
    temp_dir = str(tmp_path_factory.mktemp("ray"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "1",
           "PATH": BIN + os.pathsep + os.environ.get("PATH", ""),
           # a loaded CI box can take over a minute to bring up the dashboard's modules
           "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "300",
           "RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT": "240",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # nothing to drain: stop at once
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [os.path.join(BIN, "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
         "--include-dashboard=true",
         f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={runtime_env}", f"--node-manager-port={node_mgr}",
         f"--object-manager-port={obj_mgr}", "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp_dir}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    out = tmp_path / "out"
    start = time.time()
    try:
        _wait_for_dashboard(url, head, time.time() + 300)
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(url)
        for _attempt in range(6):  # the job agent can lag the dashboard ("No available agent")
            submit = subprocess.run(
                [os.path.join(BIN, "ray"), "job", "submit", "--address", url, "--submission-id", "smoke-job",
                 "--working-dir", ROOT, "--", "python", "-m", "jobs.smoke", f"output={out}"],
                env=env, capture_output=True, text=True, timeout=600)
            if submit.returncode == 0 or any(j.submission_id == "smoke-job" for j in client.list_jobs()):
                break
            time.sleep(5)
        else:
            pytest.fail(f"ray job submit was refused:\n{submit.stderr[-3000:]}")
        status = client.get_job_status("smoke-job")
        logs = client.get_job_logs("smoke-job")
    finally:
        _stop(head)
        log.close()
    print(f"ray job submit round trip: {time.time() - start:.0f} s")
    assert status == JobStatus.SUCCEEDED, f"{status}\n{submit.stderr[-3000:]}\n{logs[-3000:]}"
    assert submit.returncode == 0, submit.stderr[-3000:]
    assert (out / "eval" / "manifest.json").is_file()
    assert (out / "samples" / "minimax" / "grid.png").is_file()
    assert "| minimax |" in logs  # the results table printed by the driver
