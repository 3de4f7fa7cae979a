"""A Ray Tune search over the minimax weights, memory size and guidance scale (`jobs.sweep`).

Each trial runs finetune -> sample -> evaluate into <output>/sweep/trial-<id>, sharing the base
run's encoded latents (``Config.latents``) and backbone, so nothing is encoded or pretrained twice.
Its objective is the accuracy on the *validation* split (``data.val_per_class`` train images per
class that nothing trains on; ``evaluate.split=val``): the mean over seeds of the best accuracy of
the minimax rows (averaged over archs and IPCs). Selecting on the test split would report an
optimistic number, so it is refused. Only the selected configuration is then evaluated on the
test split, and that is the number the sweep reports.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from mmdist import artifacts, run, storage
from mmdist.config import Config
from mmdist.errors import ConfigError

log = logging.getLogger("mmdist")

TRIAL_STAGES = ("finetune", "sample", "evaluate")


def with_params(cfg: Config, params: dict[str, Any]) -> Config:
    """``cfg`` with dotted fields set from a trial's params (e.g. finetune.minimax.lambda_rep)."""
    raw = cfg.to_dict()
    for key, value in params.items():
        node = raw
        *path, leaf = key.split(".")
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise ConfigError(f"sweep space: {key}: unknown field")
        node[leaf] = value.item() if hasattr(value, "item") else value  # numpy scalars from Tune
    return Config.from_dict(raw)


def objective(manifest: dict[str, Any]) -> float:
    """Mean best accuracy (%) of the minimax rows of an evaluate manifest."""
    means = [row["mean"] for row in manifest["rows"] if row["method"] == "minimax"]
    if not means:
        raise ConfigError("evaluate.methods: the sweep needs the minimax row")
    return sum(means) / len(means)


def shared_base(cfg: Config) -> Config:
    """Encode (and pretrain) once; trials read those artifacts and sample/evaluate only minimax."""
    shared = tuple(s for s in run.planned_stages(cfg) if s in ("encode", "pretrain"))
    if shared:
        run.main(cfg, stages=shared)
    backbone = cfg.finetune.backbone
    if backbone == "pretrain":
        backbone = storage.join(artifacts.stage_dir(cfg, "pretrain"), "model_ema")
    return dataclasses.replace(
        cfg, latents=artifacts.stage_dir(cfg, "encode"),
        finetune=dataclasses.replace(cfg.finetune, backbone=backbone),
        sample=dataclasses.replace(cfg.sample, baseline=False),
        evaluate=dataclasses.replace(cfg.evaluate, methods=("minimax",)))


def _stages(raw: dict[str, Any]) -> dict[str, Any]:
    """Ray task body: one trial's stages; returns the evaluate manifest."""
    return run.main(Config.from_dict(raw), stages=TRIAL_STAGES)["evaluate"]


def _trial(params: dict[str, Any], base: dict[str, Any], root: str) -> None:
    """Tune trainable: configure the trial, run its stages, report the accuracy."""
    import ray
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    cfg = dataclasses.replace(with_params(Config.from_dict(base), params),
                              output=storage.join(root, f"trial-{trial_id}"))
    # Tune captures child tasks in the trial's placement group, whose token resources could never
    # hold the stages' workers and actors: run them in a task scheduled outside it.
    task = ray.remote(_stages).options(num_cpus=0, scheduling_strategy="DEFAULT", max_retries=0)
    manifest = ray.get(task.remote(cfg.to_dict()))
    tune.report({"accuracy": objective(manifest), "output": cfg.output})


def main(cfg: Config, space: dict[str, Any], num_samples: int = 8,
         max_concurrent: int = 1) -> list[dict[str, Any]]:
    """Run the search; write <output>/sweep/results.json (best first) and return its rows.

    ``space`` maps dotted config fields to Tune domains (tune.loguniform, tune.choice, ...).
    ``max_concurrent`` trials run at once: each one's stages take the cluster's GPUs/CPUs.
    """
    from ray import tune

    from mmdist import ray_runtime, ray_work

    for key in space:
        getattr_dotted(cfg, key)  # a typo in the space fails here, not in every trial
    if cfg.evaluate.split != "val":
        raise ConfigError("evaluate.split: a sweep selects on the validation split; set evaluate.split=val and "
                          "data.val_per_class>0 (selecting on the test split reports an optimistic accuracy)")
    ray_runtime.connect(cfg)
    base = shared_base(cfg)
    root = storage.join(cfg.output, "sweep")
    storage_path = storage.join(root, "tune")
    if not storage.is_remote(storage_path):
        storage_path = os.path.abspath(storage_path)
    # The trial only waits on its stages: a CPU token would starve them on a small cluster (Ray
    # Data's file listing needs one whole free CPU), so it asks for a token amount of memory.
    trainable = tune.with_resources(tune.with_parameters(_trial, base=base.to_dict(), root=root),
                                    {"cpu": 0, "memory": 1})
    tuner = tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(metric="accuracy", mode="max", num_samples=num_samples,
                                    max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(name="sweep", storage_path=storage_path, verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=1)),
    )
    grid = ray_work.off_main_thread(tuner.fit)
    rows = sorted(({**r.config, "val_accuracy": r.metrics["accuracy"], "output": r.metrics["output"]}
                   for r in grid if r.error is None and r.metrics), key=lambda r: -r["val_accuracy"])
    errors = [r.error for r in grid if r.error is not None]
    if errors and not rows:
        raise errors[0]
    for row in rows:
        log.info("sweep: validation %.2f%%  %s", row["val_accuracy"], {k: v for k, v in row.items() if k in space})
    best = rows[0]
    selected = dataclasses.replace(with_params(base, {k: v for k, v in best.items() if k in space}),
                                   output=best["output"])
    selected = dataclasses.replace(selected, evaluate=dataclasses.replace(selected.evaluate, split="test"))
    best["test_accuracy"] = objective(run.main(selected, stages=("evaluate",))["evaluate"])
    log.info("sweep: the selected configuration scores %.2f%% on the test split", best["test_accuracy"])
    storage.write_json(storage.join(root, "results.json"), rows)
    return rows


def getattr_dotted(cfg: Config, key: str) -> Any:
    """The value of a dotted field, e.g. ``sample.guidance_scale``."""
    node: Any = cfg
    for part in key.split("."):
        if not hasattr(node, part):
            raise ConfigError(f"sweep space: {key}: unknown field")
        node = getattr(node, part)
    return node
