"""Ray Train: DDP training of the DiT over streamed latent shards (pretrain and finetune).

The driver (``fit``) reads the shards with Ray Data (file-level shuffle), checks them against the
model, and runs a ``TorchTrainer``; each worker rebuilds the typed config, the model and the
minimax memories, restores the latest checkpoint if there is one, and loops over its shard
calling ``training.train_step``. Memories are synchronised with all-gather through
``TorchCollective``, so N workers train like one process with the global batch.

Resume: the run's name includes the config fingerprint, and Ray Train resumes a run started
again with the same (storage_path, name) from its latest checkpoint, as it does after a worker
failure (``FailureConfig``).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch

from mmdist import artifacts, schema, storage, tracking, training
from mmdist.config import Config, TrainConfig
from mmdist.errors import ArtifactError, DataError
from mmdist.model_folders import backbone_ref, backbone_source, model_config, put_folder
from mmdist.models import diffusion
from mmdist.models.gaussian_diffusion import GaussianDiffusion
from mmdist.models.minimax import MinimaxObjective, SingleProcess
from mmdist.seeding import derive_seed

log = logging.getLogger("mmdist")


class TorchCollective:
    """all_gather over the DDP process group (gloo on CPU, NCCL on GPU), timed for the benchmark."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.seconds = 0.0  # wall time spent inside all_gather since the last read

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's tensor along dim 0 in rank order."""
        start = time.perf_counter()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._dist.all_gather(parts, tensor.contiguous())
        out = torch.cat(parts)
        self.seconds += time.perf_counter() - start
        return out


# ----------------------------------------------------------------------------------------------
# Model construction, shared by the workers and the driver's export
# ----------------------------------------------------------------------------------------------


def build_model(cfg: Config, stage: str, latents: dict[str, Any]) -> torch.nn.Module:
    """A fresh DiT (pretrain) or the pretrained backbone (finetune), loaded on this node."""
    if stage == "pretrain":
        c, h, _ = latents["latent_shape"]
        return diffusion.create_dit(cfg.pretrain.model, sample_size=h, in_channels=c,
                                    num_classes=max(latents["model_class_ids"]) + 1,
                                    learn_sigma=cfg.pretrain.learn_sigma)
    return diffusion.load_dit(*backbone_source(cfg))


def build_objective(cfg: Config, stage: str, latents: dict[str, Any], stats: dict[str, np.ndarray],
                    device: torch.device) -> MinimaxObjective | None:
    """The minimax objective for fine-tuning (None for pretraining or with both terms off)."""
    mm = cfg.finetune.minimax
    if stage != "finetune" or not mm.enabled:
        return None
    center = torch.from_numpy(stats["latent_mean"].copy()) if mm.center == "dataset_mean" else None
    return MinimaxObjective(
        len(latents["classes"]), int(np.prod(latents["latent_shape"])), memory_size=mm.memory_size,
        lambda_rep=mm.lambda_rep, lambda_div=mm.lambda_div, use_rep=mm.representativeness,
        use_div=mm.diversity, center=center, memory_dtype=mm.memory_dtype, device=device)


def train_config(cfg: Config, stage: str) -> TrainConfig:
    """The stage's section (pretrain or finetune)."""
    return cfg.pretrain if stage == "pretrain" else cfg.finetune


def trainable_set(cfg: Config, stage: str) -> str:
    """Pretraining trains everything; fine-tuning the configured set."""
    return "full" if stage == "pretrain" else cfg.finetune.trainable


# ----------------------------------------------------------------------------------------------
# The worker
# ----------------------------------------------------------------------------------------------


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train per-worker loop: restore, then train_step over the shard until ``steps``."""
    import ray.train
    import ray.train.torch

    cfg = Config.from_dict(loop_config["config"])
    if not log.handlers:  # a worker process has no handler for our INFO step lines; Ray forwards stderr
        log.addHandler(logging.StreamHandler())
        log.propagate = False
    log.setLevel(logging.INFO)
    stage, latents, stats = loop_config["stage"], loop_config["latents"], loop_config["stats"]
    tcfg = train_config(cfg, stage)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(loop_config["threads"])
    device = ray.train.torch.get_device()
    torch.manual_seed(derive_seed(tcfg.seed, stage, rank))

    model = build_model(cfg, stage, latents)
    objective = build_objective(cfg, stage, latents, stats, device)
    state = training.build_state(model, trainable=trainable_set(cfg, stage), lr=tcfg.lr,
                                 weight_decay=tcfg.weight_decay, objective=objective)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        _resume(state, checkpoint, rank)
        # a resumed rank draws fresh randomness that depends only on where it resumed
        torch.manual_seed(derive_seed(tcfg.seed, stage, rank, state.step))
    training.to_device(state, device)
    ddp_model = ray.train.torch.prepare_model(state.model, move_to_device=False) if world > 1 else state.model
    ctx = training.StepContext(
        diffusion=GaussianDiffusion(),
        class_ids=torch.tensor(latents["model_class_ids"], device=device),
        null_id=diffusion.num_classes_of(state.model),
        class_dropout=cfg.finetune.class_dropout if stage == "finetune" else cfg.pretrain.class_dropout,
        scaling_factor=latents["scaling_factor"], hflip=tcfg.hflip, ema_decay=tcfg.ema_decay,
        ema_warmup=tcfg.ema_warmup,
        autocast=tcfg.mixed_precision if device.type == "cuda" else "no",
    )
    collective = TorchCollective() if world > 1 else SingleProcess()
    tracker = tracking.TrainTracker(cfg, stage, loop_config["folder"], latents, loop_config["mlflow_uri"],
                                    device, state.step) if rank == 0 else None
    if tracker and state.step == 0:
        tracker.maybe_preview(state.model, state.ema, 0, last=False)  # where training starts from
    shard = ray.train.get_dataset_shard("train")
    local_batch = tcfg.global_batch_size // world
    # progress is the step line (with its ETA), not a tqdm_ray bar: a Train worker's bar outlives
    # the worker on the driver and reprints beside everything printed after it
    running: dict[str, list[float]] = {}
    tick = started = time.time()
    first = state.step
    cache = training.EpochCache()
    while state.step < tcfg.steps:
        epoch_seed = derive_seed(tcfg.seed, stage, rank, "epoch", state.step) % 2**31
        batches = cache.batches(local_batch, epoch_seed) if cache.ready else shard.iter_torch_batches(
            batch_size=local_batch, drop_last=False, device=device,
            local_shuffle_buffer_size=max(local_batch * 8, 256), local_shuffle_seed=epoch_seed)
        epoch_start = state.step
        for batch in batches:
            cache.add(batch)
            if len(batch[schema.LABEL]) < local_batch:  # the epoch's short last batch (drop_last)
                continue
            mean = batch[schema.LATENT_MEAN]
            std = batch.get(schema.LATENT_STD)
            step_start = time.perf_counter()
            metrics = training.train_step(state, ctx, mean, std, batch[schema.LABEL], ddp_model, collective)
            metrics["step_seconds"] = time.perf_counter() - step_start
            metrics["allgather_seconds"] = getattr(collective, "seconds", 0.0)
            if hasattr(collective, "seconds"):
                collective.seconds = 0.0
            for k, v in metrics.items():
                running.setdefault(k, []).append(v)
            last = state.step >= tcfg.steps
            if state.step % tcfg.log_every == 0 or last:
                row = {k: float(np.mean(v)) for k, v in running.items()}
                row["step"] = float(state.step)
                row["steps_per_second"] = len(running["loss"]) / max(time.time() - tick, 1e-9)
                state.history.append(row)
                running, tick = {}, time.time()
                if tracker:
                    left = (time.time() - started) / (state.step - first) * (tcfg.steps - state.step)
                    log.info("%s step %d/%d (%d%%, %dm%02ds left): %s", stage, state.step, tcfg.steps,
                             100 * state.step // tcfg.steps, left // 60, left % 60,
                             " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step"))
                    tracker.metrics(row, state.step)
            if tracker:
                tracker.maybe_preview(state.model, state.ema, state.step, last)
            if state.step % tcfg.checkpoint_every == 0 or last:
                if tracker:
                    tracker.flush()
                _report_checkpoint(state, rank, stage)
            if last:
                break
        if state.step == epoch_start:  # would loop forever
            raise DataError(f"{stage}: rank {rank}'s share of the latents holds fewer than one batch "
                            f"({local_batch} rows); lower {stage}.global_batch_size or use fewer workers")
        cache.epoch_done()
    if tracker:
        tracker.close()


def _resume(state: training.TrainState, latest: Any, rank: int) -> None:
    """Restore Ray Train's latest checkpoint or, if it is corrupt, the newest readable older one.

    A corrupt latest checkpoint (a truncated upload, a full disk) would otherwise fail every
    restart the same way and block the stage for good. Every rank sees the same folders, so all
    ranks fall back to the same checkpoint.
    """
    import posixpath

    import pyarrow.fs as pafs
    import ray.train

    fs, path = latest.filesystem, latest.path.rstrip("/")
    siblings = fs.get_file_info(pafs.FileSelector(posixpath.dirname(path)))
    older = sorted((i.path for i in siblings if i.type == pafs.FileType.Directory
                    and posixpath.basename(i.path).startswith("checkpoint_") and i.path < path), reverse=True)
    for folder in (path, *older):
        with ray.train.Checkpoint(folder, fs).as_directory() as local:
            try:
                training.load_checkpoint(state, local)
                return
            except training.CorruptCheckpoint as e:  # another model is an ArtifactError: not skipped
                if rank == 0:
                    log.warning("%s; resuming from an older checkpoint", e)
    if rank == 0:
        log.warning("no readable checkpoint: %s starts again from step 0", posixpath.dirname(path))


def _report_checkpoint(state: training.TrainState, rank: int, stage: str) -> None:
    """Rank 0 saves the state; every rank reports (report is a collective in Ray Train)."""
    import ray.train

    metrics = dict(state.history[-1]) if state.history else {"step": float(state.step)}
    if rank == 0:
        with tempfile.TemporaryDirectory() as folder:
            training.save_checkpoint(state, folder, {"stage": stage})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
    else:
        ray.train.report(metrics, checkpoint=None)


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------


def fit(cfg: Config, stage: str, fp: str, folder: str | None = None, labels: list[int] | None = None
        ) -> dict[str, Any]:
    """Train on the latent shards with Ray Train and export the model to ``folder`` (default: the
    stage's folder); returns manifest fields. ``labels``: train on only these classes (a phase of
    ``finetune.class_phases``, mmdist.phases), as if the data set held nothing else."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from mmdist import ray_runtime, ray_work

    tcfg = train_config(cfg, stage)
    latents_dir = artifacts.stage_dir(cfg, "encode")
    latents = artifacts.require(latents_dir, "encode")
    check_against_model(cfg, stage, latents)
    start_share = training.ema_start_share(tcfg.steps, tcfg.ema_decay, tcfg.ema_warmup)
    if start_share > 0.1:
        what = "random initialisation" if stage == "pretrain" else "backbone"
        log.warning("%s: after %d steps %.0f%% of the sampled EMA weights will still be the %s "
                    "(%s.ema_decay=%s without warm-up); set %s.ema_warmup=true or train longer",
                    stage, tcfg.steps, 100 * start_share, what, stage, tcfg.ema_decay, stage)
    from safetensors.numpy import load as load_tensors

    stats = load_tensors(storage.read_bytes(storage.join(latents_dir, schema.STATS)))
    folder = folder or artifacts.stage_dir(cfg, stage)
    mlflow_uri = tracking.mlflow_uri(cfg)
    ray_runtime.connect(cfg)
    workers = tcfg.num_workers
    cpus = ray_runtime.worker_cpus(tcfg.cpus_per_worker, workers)
    resources = {"CPU": cpus, **({"GPU": 1} if tcfg.use_gpu else {})}
    shard_uris = [storage.join(latents_dir, s) for s in latents["shards"]]
    fs, _ = storage.arrow_filesystem(shard_uris[0])
    columns = [schema.LATENT_MEAN, schema.LABEL] + ([] if latents["deterministic"] else [schema.LATENT_STD])
    paths = [storage.arrow_filesystem(u)[1] for u in shard_uris]
    # read tasks ask for a quarter CPU: at the default 1 CPU they starve behind the workers on a
    # small machine and training hangs silently (docs/ray-notes.md)
    # seeded file shuffle + preserved order: the same config gives the same batches (determinism)
    # (select_columns is pushed down into the Parquet read: the other columns are never fetched)
    dataset = ray.data.read_parquet(paths, filesystem=fs, num_cpus=0.25,
                                    shuffle=ray.data.FileShuffleConfig(seed=derive_seed(tcfg.seed, stage, "files"))
                                    ).select_columns(columns)
    if labels is not None:
        from mmdist import phases

        dataset, latents = phases.rows_of(dataset, labels), phases.view(latents, labels)
    storage_path = storage.join(folder, "ray")
    if not storage.is_remote(storage_path):
        storage_path = os.path.abspath(storage_path)
    start = time.time()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), "stage": stage, "latents": _slim(latents),
                           "stats": stats, "threads": ray_runtime.torch_threads(cpus), "mlflow_uri": mlflow_uri,
                           "folder": folder},
        # GPU workers pack onto few nodes (NCCL stays inside a machine); CPU workers spread, each
        # getting a node's cores to itself
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=tcfg.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy="PACK" if tcfg.use_gpu else "SPREAD"),
        run_config=ray.train.RunConfig(
            name=f"{stage}-{fp}", storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=tcfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        datasets={"train": dataset},
        dataset_config=ray.train.DataConfig(execution_options=_ordered()),
    )
    result = ray_work.off_main_thread(trainer.fit)
    wall = time.time() - start
    if result.checkpoint is None:
        raise ArtifactError(f"{stage}: training ended without a checkpoint ({result.error})")
    with result.checkpoint.as_directory() as ckpt:
        meta = export(cfg, stage, latents, ckpt, folder)
    return {"steps": meta["step"], "history": meta["history"], "resumed_at": meta.get("resumed_at", []),
            "final": meta["history"][-1] if meta["history"] else {},
            "wall_seconds": round(wall, 2), "accelerator_seconds": round(wall * workers * tcfg.use_gpu, 2),
            "num_workers": workers, "latents": latents_dir, "ema_start_share": round(start_share, 6),
            "classes": latents["classes"], "model_class_ids": latents["model_class_ids"]}


def _ordered() -> Any:
    """Ray Data execution options that keep block order (reproducible batches)."""
    from ray.data import ExecutionOptions

    options = ExecutionOptions()
    options.preserve_order = True
    return options


def _slim(latents: dict[str, Any]) -> dict[str, Any]:
    """The manifest fields workers need (not the whole resolved config)."""
    keys = ("latent_shape", "model_class_ids", "classes", "scaling_factor", "deterministic")
    return {k: latents[k] for k in keys}


def check_shards(latents_dir: str, latents: dict[str, Any]) -> None:
    """Every listed shard exists and has the manifest's latent shape (footers only)."""
    from mmdist.shards import read_shard_meta

    for rel in latents["shards"]:
        meta = read_shard_meta(storage.join(latents_dir, rel))
        if meta is None:
            raise ArtifactError(f"{latents_dir}: shard {rel} listed in the manifest is missing or unreadable")
        if meta["tensor_shape"] != list(latents["latent_shape"]):
            raise ArtifactError(f"{latents_dir}: shard {rel} has latent shape {meta['tensor_shape']}, "
                                f"the manifest says {latents['latent_shape']} (shards of mixed shapes)")


def check_against_model(cfg: Config, stage: str, latents: dict[str, Any]) -> None:
    """Refuse latents the model cannot train on, before any worker starts."""
    from mmdist.shards import check_latents

    check_shards(artifacts.stage_dir(cfg, "encode"), latents)
    if stage == "pretrain":
        check_latents(latents)
        size = diffusion.DIT_SIZES.get(cfg.pretrain.model)
        if size is None:
            raise ArtifactError(f"pretrain.model: unknown DiT size {cfg.pretrain.model!r}; "
                                f"choose from {sorted(diffusion.DIT_SIZES)}")
        if latents["latent_shape"][1] % size.patch_size:
            raise ArtifactError(f"latent size {latents['latent_shape'][1]} is not divisible by the patch size "
                                f"{size.patch_size} of {cfg.pretrain.model}")
        return
    conf = model_config(*backbone_ref(cfg))
    check_latents(latents, shape=(conf["in_channels"], conf["sample_size"], conf["sample_size"]),
                  num_model_classes=conf["num_embeds_ada_norm"], class_ids=latents["model_class_ids"])


def export(cfg: Config, stage: str, latents: dict[str, Any], ckpt: str, folder: str) -> dict[str, Any]:
    """Write model/ (raw) and model_ema/ (sampled by default) as diffusers folders."""
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(ckpt, training.STATE_FILE))
    import json

    with open(os.path.join(ckpt, training.META_FILE)) as f:
        meta = json.load(f)
    for prefix, name in (("param", "model"), ("ema", "model_ema")):
        model = build_model(cfg, stage, latents)
        diffusion.mark_trainable(model, trainable_set(cfg, stage))
        training.apply_weights(model, tensors, prefix)
        with tempfile.TemporaryDirectory() as tmp:
            diffusion.save_dit(model, tmp)
            put_folder(tmp, storage.join(folder, name))
    storage.write_json(storage.join(folder, "history.json"), meta["history"])
    return meta
