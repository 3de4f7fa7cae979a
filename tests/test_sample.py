"""Sampling: byte-identical for any number of actors, a killed actor redone, resume, bad input."""

import dataclasses
import hashlib
import os
import shutil
import signal
import threading
import time

import pytest
from helpers import tiny_dit

from mmdist import sample, schema
from mmdist.errors import ArtifactError, ConfigError


def _root(smoke_run, tmp_path, name, **sample_fields):
    """A copy of the smoke run's latents/pretrain/finetune with its own samples folder."""
    cfg, _ = smoke_run
    root = tmp_path / name
    for stage in ("latents", "pretrain", "finetune"):
        shutil.copytree(os.path.join(cfg.output, stage), root / stage, ignore=shutil.ignore_patterns("ray"))
    fields = {"ipc": 6, "steps": 12, "batch_size": 2, "baseline": False, **sample_fields}
    return dataclasses.replace(cfg, output=str(root), sample=dataclasses.replace(cfg.sample, **fields))


def _digest(folder):
    out = {}
    for dirpath, _, files in os.walk(os.path.join(folder, "images")):
        for f in files:
            path = os.path.join(dirpath, f)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def reference(smoke_run, tmp_path_factory):
    cfg = _root(smoke_run, tmp_path_factory.mktemp("ref"), "one", num_actors=1)
    sample.main(cfg)
    return cfg, _digest(os.path.join(cfg.output, "samples", "minimax"))


def test_one_and_two_actors_give_byte_identical_images(smoke_run, reference, tmp_path):
    _, want = reference
    cfg = _root(smoke_run, tmp_path, "two", num_actors=2)
    sample.main(cfg)
    assert len(want) == 12 and _digest(os.path.join(cfg.output, "samples", "minimax")) == want


@pytest.mark.fault
def test_a_killed_actor_is_replaced_and_its_class_redone(smoke_run, reference, tmp_path):
    import ray
    from ray.util.state import list_actors

    _, want = reference
    cfg = _root(smoke_run, tmp_path, "kill", num_actors=1)
    images = os.path.join(cfg.output, "samples", "minimax", "images")
    errors = []
    worker = threading.Thread(target=lambda: _catch(errors, sample.main, cfg))
    worker.start()
    deadline = time.time() + 120
    while time.time() < deadline and not any(files for _, _, files in os.walk(images)):
        time.sleep(0.02)
    actors = list_actors(address=ray.get_runtime_context().gcs_address,
                         filters=[("class_name", "=", "ClassSampler"), ("state", "=", "ALIVE")])
    assert actors, "no sampling actor to kill"
    os.kill(actors[0].pid, signal.SIGKILL)
    worker.join(timeout=300)
    assert not errors, errors
    got = _digest(os.path.join(cfg.output, "samples", "minimax"))
    assert got == want  # exactly IPC images per class, same bytes: nothing missing or duplicated


def test_rerun_redoes_only_unfinished_classes(smoke_run, reference, tmp_path):
    _, want = reference
    cfg = _root(smoke_run, tmp_path, "resume", num_actors=1)
    sample.main(cfg)
    folder = os.path.join(cfg.output, "samples", "minimax")
    markers = sorted(os.listdir(os.path.join(folder, "classes")))
    kept = os.path.join(folder, "classes", markers[0])
    stamp = os.path.getmtime(kept)
    os.remove(os.path.join(cfg.output, "samples", schema.MANIFEST))
    os.remove(os.path.join(folder, schema.MANIFEST))
    os.remove(os.path.join(folder, "classes", markers[1]))  # as if killed before publishing this class
    shutil.rmtree(os.path.join(folder, "images", markers[1][:-5]))
    time.sleep(0.05)
    sample.main(cfg)
    assert os.path.getmtime(kept) == stamp
    assert _digest(folder) == want


def test_unknown_class_name_is_refused(smoke_run, tmp_path):
    cfg = _root(smoke_run, tmp_path, "unknown", classes=("Sneaker",))
    with pytest.raises(ConfigError, match="unknown class 'Sneaker'"):
        sample.main(cfg)


def test_model_with_too_few_classes_is_refused(smoke_run, tmp_path):
    cfg = _root(smoke_run, tmp_path, "mismatch")
    target = os.path.join(cfg.output, "finetune", "minimax", "model_ema")
    shutil.rmtree(target)
    tiny_dit(target, classes=1)
    with pytest.raises(ArtifactError, match="has 1 classes"):
        sample.main(cfg)


def _catch(errors, fn, *args):
    try:
        fn(*args)
    except Exception as e:  # reported by the test thread
        errors.append(e)
