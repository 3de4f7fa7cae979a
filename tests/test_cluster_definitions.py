"""cluster/: the launcher YAMLs pass Ray's own schema validator, the KubeRay manifests have the
structure KubeRay needs, identities and exposure are as documented, and a node whose GPU driver
cannot run the image's torch refuses to join."""

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "cluster")
LAUNCHER = ("aws.yaml", "gcp.yaml")
KUBERAY = ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml")


def _load(name):
    with open(os.path.join(CLUSTER, name)) as f:
        return yaml.safe_load(f)


def _docs(name):
    with open(os.path.join(CLUSTER, name)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def _image():
    """The image cluster/Dockerfile builds, as every definition names it."""
    return _load("aws.yaml")["docker"]["image"]


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_yaml_passes_rays_schema_validator(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_load(name)))  # raises on any unknown or malformed field
    broken = _load(name)
    broken["available_node_types"]["head"]["node_config_typo"] = {}
    with pytest.raises(Exception, match="node_config_typo"):
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_nodes_boot_the_baked_image_with_the_dashboard_private(name):
    cfg = _load(name)
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # drivers only
    assert not cfg.get("setup_commands") and not cfg.get("head_setup_commands")  # nothing pip-installed at boot
    assert cfg["docker"]["image"] == _image() and "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in yaml.safe_dump(cfg)
    assert "check_gpu.py" in start and all("check_gpu.py" in c for c in cfg["worker_start_ray_commands"][1:])
    assert cfg["file_mounts"] == {"/home/ray/.ray/auth_token": "~/.ray/auth_token"}
    for node_type in cfg["available_node_types"].values():
        assert "latest_dlami" not in yaml.safe_dump(node_type)  # resolved to CUDA 11.2 on Ubuntu 18.04


def test_aws_autoscaler_role_is_separate_from_the_workers_storage_role():
    cfg = _load("aws.yaml")
    profiles = {k: t["node_config"]["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1]
                for k, t in cfg["available_node_types"].items()}
    assert profiles.pop("head") == "mmdist-head" and set(profiles.values()) == {"mmdist-worker"}
    head = json.load(open(os.path.join(CLUSTER, "iam", "mmdist-head.json")))["Statement"]
    worker = json.load(open(os.path.join(CLUSTER, "iam", "mmdist-worker.json")))["Statement"]
    head_actions = {a for s in head for a in s["Action"]}
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateTags", "iam:PassRole"} <= head_actions
    pass_role = next(s for s in head if "iam:PassRole" in s["Action"])
    assert all(r.endswith("/mmdist-worker") for r in pass_role["Resource"])  # it hands out the worker role only
    assert all(a.startswith("s3:") for s in worker for a in s["Action"])  # workers cannot launch or pass roles


def test_gcp_autoscaler_account_is_separate_from_the_workers():
    cfg = _load("gcp.yaml")
    accounts = {k: t["node_config"]["serviceAccounts"][0]["email"].split("@")[0]
                for k, t in cfg["available_node_types"].items()}
    assert accounts.pop("head") == "mmdist-head" and set(accounts.values()) == {"mmdist-worker"}


def _kuberay_version_stated(name):
    text = open(os.path.join(CLUSTER, name)).read()
    found = re.search(r"KubeRay operator >= (\d+)\.(\d+)", text)
    return tuple(int(x) for x in found.groups()) if found else None


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifest_structure(name):
    import ray

    docs = _docs(name)
    custom = [d for d in docs if d["apiVersion"] == "ray.io/v1"]
    assert len(custom) == 1 and custom[0]["kind"] in ("RayCluster", "RayJob")
    spec = custom[0]["spec"]
    cluster = spec if custom[0]["kind"] == "RayCluster" else spec["rayClusterSpec"]
    if custom[0]["kind"] == "RayJob":
        assert re.match(r"python -m jobs\.\w+", spec["entrypoint"])
        module = spec["entrypoint"].split()[2].split(".")[1]
        assert os.path.exists(os.path.join(ROOT, "jobs", f"{module}.py"))
        assert spec["shutdownAfterJobFinishes"] is True and "backoffLimit" in spec
        assert _kuberay_version_stated(name) >= (1, 2)  # backoffLimit exists from KubeRay 1.2
    assert cluster["rayVersion"] == ray.__version__  # the client that submits must match the cluster
    assert cluster["authOptions"] == {"mode": "token"} and _kuberay_version_stated(name) >= (1, 5)
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    pods = [head["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    assert {c["image"] for p in pods for c in p["containers"] + p.get("initContainers", [])} == {_image()}
    assert head["template"]["spec"]["serviceAccountName"] == "mmdist-head"
    for group in cluster["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] == "mmdist-worker"
        ray_container = pod["containers"][0]
        assert ray_container["resources"]["limits"] == ray_container["resources"]["requests"]
        gpus = ray_container["resources"]["limits"].get("nvidia.com/gpu")
        if gpus:
            check = pod["initContainers"][0]
            assert check["command"][-1].endswith("check_gpu.py")
            assert check["resources"]["limits"]["nvidia.com/gpu"] == gpus


def test_kuberay_autoscaler_permissions_go_to_the_head_account_only():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _docs("kuberay-raycluster.yaml")}
    cluster = docs[("RayCluster", "mmdist")]["spec"]
    assert cluster["enableInTreeAutoscaling"] is True
    binding = docs[("RoleBinding", "mmdist-autoscaler")]
    assert [s["name"] for s in binding["subjects"]] == ["mmdist-head"]
    role = docs[("Role", binding["roleRef"]["name"])]
    granted = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert granted == {("", "pods"), ("ray.io", "rayclusters")}
    assert ("ServiceAccount", "mmdist-worker") in docs and ("ServiceAccount", "mmdist-head") in docs


def test_dockerfile_bakes_the_package_on_the_clients_ray():
    import ray

    text = open(os.path.join(CLUSTER, "Dockerfile")).read()
    assert f"ARG RAY_VERSION={ray.__version__}" in text and "FROM rayproject/ray:${RAY_VERSION}" in text
    assert re.search(r"ARG TORCH_CUDA=cu\d+", text)  # torch is built for a named CUDA, matched to the driver
    assert "COPY --chown=ray cluster /home/ray/mmdist/cluster" in text  # check_gpu.py, which the nodes run
    assert ".venv" in open(os.path.join(CLUSTER, "Dockerfile.dockerignore")).read()


def _fake_nvidia_smi(folder, driver):
    path = folder / "nvidia-smi"
    path.write_text(f"#!/bin/sh\necho {driver}\n")
    path.chmod(0o755)
    return str(folder)


def test_check_gpu_refuses_a_node_whose_driver_cannot_run_torch(tmp_path):
    import torch

    script = os.path.join(CLUSTER, "check_gpu.py")
    env = {**os.environ, "PATH": _fake_nvidia_smi(tmp_path, "470.57.02") + os.pathsep + os.environ["PATH"]}
    out = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=300)
    if torch.cuda.is_available():  # a real GPU here: the check passes whatever the fake says
        assert out.returncode == 0, out.stderr
        return
    assert out.returncode == 1
    assert "driver 470.57.02" in out.stderr and f"CUDA {torch.version.cuda}" in out.stderr
    no_gpu = subprocess.run([sys.executable, script], env={**os.environ, "PATH": os.path.dirname(sys.executable)},
                            capture_output=True, text=True, timeout=300)
    assert no_gpu.returncode == 0 and "no NVIDIA GPU" in no_gpu.stdout
