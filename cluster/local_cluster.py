"""A multi-node Ray cluster on one Linux machine whose worker nodes do not share a disk (run as root).

    sudo .venv/bin/python cluster/local_cluster.py --workers 2 --cpus 3
    # prints the dashboard address; in another shell:
    ray job submit --address http://127.0.0.1:<port> --working-dir . -- python -m jobs.smoke \
        output=s3://my-bucket/smoke data.source=imagefolder data.train=s3://my-bucket/fmnist/train ...
    # Ctrl-C stops every node it started

It is what a cloud cluster looks like to mmdist, shrunk onto one machine:
- the head is `ray start --head` with 0 CPUs (like cluster/aws.yaml: it runs drivers and the job
  server, never stage work), its dashboard bound to 127.0.0.1;
- each worker node is `ray start --address` on its own loopback address (127.0.0.2, 127.0.0.3, ...)
  inside its own mount namespace (`unshare -m --propagation private`) with a private tmpfs over
  $HOME (and so ~/.cache) and the scratch folder (TMPDIR or /tmp): a file one node writes there does
  not exist on any other node or on the head. The Python installation and this checkout stay
  visible (they are the "image"); data and outputs go through object storage;
- a worker node's credentials are its own: ``--credentials FILE`` is copied into its private
  ~/.aws/credentials (an instance role, in miniature); AWS keys in this script's environment are
  not passed on.

Nodes are stopped by signalling their process groups. Never `ray stop`: it stops every Ray
instance on the machine, other people's included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

BIN = os.path.dirname(sys.executable)
AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that are free right now."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _node_env(env: dict[str, str] | None) -> dict[str, str]:
    """The environment of a node: ours (or ``env``) without AWS keys, Ray quiet and unauthenticated."""
    out = {k: v for k, v in (os.environ if env is None else env).items() if k not in AWS_KEYS}
    out.pop("RAY_ADDRESS", None)
    out.update({"RAY_USAGE_STATS_ENABLED": "0", "PATH": BIN + os.pathsep + out.get("PATH", ""),
                "RAY_AUTH_MODE": out.get("RAY_AUTH_MODE", "disabled"),
                # a loaded machine can take over a minute to bring up the dashboard's modules
                "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "300",
                "RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT": "240",
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})
    return out


class Node:
    """One `ray start --block` process group (a node); ``root`` is its view of the file system."""

    def __init__(self, name: str, ip: str, proc: subprocess.Popen, log_path: str, temp_dir: str):
        self.name, self.ip, self.proc, self.log_path, self.temp_dir = name, ip, proc, log_path, temp_dir

    @property
    def alive(self) -> bool:
        """Whether its `ray start` process still runs."""
        return self.proc.poll() is None

    @property
    def root(self) -> str:
        """This node's file system as its processes see it (through its mount namespace)."""
        return f"/proc/{self.proc.pid}/root"

    def session_folders(self) -> list[str]:
        """The node's Ray temp dir (logs, sessions), seen from outside its namespace."""
        return [self.root + self.temp_dir] if self.alive else []

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal every process of the node (its process group and session); after SIGKILL the node
        is no longer ``alive`` when this returns."""
        _signal_session(self.proc.pid, sig)
        if sig == signal.SIGKILL:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM the node's processes, then SIGKILL what is left."""
        if self.alive:
            self.kill(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        self.kill(signal.SIGKILL)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _fake_autoscaler_config(gcs_address: str, worker_types: dict[str, dict]) -> dict:
    """A cluster config for Ray's fake_multinode provider: a 0-CPU head and ``worker_types``."""
    return {
        "cluster_name": "mmdist-local", "max_workers": sum(t.get("max_workers", 1) for t in worker_types.values()),
        "upscaling_speed": 1.0, "idle_timeout_minutes": 0.2,  # idle nodes go after ~12 s
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {"ssh_user": "ubuntu"}, "docker": {},
        "available_node_types": {"ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
                                 **{k: {"node_config": {}, "min_workers": 0, **v} for k, v in worker_types.items()}},
        "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def _signal_session(sid: int, sig: int) -> None:
    """Send ``sig`` to every process whose session id is ``sid`` (a node started with setsid).

    A process group is not enough: Ray's workers can start their own groups, but they stay in the
    session of the `ray start` that made them.
    """
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) == sid:
                os.kill(int(entry), sig)
        except (ProcessLookupError, PermissionError):
            pass


class LocalCluster:
    """A head (0 CPUs) and private-disk worker nodes on this machine; a context manager."""

    def __init__(self, base_dir: str | None = None, env: dict[str, str] | None = None,
                 credentials: str | None = None, head_args: tuple[str, ...] = ()):
        self.base_dir = base_dir or tempfile.mkdtemp(prefix="mmdist-cluster-")
        self.env, self.credentials, self.head_args = env, credentials, head_args
        self.head: Node | None = None
        self.workers: list[Node] = []
        self._next_ip = 2

    # -- head -----------------------------------------------------------------------------------

    def start_head(self, autoscale: dict[str, dict] | None = None, timeout: float = 300.0) -> None:
        """`ray start --head` with 0 CPUs; returns when the job server answers.

        ``autoscale`` (worker node types as in a launcher YAML's ``available_node_types``) runs
        Ray's own autoscaler on the head with its fake_multinode provider, which starts worker
        nodes on this machine as demand asks (sharing its disk: they are not private).
        """
        gcs, dash, client, agent, agent_grpc, metrics, renv, node_mgr, obj_mgr = free_ports(9)
        # Ray's Unix sockets live under <temp-dir>/session_<41 chars>/sockets/ and a socket path
        # may not exceed 107 bytes, so the head's temp dir is short whatever base_dir is (pytest's
        # /tmp/pytest-of-root/pytest-NN/... is not)
        temp_dir = tempfile.mkdtemp(prefix="mmdist-head-", dir="/tmp")
        self._head_temp = temp_dir
        env = _node_env(self.env)
        if self.credentials:  # the head's own credentials, as a file (its instance role)
            env["AWS_SHARED_CREDENTIALS_FILE"] = self.credentials
        extra: list[str] = []
        if autoscale:
            path = os.path.join(self.base_dir, "autoscaler.yaml")
            with open(path, "w") as f:
                json.dump(_fake_autoscaler_config(f"127.0.0.1:{gcs}", autoscale), f)  # JSON is YAML
            extra.append(f"--autoscaling-config={path}")
            env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
        cmd = [os.path.join(BIN, "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
               f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
               f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
               f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
               f"--runtime-env-agent-port={renv}", f"--node-manager-port={node_mgr}",
               f"--object-manager-port={obj_mgr}", "--num-cpus=0", "--num-gpus=0", f"--temp-dir={temp_dir}",
               *extra, *self.head_args]
        self.head = self._spawn("head", "127.0.0.1", cmd, env, temp_dir)
        self.gcs_address, self.dashboard_url = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.head.alive:
                raise RuntimeError(f"ray start --head exited: {self._tail(self.head)}")
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2) as r:
                    if r.status == 200:
                        self.head.ip = self._head_ip() or self.head.ip
                        return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"no job server at {self.dashboard_url} after {timeout:.0f} s")

    # -- worker nodes ---------------------------------------------------------------------------

    def add_worker(self, cpus: int = 2, gpus: int = 0, resources: str | None = None,
                   credentials: str | None | bool = True, wait: bool = True, timeout: float = 300.0) -> Node:
        """A worker node in its own mount namespace; ``credentials=False`` gives it none."""
        ip = f"127.0.0.{self._next_ip}"
        self._next_ip += 1
        name = f"worker-{ip.rsplit('.', 1)[1]}"
        agent, agent_grpc, metrics, renv, node_mgr, obj_mgr = free_ports(6)
        scratch = os.environ.get("TMPDIR", "/tmp")
        temp_dir = os.path.join(scratch, "ray")  # inside the node's private scratch
        cred = self.credentials if credentials is True else (credentials or None)
        cmd = [sys.executable, os.path.abspath(__file__), "_node", "--scratch", scratch,
               *(["--credentials", cred] if cred else []), "--",
               os.path.join(BIN, "ray"), "start", "--block", f"--address={self.gcs_address}",
               f"--node-ip-address={ip}", f"--dashboard-agent-listen-port={agent}",
               f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
               f"--runtime-env-agent-port={renv}", f"--node-manager-port={node_mgr}",
               f"--object-manager-port={obj_mgr}", f"--num-cpus={cpus}", f"--num-gpus={gpus}",
               f"--temp-dir={temp_dir}", *([f"--resources={resources}"] if resources else [])]
        node = self._spawn(name, ip, ["unshare", "-m", "--propagation", "private", "--", *cmd],
                           _node_env(self.env), temp_dir)
        self.workers.append(node)
        if wait:
            self.wait_for_nodes(timeout=timeout)
        return node

    def wait_for_nodes(self, timeout: float = 300.0) -> None:
        """Block until every started node that still runs is registered alive with the head."""
        want = {n.ip for n in self.workers if n.alive}
        deadline = time.time() + timeout
        while time.time() < deadline:
            for n in self.workers:
                if n.ip in want and not n.alive:
                    raise RuntimeError(f"{n.name} exited: {self._tail(n)}")
            if want <= self.alive_ips():
                self.head.ip = self._head_ip() or self.head.ip
                return
            time.sleep(1)
        raise TimeoutError(f"worker nodes {sorted(want)} did not join within {timeout:.0f} s")

    def alive_ips(self) -> set[str]:
        """Addresses of the nodes the head counts as alive (through the job server's state API)."""
        from ray.util.state import list_nodes

        try:  # filtered here: with dead nodes in the table, Ray's server-side filter reports a truncated list
            return {n.node_ip for n in list_nodes(address=self.dashboard_url, limit=10_000) if n.state == "ALIVE"}
        except Exception:  # the state API is not up yet: nothing is alive as far as we can tell
            return set()

    def _head_ip(self) -> str | None:
        """The address the head registered with (Ray may replace a loopback address by the machine's)."""
        from ray.util.state import list_nodes

        try:
            return next((n.node_ip for n in list_nodes(address=self.dashboard_url, detail=True) if n.is_head_node),
                        None)
        except Exception:  # the state API is not up yet
            return None

    # -- plumbing -------------------------------------------------------------------------------

    def _spawn(self, name: str, ip: str, cmd: list[str], env: dict[str, str], temp_dir: str) -> Node:
        """Start ``cmd`` in a new session, logging to <base_dir>/<name>.log."""
        log_path = os.path.join(self.base_dir, f"{name}.log")
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return Node(name, ip, proc, log_path, temp_dir)

    @staticmethod
    def _tail(node: Node) -> str:
        """The last lines of a node's log."""
        with open(node.log_path, errors="replace") as f:
            return "".join(f.readlines()[-15:])

    def stop(self) -> None:
        """Stop the worker nodes, then the head (never `ray stop`)."""
        for node in self.workers:
            node.stop()
        if self.head:
            self.head.stop()
            try:  # the head's logs stay beside the workers' in base_dir
                shutil.copytree(self._head_temp, os.path.join(self.base_dir, "head"), dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("sockets"), symlinks=True)
            except (OSError, shutil.Error):
                pass
            shutil.rmtree(self._head_temp, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ----------------------------------------------------------------------------------------------
# Inside a worker node's mount namespace: private tmpfs over home and scratch, then exec ray
# ----------------------------------------------------------------------------------------------


def _mount(*args: str) -> None:
    """mount(8), failing loudly."""
    subprocess.run(["mount", *args], check=True)


def _private(folder: str, keep: list[str], mode: str) -> None:
    """Cover ``folder`` with an empty tmpfs, keeping the ``keep`` paths under it visible.

    The tmpfs is built aside (in /dev/shm, outside every covered folder), the kept paths are
    bind-mounted into it, and then it is moved over ``folder`` in one step.
    """
    stage = tempfile.mkdtemp(prefix="mmdist-node-", dir="/dev/shm")
    _mount("-t", "tmpfs", "-o", f"mode={mode}", "tmpfs", stage)
    for path in keep:
        if path == folder or path.startswith(folder.rstrip("/") + "/"):
            target = stage + path[len(folder.rstrip("/")):]
            os.makedirs(target, exist_ok=True)
            _mount("--bind", path, target)
    _mount("--move", stage, folder)
    os.rmdir(stage)


def _node_main(scratch: str, credentials: str | None, command: list[str]) -> None:
    """Make this namespace's home and scratch private, install its credentials, exec ``command``."""
    creds = open(credentials).read() if credentials else None
    home = os.path.realpath(os.path.expanduser("~"))
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    keep = sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, here)})
    covered: list[str] = []
    scratch = os.path.realpath(scratch)
    for folder in sorted({home, scratch}):
        if not any(folder.startswith(c.rstrip("/") + "/") for c in covered):
            _private(folder, keep, "1777" if folder == scratch else "0700")
            covered.append(folder)
    if creds:
        os.makedirs(os.path.join(home, ".aws"), mode=0o700, exist_ok=True)
        with open(os.path.join(home, ".aws", "credentials"), "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(creds)
    os.execv(command[0], command)


def main(argv: list[str] | None = None) -> int:
    """Start a head and worker nodes, print how to reach them, stop them all on Ctrl-C."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_node"]:  # `_node [options] -- command...`, run by add_worker inside unshare
        sep = argv.index("--")
        p = argparse.ArgumentParser()
        p.add_argument("--scratch", required=True)
        p.add_argument("--credentials")
        a = p.parse_args(argv[1:sep])
        _node_main(a.scratch, a.credentials, argv[sep + 1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2, help="worker nodes")
    p.add_argument("--cpus", type=int, default=2, help="logical CPUs per worker node")
    p.add_argument("--credentials", help="an AWS credentials file every node gets as its own")
    p.add_argument("--base-dir", help="where logs and the head's session go (default: a new temp folder)")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("local_cluster: worker nodes need their own mount namespace: run as root", file=sys.stderr)
        return 2
    if not shutil.which("unshare"):
        print("local_cluster: unshare (util-linux) is not installed", file=sys.stderr)
        return 2
    with LocalCluster(a.base_dir, credentials=a.credentials) as cluster:
        cluster.start_head()
        for _ in range(a.workers):
            cluster.add_worker(cpus=a.cpus, wait=False)
        cluster.wait_for_nodes()
        print(f"head: {cluster.gcs_address}  job server: {cluster.dashboard_url}  logs: {cluster.base_dir}")
        print(f"worker nodes: {', '.join(n.ip for n in cluster.workers)} ({a.cpus} CPUs each); Ctrl-C stops them")
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
