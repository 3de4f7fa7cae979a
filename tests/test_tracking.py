"""Experiment tracking (issue 15): TensorBoard files, MLflow runs with step metrics and previews,
evaluation trials in MLflow, an unreachable store that costs nothing, previews that leave training alone."""

import glob
import logging
import os
import struct

import numpy as np
import pytest
import torch
from conftest import smoke_config
from test_training import batch, make_state

from mmdist import tracking, training
from mmdist.config import Config
from mmdist.models.diffusion import LatentEncoder


def _scalars(folder):
    """{tag: [(step, value)]} from the TensorBoard event files in ``folder`` (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos: pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12: pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_a_preview_leaves_the_training_trajectory_unchanged():
    """Sampling a preview between steps must not move the weights, the EMA or the RNG stream."""
    latents = {"classes": ["a", "b", "c"], "model_class_ids": [0, 1, 2], "latent_shape": [1, 16, 16],
               "scaling_factor": 1.0}
    cfg = Config.from_dict({"sample": {"steps": 3, "guidance_scale": 2.0}})
    runs = []
    for with_preview in (False, True):
        state, ctx = make_state(seed=3)
        torch.manual_seed(7)
        for i in range(4):
            training.train_step(state, ctx, *batch(i))
            if with_preview and i == 1:
                grids = tracking.preview(state.model, state.ema, LatentEncoder("identity"), cfg, latents,
                                         classes=3, per_class=2)
                assert set(grids) == {"ema", "raw"} and grids["ema"].dtype == np.uint8
                assert grids["ema"].shape == (3 * 66 + 2, 2 * 66 + 2, 3)  # 16 px shown at 64 px, 2-px gaps
                assert not np.array_equal(grids["ema"], grids["raw"])  # EMA 0.9 lags the raw weights
        runs.append(({n: p.detach().clone() for n, p in state.trainable.items()},
                     {n: t.clone() for n, t in state.ema.items()}))
    for n in runs[0][0]:
        assert torch.equal(runs[0][0][n], runs[1][0][n]), n
        assert torch.equal(runs[0][1][n], runs[1][1][n]), n


def test_an_unreachable_tracking_uri_is_one_warning_and_no_mlflow(tmp_path, caplog):
    pytest.importorskip("mlflow")
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = Config.from_dict({"output": str(tmp_path), "tracking": "mlflow", "tracking_uri": f"http://127.0.0.1:{port}"})
    with caplog.at_level(logging.WARNING, logger="mmdist"):
        assert tracking.mlflow_uri(cfg) is None
        assert tracking.mlflow_uri(cfg) is None  # asked again by the next stage: no second warning
    lines = [r.getMessage() for r in caplog.records if "tracking" in r.getMessage()]
    assert len(lines) == 1 and "cannot be used" in lines[0] and "\n" not in lines[0], lines


def test_finetune_and_evaluate_with_mlflow_leave_runs_curves_and_previews(smoke_run, tmp_path):
    """tracking=mlflow: one MLflow run with the step metrics and preview images per training stage,
    one per evaluation trial; TensorBoard curves and preview PNGs in the output either way."""
    pytest.importorskip("mlflow")
    import mlflow

    from mmdist import evaluate, finetune

    ref, _ = smoke_run
    out = str(tmp_path / "tracked")
    cfg = smoke_config(out, latents=os.path.join(ref.output, "latents"), tracking="mlflow", preview_every=1,
                       finetune={"backbone": os.path.join(ref.output, "pretrain", "model_ema")},
                       evaluate={"methods": ["random"], "ipcs": [2], "seeds": [0], "epochs": 2, "evals": 2})
    finetune.main(cfg)
    evaluate.main(cfg)

    curves = _scalars(os.path.join(out, "finetune", "minimax", "tensorboard"))  # the variant's folder
    assert [s for s, _ in curves["finetune/loss"]] == [1, 2] and all(np.isfinite(v) for _, v in curves["finetune/loss"])
    folder = os.path.join(out, "finetune", "minimax")
    previews = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "previews", "*.png")))
    assert previews == [f"step-{s:06d}-{k}.png" for s in (0, 1, 2) for k in ("ema", "raw")]

    client = mlflow.MlflowClient(f"sqlite:///{out}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id])
    tuned = [r for r in runs if r.data.tags.get("stage") == "finetune"]
    assert len(tuned) == 1 and tuned[0].data.params["finetune.steps"] == "2"
    assert [m.step for m in client.get_metric_history(tuned[0].info.run_id, "loss")] == [1, 2]
    images = client.list_artifacts(tuned[0].info.run_id, "images")
    assert sum(("preview_ema" in a.path and a.path.endswith(".png")) for a in images) == 3
    trials = [r for r in runs if r.data.tags.get("stage") == "evaluate"]
    assert len(trials) == 1 and "acc" in trials[0].data.metrics
