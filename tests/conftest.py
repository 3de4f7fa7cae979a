"""Shared fixtures: one local Ray cluster, one loopback S3 endpoint, one smoke run per session.

Everything here is real: a moto S3 server in server mode reached by the same s3fs/pyarrow code
that talks to AWS, a 2-CPU Ray cluster, and tiny models the tests build themselves.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SECRET = "mmdist-test-secret-7f3a9c"  # must never reach a log or an artifact (test_bad_input)
SESSION_TOKEN = "mmdist-test-session-token-51d0e2"  # temporary credentials carry one too
SECRETS = (SECRET, SESSION_TOKEN)

# The environment must be set before Ray starts: workers inherit it (S3 endpoint, auth, imports).
S3_PORT = _free_port()
os.environ.update({
    "RAY_AUTH_MODE": "disabled",
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": SECRET,
    "AWS_SESSION_TOKEN": SESSION_TOKEN,
    "AWS_DEFAULT_REGION": "us-east-1",
    "TQDM_MININTERVAL": "5",
    "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
})
sys.path.insert(0, TESTS)

FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 for the whole session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    yield os.environ["AWS_ENDPOINT_URL"]
    server.stop()


@pytest.fixture
def bucket(s3_server, request):
    """A fresh bucket per test; yields 's3://<name>'."""
    import s3fs

    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + f"-{os.getpid() % 1000}"
    fs = s3fs.S3FileSystem()
    fs.mkdir(name)
    yield f"s3://{name}"
    fs.rm(name, recursive=True)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local 2-CPU Ray cluster for the session, started the way mmdist starts one."""
    import ray

    from mmdist import ray_runtime
    from mmdist.config import RayConfig

    ray_runtime.init(RayConfig(num_cpus=2))
    yield
    ray.shutdown()


def smoke_config(output: str, **sections):
    """The smoke preset rooted at ``output``, with section overrides given as dicts."""
    from mmdist.config import Config, absolute_paths, from_dict, to_dict
    from mmdist.presets import smoke

    cfg = smoke(dataclasses.replace(Config(), output=output))
    if sections:
        raw = to_dict(cfg)
        for name, values in sections.items():
            if isinstance(values, dict):
                raw[name].update(values)
            else:
                raw[name] = values
        cfg = from_dict(Config, raw)
    return absolute_paths(cfg)


@pytest.fixture(scope="session")
def smoke_run(ray_cluster, tmp_path_factory):
    """The whole pipeline once on the smoke preset; tests inspect its artifacts."""
    from mmdist import run

    out = str(tmp_path_factory.mktemp("smoke"))
    cfg = smoke_config(out, evaluate={"methods": ["minimax", "diffusion", "random"], "ipcs": [1, 2]})
    results = run.main(cfg)
    return cfg, results


def fmnist_available() -> bool:
    """Whether the Debian Fashion-MNIST package is installed."""
    return os.path.exists(os.path.join(FMNIST, "train-labels-idx1-ubyte.gz"))
