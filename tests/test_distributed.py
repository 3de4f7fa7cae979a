"""Ray Train: 2 DDP workers behave like one process with the global batch; a killed worker resumes."""

import dataclasses
import json
import os
import signal
import threading
import time

import pytest
import torch
from safetensors.torch import load_file


def test_two_workers_equal_one_process_with_the_global_batch(ray_cluster, tmp_path):
    import ray.train
    from ddp_worker import batches, minimax_worker
    from ray.train.torch import TorchTrainer

    from mmdist.models.minimax import MinimaxObjective

    config = {"classes": 3, "dim": 16, "memory": 4, "global_batch": 8, "steps": 6}
    trainer = TorchTrainer(
        minimax_worker, train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name="equiv", storage_path=str(tmp_path)),
    )
    result = trainer.fit()
    # rank 0's checkpoint is the one Ray keeps; every rank's values and memories must agree with it
    with result.checkpoint.as_directory() as d:
        ranks = {f: load_file(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors")}
    assert ranks, "no rank reported"
    single = MinimaxObjective(3, 16, memory_size=4, lambda_rep=0.5, lambda_div=0.5, center=None)
    values, grads = [], []
    for labels, pred, real in batches(6, 8, 3, 16):
        p = pred.clone().requires_grad_()
        out = single(p, real, labels)
        out.loss.backward()
        values.append(out.loss.item())
        grads.append(p.grad)
    for got in ranks.values():
        assert torch.allclose(got["values"], torch.tensor(values), atol=1e-6)
        assert torch.allclose(got["grads"], torch.stack(grads), atol=1e-6)
        assert torch.equal(got["real"], single.real.buffer) and torch.equal(got["pred"], single.pred.buffer)


@pytest.mark.fault
def test_killed_worker_resumes_from_its_checkpoint_and_finishes(smoke_run, tmp_path):
    """SIGKILL the training worker mid fine-tune: Ray Train restarts it from the last checkpoint."""
    import ray
    from ray.util.state import list_actors

    from mmdist import finetune
    from mmdist.models import diffusion

    cfg, _ = smoke_run
    root = tmp_path / "run"
    import shutil

    for stage in ("latents", "pretrain"):
        shutil.copytree(os.path.join(cfg.output, stage), root / stage, ignore=shutil.ignore_patterns("ray"))
    cfg = dataclasses.replace(cfg, output=str(root), finetune=dataclasses.replace(
        cfg.finetune, steps=40, checkpoint_every=5, log_every=5))
    errors, out = [], {}
    worker = threading.Thread(target=lambda: _run(errors, out, finetune.main, cfg))
    worker.start()
    ckpts = root / "finetune" / "minimax" / "ray"
    deadline = time.time() + 180
    # kill once Ray Train's controller has registered a checkpoint (its snapshot names one): a
    # checkpoint written but not yet registered is not restored, and the run would start over
    while time.time() < deadline and not _registered_checkpoint(ckpts):
        time.sleep(0.05)
    assert _registered_checkpoint(ckpts), "no checkpoint was registered"
    address = ray.get_runtime_context().gcs_address
    victims = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    # the state API can still list an earlier test's worker as ALIVE: kill the newest live process
    live = [a.pid for a in victims if os.path.exists(f"/proc/{a.pid}")]
    os.kill(max(live, key=_start_ticks), signal.SIGKILL)
    worker.join(timeout=400)
    assert not errors, errors
    m = out["manifest"]["variants"]["minimax"]
    m = {**m, **json.loads((root / "finetune" / "minimax" / "manifest.json").read_text())}
    assert m["steps"] == 40
    assert m["resumed_at"] and 0 < m["resumed_at"][0] < 40 and m["resumed_at"][0] % 5 == 0
    steps = [h["step"] for h in m["history"]]
    assert steps == sorted(steps) and steps[-1] == 40  # the count continued, it did not restart
    model = diffusion.load_dit(str(root / "finetune" / "minimax" / "model_ema"))
    assert diffusion.num_classes_of(model) == 2


def _run(errors, out, fn, *args):
    try:
        out["manifest"] = fn(*args)
    except Exception as e:
        errors.append(e)


def _start_ticks(pid: int) -> int:
    """When a process started, in clock ticks since boot (/proc/<pid>/stat, field 22)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def _registered_checkpoint(ray_dir) -> bool:
    """Whether Ray Train's checkpoint manager snapshot under ``ray_dir`` names a latest checkpoint."""
    for snapshot in ray_dir.glob("*/checkpoint_manager_snapshot.json"):
        try:
            state = json.loads(snapshot.read_text())
        except (OSError, ValueError):  # being written
            continue
        if state.get("latest_checkpoint_result"):
            return True
    return False
