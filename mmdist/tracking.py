"""Experiment tracking: TensorBoard event files always, MLflow with ``tracking=mlflow``; preview grids.

Ray's integrations do the plumbing. Evaluation trials (Ray Tune) get TensorBoard event files from
Tune's default logger callbacks, in each trial's folder under <output>/eval/tune, and MLflow runs
from ``MLflowLoggerCallback``. In a Ray Train run (pretrain, finetune) rank 0 writes its step
metrics to a tensorboardX writer in <stage>/tensorboard and to the MLflow run that
``setup_mlflow`` opens, and every ``preview_every`` steps a small grid of samples from the EMA and
the raw weights (the same noise each time, one row per class) to <stage>/previews and both
trackers, as diffusers' training scripts do with ``--validation_*``. A tracker that fails (its
server gone, a disk full) warns once and stops: tracking never costs a run.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from mmdist import storage
from mmdist.config import Config, to_dict
from mmdist.errors import ConfigError
from mmdist.seeding import derive_seed

log = logging.getLogger("mmdist")
# MLflow retries a dead server for minutes by default; these answer in seconds
_FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


# ----------------------------------------------------------------------------------------------
# MLflow: where, and whether it answers (driver side, before Ray starts)
# ----------------------------------------------------------------------------------------------


def mlflow_uri(cfg: Config) -> str | None:
    """The run's MLflow tracking URI; None without ``tracking=mlflow`` or when MLflow cannot be reached."""
    if cfg.tracking != "mlflow":
        return None
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError("tracking=mlflow: MLflow is not installed (pip install 'mmdist[mlflow]')")
    if cfg.tracking_uri:
        return cfg.tracking_uri if _reachable(cfg.tracking_uri, cfg.name, None) else None
    if storage.is_remote(cfg.output):
        raise ConfigError("tracking=mlflow with an object-storage output needs tracking_uri (an MLflow server "
                          "or database that every node reaches)")
    store = os.path.join(os.path.abspath(cfg.output), "mlruns")
    os.makedirs(store, exist_ok=True)
    uri = "sqlite:///" + os.path.join(store, "mlflow.db")  # MLflow 3's local store (its file store is frozen)
    return uri if _reachable(uri, cfg.name, "file://" + os.path.join(store, "artifacts")) else None


@functools.lru_cache(maxsize=8)
def _reachable(uri: str, experiment: str, artifact_location: str | None) -> bool:
    """Whether MLflow answers at ``uri``, creating the experiment; one warning line if not (once per URI)."""
    import mlflow

    for name in ("mlflow", "alembic"):  # their INFO lines about database migrations
        logging.getLogger(name).setLevel(logging.WARNING)
    saved = {k: os.environ.get(k) for k in _FAIL_FAST}
    os.environ.update({k: saved[k] or v for k, v in _FAIL_FAST.items()})
    try:
        client = mlflow.MlflowClient(uri)
        if client.get_experiment_by_name(experiment) is None:
            client.create_experiment(experiment, artifact_location=artifact_location)
        return True
    except Exception as e:  # any failure to reach or use the store means: go on without it
        log.warning("tracking: MLflow at %s cannot be used (%s); the run goes on without MLflow", uri, _short(e))
        return False
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _short(e: BaseException) -> str:
    """An exception as one short line."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:120]}" if text else type(e).__name__


def tune_callbacks(cfg: Config, uri: str | None, stage: str) -> list[Any]:
    """Ray Tune logger callbacks beyond Tune's defaults (which already write TensorBoard files)."""
    if uri is None:
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return [MLflowLoggerCallback(tracking_uri=uri, experiment_name=cfg.name, tags={"stage": stage},
                                 save_artifact=False)]


def flat_params(cfg: Config) -> dict[str, Any]:
    """The config as dotted-name parameters (MLflow's run parameters)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix.rstrip(".")] = node

    walk(to_dict(cfg), "")
    return out


# ----------------------------------------------------------------------------------------------
# Rank 0 of a training run
# ----------------------------------------------------------------------------------------------


class TrainTracker:
    """Step metrics and preview grids of one Ray Train run, from rank 0, to TensorBoard and MLflow."""

    def __init__(self, cfg: Config, stage: str, folder: str, latents: dict[str, Any], mlflow_uri: str | None,
                 device: torch.device, start_step: int):
        from tensorboardX import SummaryWriter

        self.cfg, self.stage, self.folder, self.latents, self.device = cfg, stage, folder, latents, device
        self.tb_uri = storage.join(folder, "tensorboard")
        self.tb_dir = tempfile.mkdtemp(prefix="mmdist-tb-") if storage.is_remote(folder) else self.tb_uri
        # purge_step: a resumed run drops the events after its checkpoint that it is about to log again
        self.tb = SummaryWriter(self.tb_dir, purge_step=start_step + 1 if start_step else None)
        self.mlflow = None
        self.decoder = None
        if mlflow_uri:
            os.environ.update({k: os.environ.get(k) or v for k, v in _FAIL_FAST.items()})
            from ray.air.integrations.mlflow import setup_mlflow

            self.mlflow = self._guard(lambda: setup_mlflow(
                flat_params(cfg), tracking_uri=mlflow_uri, experiment_name=cfg.name,
                run_name=f"{cfg.name}-{stage}", create_experiment_if_not_exists=True,
                tags={"stage": stage, "output": cfg.output, "start_step": str(start_step)}))

    def _guard(self, call: Callable[[], Any]) -> Any:
        """Run an MLflow call; on failure warn once and stop using MLflow."""
        try:
            return call()
        except Exception as e:  # a tracker must never stop training
            if self.mlflow is not False:
                log.warning("tracking: MLflow failed (%s); training goes on without it", _short(e))
            self.mlflow = False
            return None

    def metrics(self, row: dict[str, float], step: int) -> None:
        """One logged row of step metrics (the step itself is the x axis, not a metric)."""
        values = {k: float(v) for k, v in row.items() if k != "step"}
        for key, value in values.items():
            self.tb.add_scalar(f"{self.stage}/{key}", value, step)
        if self.mlflow:
            self._guard(lambda: self.mlflow.log_metrics(values, step=step))

    def maybe_preview(self, model: torch.nn.Module, ema: dict[str, torch.Tensor], step: int, last: bool) -> None:
        """Every ``preview_every`` steps (and at the first and last): grids to previews/ and the trackers."""
        every = self.cfg.preview_every
        if not every or (step % every and not last) or self.decoder is False:
            return
        from mmdist.models.diffusion import LatentEncoder
        from mmdist.sample import png_bytes

        try:
            if self.decoder is None:
                s, e = self.cfg.sample, self.cfg.encode
                self.decoder = LatentEncoder(s.decoder or e.encoder, None if s.decoder else e.encoder_subfolder,
                                             self.latents["scaling_factor"], self.device)
            grids = preview(model, ema, self.decoder, self.cfg, self.latents)
        except Exception as e:  # previews must never stop training either
            log.warning("tracking: previews failed (%s); training goes on without them", _short(e))
            self.decoder = False
            return
        for kind, grid in grids.items():
            png = png_bytes(grid.transpose(2, 0, 1))
            storage.write_bytes(storage.join(self.folder, "previews", f"step-{step:06d}-{kind}.png"), png)
            self.tb.add_image(f"{self.stage}/preview_{kind}", grid, step, dataformats="HWC")
            if self.mlflow:
                self._guard(lambda g=grid, k=kind: self.mlflow.log_image(g, key=f"preview_{k}", step=step))

    def flush(self) -> None:
        """Write the event files out (copied to object storage when the output is remote)."""
        self.tb.flush()
        if self.tb_dir != self.tb_uri:
            for name in os.listdir(self.tb_dir):
                with open(os.path.join(self.tb_dir, name), "rb") as f:
                    storage.write_bytes(storage.join(self.tb_uri, name), f.read())

    def close(self) -> None:
        """Flush and end the MLflow run."""
        self.flush()
        self.tb.close()
        if self.mlflow:
            self._guard(self.mlflow.end_run)


# ----------------------------------------------------------------------------------------------
# Preview grids
# ----------------------------------------------------------------------------------------------


@contextmanager
def _weights(model: torch.nn.Module, weights: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """Temporarily load ``weights`` (name -> tensor) into the model's parameters."""
    if weights is None:
        yield
        return
    params = dict(model.named_parameters())
    saved = {name: params[name].detach().clone() for name in weights}
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


@torch.no_grad()
def preview(model: torch.nn.Module, ema: dict[str, torch.Tensor], decoder: Any, cfg: Config,
            latents: dict[str, Any], classes: int = 8, per_class: int = 4) -> dict[str, np.ndarray]:
    """Grids (uint8 [H, W, 3], one row per class) from the EMA and the raw weights, same noise each call.

    The sampler is the sampling stage's (scheduler, steps, guidance); the training RNG is untouched.
    """
    from torchvision.utils import make_grid

    from mmdist.models.sampler import sample_latents

    s = cfg.sample
    labels = range(min(classes, len(latents["classes"])))
    seeds = [derive_seed(s.seed, "preview", c, k) for c in labels for k in range(per_class)]
    ids = [latents["model_class_ids"][c] for c in labels for _ in range(per_class)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), _mode(model, was_training):
        for kind, weights in (("ema", ema), ("raw", None)):
            with _weights(model, weights):
                z = sample_latents(model, class_ids=ids, generators=[torch.Generator().manual_seed(x) for x in seeds],
                                   latent_shape=tuple(latents["latent_shape"]), scheduler=s.scheduler, steps=s.steps,
                                   guidance_scale=s.guidance_scale, guidance_channels=s.guidance_channels,
                                   autocast=s.mixed_precision)
            images = decoder.decode(z).cpu()
            scale = max(1, 64 // images.shape[-1])  # 28-px images are hard to see in a tracker
            images = images.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
            out[kind] = make_grid(images, nrow=per_class, padding=2, pad_value=255).permute(1, 2, 0).numpy()
    return out


@contextmanager
def _mode(model: torch.nn.Module, training: bool) -> Iterator[None]:
    """Put the model back in training mode (or not) however the block ends."""
    try:
        yield
    finally:
        model.train(training)

