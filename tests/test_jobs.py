"""Every shipped job builds a valid config, and every cluster file is well-formed and can run them."""

import dataclasses
import importlib
import os
import shlex

import pytest
import yaml

from mmdist.config import Config, apply_overrides
from mmdist.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "jobs"))
              if f.endswith(".py") and f != "__init__.py")
CLUSTER = os.path.join(ROOT, "cluster")
CLUSTER_FILES = sorted(f for f in os.listdir(CLUSTER) if f.endswith((".yaml", ".yml")))
LAUNCHERS = [f for f in CLUSTER_FILES if not f.startswith("kuberay")]
KUBERAY = [f for f in CLUSTER_FILES if f.startswith("kuberay")]
PAPER_SUBSETS = ("imagewoof", "imagenette", "imageidc")


# ----------------------------------------------------------------------------------------------
# Jobs
# ----------------------------------------------------------------------------------------------


def test_the_issue_jobs_exist():
    assert {"fashion_mnist", "smoke", *PAPER_SUBSETS, "imagenet1k", "sweep"} <= set(JOBS)
    assert LAUNCHERS and KUBERAY


@pytest.mark.parametrize("name", JOBS)
def test_job_builds_a_valid_config(name):
    job = importlib.import_module(f"jobs.{name}")
    cfg = job.config()
    assert isinstance(cfg, Config)
    assert Config.from_dict(cfg.to_dict()) == cfg  # every section re-validated from scratch
    assert apply_overrides(cfg, []) == cfg
    if {"minimax", "diffusion"} & set(cfg.evaluate.methods):
        assert max(cfg.evaluate.ipcs) <= cfg.sample.ipc, "IPCs are subsets of one generation"


@pytest.mark.parametrize("name", JOBS)
def test_job_file_is_short_and_runs_as_a_module(name):
    text = open(os.path.join(ROOT, "jobs", f"{name}.py")).read()
    assert len(text.splitlines()) <= 60
    assert 'if __name__ == "__main__":' in text and "(config()" in text.split('if __name__ == "__main__":')[1]
    assert "def config() -> Config:" in text


@pytest.mark.parametrize("name", PAPER_SUBSETS)
def test_paper_recipe(name):
    from mmdist.imagenet import class_lists

    cfg = importlib.import_module(f"jobs.{name}").config()
    d, ft, mm, s, e = cfg.data, cfg.finetune, cfg.finetune.minimax, cfg.sample, cfg.evaluate
    assert (d.classes, d.model_class_ids) == class_lists(name)
    assert (d.source, d.channels, d.image_size) == ("imagefolder", 3, 256)
    assert cfg.encode.encoder == "stabilityai/sd-vae-ft-ema" and cfg.encode.encoder_subfolder is None
    assert (ft.backbone, ft.backbone_subfolder, ft.trainable) == (
        "facebook/DiT-XL-2-256", "transformer", "difffit")
    assert (ft.global_batch_size, ft.lr, ft.weight_decay, ft.steps, ft.ema_decay, ft.class_dropout) == (
        8, 1e-3, 0.0, 12000, 0.9999, 0.1)
    assert (mm.lambda_rep, mm.lambda_div, mm.memory_size, mm.center) == (0.002, 0.008, 64, "none")
    assert (s.ipc, s.scheduler, s.steps, s.guidance_scale, s.guidance_channels, s.use_ema) == (
        100, "ddpm", 50, 4.0, 3, True)
    assert s.decoder == "stabilityai/sd-vae-ft-mse"
    assert (e.protocol, e.archs, e.ipcs, e.seeds, e.epochs, e.resolution) == (
        "hard", ("convnet", "resnet_ap10", "resnet18"), (10, 20, 50, 70, 100), (0, 1, 2), None, 224)
    assert ft.use_gpu and cfg.encode.num_gpus_per_actor > 0 and s.num_gpus_per_actor > 0
    assert 0 < e.gpus_per_trial < 1


def test_imagenet1k_is_one_multi_node_run():
    cfg = importlib.import_module("jobs.imagenet1k").config()
    assert cfg.data.classes is None and cfg.data.model_class_ids is None  # all 1000, sorted = indices
    assert cfg.finetune.num_workers > 8 and cfg.finetune.use_gpu and cfg.finetune.global_batch_size > 8
    assert cfg.finetune.minimax.memory_dtype == "bfloat16" and cfg.finetune.mixed_precision == "bf16"
    assert cfg.sample.ipc == 50 and cfg.evaluate.ipcs == (10, 50)
    assert cfg.evaluate.protocol == "soft" and cfg.evaluate.archs == ("resnet18",)


def test_smoke_job_is_the_smoke_preset():
    from mmdist.presets import smoke

    expected = smoke(dataclasses.replace(Config(), output="runs/smoke"))
    assert importlib.import_module("jobs.smoke").config() == expected
    assert importlib.import_module("jobs.fashion_mnist").config().data == Config().data


@pytest.mark.parametrize("name", [*PAPER_SUBSETS, "imagenet1k", "sweep"])
def test_documented_overrides_resolve(name):
    cfg = importlib.import_module(f"jobs.{name}").config()
    out = apply_overrides(cfg, ["data.train=s3://b/imagenet/train", "data.test=s3://b/imagenet/val",
                                "output=s3://b/mmdist/x", "finetune.steps=10"])
    assert (out.data.train, out.data.test, out.output, out.finetune.steps) == (
        "s3://b/imagenet/train", "s3://b/imagenet/val", "s3://b/mmdist/x", 10)


# ----------------------------------------------------------------------------------------------
# Class lists and the sweep's pure parts
# ----------------------------------------------------------------------------------------------


def test_class_lists_match_the_imagenet_index():
    from timm.data import ImageNetInfo

    from mmdist.imagenet import SUBSETS

    info = ImageNetInfo()
    synsets = [info.index_to_label_name(i) for i in range(1000)]
    assert synsets == sorted(synsets)  # why imagenet1k can leave classes/model_class_ids at None
    for rows in SUBSETS.values():
        assert len(rows) == 10 and len({r[0] for r in rows}) == 10
        for wnid, index, _name in rows:
            assert synsets[index] == wnid


def test_sweep_space_and_objective():
    from ray import tune

    from jobs.sweep import SPACE
    from mmdist import sweep

    cfg = importlib.import_module("jobs.sweep").config()
    assert {"finetune.minimax.lambda_rep", "finetune.minimax.lambda_div", "finetune.minimax.memory_size",
            "sample.guidance_scale"} <= set(SPACE)
    import numpy as np

    params = {k: (v.sample() if isinstance(v, tune.search.sample.Domain) else v) for k, v in SPACE.items()}
    params["finetune.minimax.memory_size"] = np.int64(32)
    trial = sweep.with_params(cfg, params)
    assert trial.finetune.minimax.memory_size == 32
    assert trial.sample.guidance_scale == params["sample.guidance_scale"]
    with pytest.raises(ConfigError):
        sweep.with_params(cfg, {"finetune.minimax.lamda_rep": 0.1})
    with pytest.raises(ConfigError):
        sweep.getattr_dotted(cfg, "sample.guidance")
    rows = [{"method": "minimax", "mean": 40.0}, {"method": "random", "mean": 90.0},
            {"method": "minimax", "mean": 42.0}]
    assert sweep.objective({"rows": rows}) == 41.0


# ----------------------------------------------------------------------------------------------
# Cluster files
# ----------------------------------------------------------------------------------------------


def _load(name):
    with open(os.path.join(CLUSTER, name)) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    assert docs, name
    return docs


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_yaml(name):
    (cfg,) = _load(name)
    for key in ("cluster_name", "max_workers", "provider", "auth", "available_node_types", "head_node_type",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cfg, f"{name}: missing {key}"
    assert cfg["provider"]["type"] in ("aws", "gcp") and cfg["provider"].get("region")
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    for tname, t in types.items():
        assert "node_config" in t and "resources" in t, f"{name}: node type {tname}"
        if tname != cfg["head_node_type"]:
            assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"]
    assert sum(t["max_workers"] for n, t in types.items() if n != cfg["head_node_type"]) <= cfg["max_workers"]
    # mmdist comes in the node image (cluster/Dockerfile); nothing is pip-installed at boot
    assert cfg["docker"]["image"] and not any("pip install" in c for c in cfg["setup_commands"])
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    _can_run_every_job({n: t["resources"].get("GPU", 0) * t["max_workers"] for n, t in types.items()
                        if n != cfg["head_node_type"]}, name)
    if cfg["provider"]["type"] == "aws":  # S3 by instance role, never by keys
        assert all("IamInstanceProfile" in t["node_config"] for t in types.values())
    text = open(os.path.join(CLUSTER, name)).read()
    assert "AWS_SECRET_ACCESS_KEY" not in text and "aws_secret_access_key" not in text


def _container_gpus(template):
    return sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
               for c in template["spec"]["containers"])


def _check_raycluster_spec(spec, name):
    head = spec["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["image"], name
    assert "rayStartParams" in head
    groups = spec.get("workerGroupSpecs", [])
    names = [g["groupName"] for g in groups]
    assert len(names) == len(set(names)), f"{name}: duplicate worker groups"
    capacity = {}
    for g in groups:
        replicas = g.get("replicas", g["minReplicas"])
        assert 0 <= g["minReplicas"] <= replicas <= g["maxReplicas"], g["groupName"]
        assert "rayStartParams" in g and g["template"]["spec"]["containers"], g["groupName"]
        capacity[g["groupName"]] = _container_gpus(g["template"]) * g["maxReplicas"]
    return capacity


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifest(name):
    docs = _load(name)
    assert any(d["apiVersion"] == "ray.io/v1" for d in docs), name
    for doc in docs:
        if doc["apiVersion"] != "ray.io/v1":  # the service accounts and RBAC the pods run as
            assert doc["kind"] in ("ServiceAccount", "Role", "RoleBinding"), f"{name}: {doc['kind']}"
            continue
        assert doc["metadata"]["name"], name
        assert doc["kind"] in ("RayCluster", "RayJob"), name
        if doc["kind"] == "RayCluster":
            _can_run_every_job(_check_raycluster_spec(doc["spec"], name), name)
            continue
        spec = doc["spec"]
        capacity = _check_raycluster_spec(spec["rayClusterSpec"], name)
        argv = shlex.split(spec["entrypoint"])
        assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs."), spec["entrypoint"]
        assert argv[2][len("jobs."):] in JOBS, f"{name}: entrypoint names a job that does not exist"
        cfg = apply_overrides(importlib.import_module(argv[2]).config(), argv[3:])
        assert sum(capacity.values()) >= _gpus_needed(cfg), f"{name}: too few GPUs for {argv[2]}"
        assert "working_dir" in yaml.safe_load(spec["runtimeEnvYAML"])


def _gpus_needed(cfg):
    """The most GPUs any one stage of a job asks for at once."""
    ft = cfg.finetune.num_workers if cfg.finetune.use_gpu else 0
    return max(ft, cfg.encode.num_gpus_per_actor, cfg.sample.num_gpus_per_actor, cfg.evaluate.gpus_per_trial)


def _can_run_every_job(capacity, name):
    """A general-purpose cluster has enough GPUs for every shipped job's largest stage."""
    assert any(capacity.values()), f"{name}: no GPU node type"
    for job in JOBS:
        cfg = importlib.import_module(f"jobs.{job}").config()
        assert sum(capacity.values()) >= _gpus_needed(cfg), f"{name}: too few GPUs for jobs.{job}"
