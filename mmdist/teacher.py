"""The teacher: a classifier of the real data that gives soft labels and scores distilled sets.

Either ``evaluate.teacher`` (a folder made by mmdist, or a weights file: .safetensors, or a
torchvision/timm state dict loaded with ``weights_only``), checked against the data's classes
before any trial starts, or one trained here on the real train split as a Ray task and cached
under ``<output>/teacher/`` keyed by architecture, resolution, epochs and the data. The one the
embedded default would train ships under that key in ``mmdist/assets/teachers/`` (with the
command that made it), so ``mmdist run`` loads it instead.
"""

from __future__ import annotations

import io
import logging
import math
import os
from typing import Any

import numpy as np
import torch

from mmdist import artifacts, datasets, protocols, schema, storage
from mmdist.config import Config
from mmdist.errors import DataError
from mmdist.models import classifiers

log = logging.getLogger("mmdist")


def build_model(state: dict[str, Any], channels: int, num_classes: int, res: int) -> torch.nn.Module:
    """Rebuild a teacher from its architecture name and weights (strict: every tensor must fit)."""
    model = classifiers.create(state["arch"], in_channels=channels, num_classes=num_classes, image_size=res)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state["weights"].items()})
    return model.eval()


TEACHER_FILES = (".safetensors", ".pth", ".pt", ".bin")
# teachers trained by ``teacher_state`` and shipped, each in the folder its cache key names
SHIPPED_TEACHERS = os.path.join(os.path.dirname(__file__), "assets", "teachers")


def _load_weights(uri: str) -> dict[str, np.ndarray]:
    """A state dict from a .safetensors file, or a torchvision/timm .pth (tensors only: weights_only)."""
    from safetensors.numpy import load as load_tensors

    data = storage.read_bytes(uri)
    if uri.endswith(".safetensors"):
        return load_tensors(data)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any unpickling refusal or corrupt file)
        raise DataError(f"evaluate.teacher: {uri} is not a readable state dict ({type(e).__name__})") from None
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise DataError(f"evaluate.teacher: {uri} holds no state dict of tensors")
    return {k.removeprefix("module."): v.numpy() for k, v in state.items()}


def check_teacher(cfg: Config) -> dict[str, Any]:
    """Load ``evaluate.teacher`` and check that it is a ``teacher_arch`` classifier of the data's classes.

    Raises a one-line DataError before any trial starts; returns the teacher state.
    """
    e = cfg.evaluate
    classes = cfg.data.classes or datasets.index_split(cfg.data, "train").classes
    res = e.resolution or cfg.data.image_size
    if e.teacher.endswith(TEACHER_FILES):
        if not storage.exists(e.teacher):
            raise DataError(f"evaluate.teacher: {e.teacher} does not exist")
        state = {"arch": e.teacher_arch, "weights": _load_weights(e.teacher), "key": e.teacher, "test_acc": None}
    else:
        manifest = storage.join(e.teacher, schema.MANIFEST)
        if not storage.exists(manifest):
            raise DataError(f"evaluate.teacher: {e.teacher} is neither a teacher folder made by mmdist (no "
                            f"{schema.MANIFEST}) nor a weights file ({', '.join(TEACHER_FILES)})")
        meta = storage.read_json(manifest)
        state = {"arch": meta["arch"], "weights": _load_weights(storage.join(e.teacher, "model.safetensors")),
                 "key": e.teacher, "test_acc": meta.get("test_acc")}
    try:
        build_model(state, cfg.data.channels, len(classes), res)
    except (RuntimeError, KeyError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:200]
        raise DataError(f"evaluate.teacher: {e.teacher} is not a {state['arch']} classifier of the data's "
                        f"{len(classes)} classes at {res} px ({first})") from None
    return state


def teacher_cache(cfg: Config, res: int) -> str:
    """Where a teacher trained for ``cfg`` is cached, keyed by what it learns from: architecture,
    resolution, epochs and the data."""
    e = cfg.evaluate
    return storage.join(cfg.output, "teacher", f"{e.teacher_arch.replace(':', '_')}-{res}px-{e.teacher_epochs}ep-"
                                               f"{cfg.fingerprint('data')[:8]}")


def teacher_state(cfg: Config, test: tuple[np.ndarray, np.ndarray], res: int) -> dict[str, Any]:
    """``evaluate.teacher``, or one trained on the real train split (cached under <output>/teacher)."""
    from safetensors.numpy import load as load_tensors
    from safetensors.numpy import save as save_tensors

    e = cfg.evaluate
    if e.teacher:
        return check_teacher(cfg)
    folder = teacher_cache(cfg, res)
    weights_uri = storage.join(folder, "model.safetensors")
    # the cache first, then the teachers shipped with the package: the one this config would train,
    # trained once (the embedded default's, so that `mmdist run` does not spend minutes on it)
    for where in (folder, os.path.join(SHIPPED_TEACHERS, folder.rstrip("/").rsplit("/", 1)[-1])):
        if storage.exists(storage.join(where, schema.MANIFEST)):
            meta = storage.read_json(storage.join(where, schema.MANIFEST))
            if where != folder:
                log.info("evaluate: the shipped %s teacher of this data (%s)", meta["arch"], where)
            return {"arch": meta["arch"], "key": where, "test_acc": meta.get("test_acc"),
                    "weights": load_tensors(storage.read_bytes(storage.join(where, "model.safetensors")))}
    import ray

    from mmdist import ray_runtime

    log.info("evaluate: training a %s teacher on the real train split (%d epochs)", e.teacher_arch, e.teacher_epochs)
    train = datasets.index_split(cfg.data, "train")
    x, y = datasets.load_images(cfg.data, train.items, "train")
    cpus = max(1.0, ray_runtime.node_cpus() - 0.25)  # one task: it must fit on one node
    task = ray.remote(_train_teacher).options(num_cpus=cpus, num_gpus=e.gpus_per_trial, scheduling_strategy="DEFAULT")
    threads = math.ceil(cpus)  # the only task running: all of the node's cores
    state, acc = ray.get(task.remote(e.teacher_arch, x, y, test[0], test[1], res, e.teacher_epochs, threads))
    storage.write_bytes(weights_uri, save_tensors(state))
    storage.write_json(storage.join(folder, schema.CONFIG), {"config": cfg.to_dict(), "git_sha": artifacts.git_sha()})
    storage.write_json(storage.join(folder, schema.MANIFEST), {"kind": "teacher", "arch": e.teacher_arch,
                                                               "test_acc": acc, "resolution": res,
                                                               "split": e.split})
    log.info("evaluate: teacher %s accuracy %.2f%%", e.split, acc)
    return {"arch": e.teacher_arch, "weights": state, "key": folder, "test_acc": acc}


def teacher_note(teacher: dict[str, Any] | None) -> str:
    """Which teacher the diagnostics used (None: every set was diagnosed by an earlier run)."""
    if teacher is None:
        return "teacher: as when first diagnosed"
    acc = f", {teacher['test_acc']:.2f} % on the evaluation split" if teacher.get("test_acc") is not None else ""
    return f"teacher: {teacher['arch']} ({teacher['key']}{acc})"


def _train_teacher(arch: str, x: np.ndarray, y: np.ndarray, tx: np.ndarray, ty: np.ndarray, res: int,
                   epochs: int, threads: int) -> tuple[dict[str, np.ndarray], float]:
    """Ray task body: train the teacher and return (weights, test accuracy)."""
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = classifiers.create(arch, in_channels=x.shape[1], num_classes=int(y.max()) + 1, image_size=res).to(device)
    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a)).to(device)  # Ray hands over read-only arrays

    from ray.experimental.tqdm_ray import tqdm

    bar = tqdm(total=epochs, desc=f"teacher {arch}", unit="epoch")  # the driver draws it, with its ETA
    acc = protocols.train_teacher(model, protocols.to_float(tensor(x), res), tensor(y),
                                  protocols.to_float(tensor(tx), res), tensor(ty), epochs=epochs,
                                  progress=lambda _: bar.update(1))
    bar.close()
    return {k: v.detach().cpu().contiguous().numpy() for k, v in model.state_dict().items()}, acc
