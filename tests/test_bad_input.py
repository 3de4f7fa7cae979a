"""Bad input refused with a clear error, and what must never leak or escape (issue 8)."""

import glob
import os
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SECRET, smoke_config
from helpers import png, publish_finetune, tiny_dit

from mmdist import encode, finetune, sample, schema, shards, storage
from mmdist.distributed import check_shards
from mmdist.errors import ArtifactError

ODD_NAMES = ["../x", "a b", "ünï/ç"]  # a parent step, a space, unicode and a separator


def _latents_copy(smoke_run, tmp_path):
    cfg, _ = smoke_run
    folder = str(tmp_path / "latents")
    shutil.copytree(os.path.join(cfg.output, "latents"), folder)
    return folder, shards.load_manifest(folder, "encode")


def test_a_shard_of_another_shape_is_refused_before_training(smoke_run, tmp_path):
    folder, manifest = _latents_copy(smoke_run, tmp_path)
    shape = manifest["latent_shape"]
    other = [shape[0], shape[1] // 2, shape[2] // 2]  # e.g. a shard left by an encode at half the size
    target = os.path.join(folder, manifest["shards"][-1])
    good = shards.read_shard_meta(target)
    shards.write_shard(target, mean=np.zeros([3, *other], np.float32), std=None, labels=np.zeros(3, np.int64),
                       class_names=["T-shirt/top"] * 3, source_ids=["x:0", "x:1", "x:2"], meta=good)
    with pytest.raises(ArtifactError, match=re.escape(f"has latent shape {other}") + ".*mixed shapes"):
        check_shards(folder, manifest)


def test_a_listed_shard_that_is_missing_is_refused(smoke_run, tmp_path):
    folder, manifest = _latents_copy(smoke_run, tmp_path)
    os.remove(os.path.join(folder, manifest["shards"][0]))
    with pytest.raises(ArtifactError, match="listed in the manifest is missing"):
        check_shards(folder, manifest)


def test_a_backbone_of_another_size_is_refused_before_training(smoke_run, tmp_path):
    cfg, _ = smoke_run
    root = tmp_path / "run"
    shutil.copytree(os.path.join(cfg.output, "latents"), root / "latents")
    backbone = tiny_dit(str(tmp_path / "backbone"), classes=2, size=8, channels=1)  # latents are 16 px
    bad = smoke_config(str(root), finetune={"backbone": backbone})
    with pytest.raises(ArtifactError, match=r"latent shape \[1, 16, 16\] does not match the model's input \[1, 8, 8\]"):
        finetune.main(bad)


def test_path_like_class_names_stay_inside_the_output_root(ray_cluster, tmp_path):
    """Parquet source whose class names hold '..', spaces, unicode and '/': encode -> sample."""
    source = tmp_path / "source"
    source.mkdir()
    names = [n for n in ODD_NAMES for _ in range(4)]
    table = pa.table({schema.IMAGE_BYTES: [png(16, "L", seed=i) for i in range(len(names))],
                      schema.CLASS_NAME: names})
    pq.write_table(table, source / "train.parquet")
    pq.write_table(table.slice(0, len(names)), source / "test.parquet")
    out = tmp_path / "nest" / "out"  # "../x" from out/samples/... must not land in nest/ or above
    backbone = tiny_dit(str(tmp_path / "backbone"), classes=3, size=16, channels=1)
    cfg = smoke_config(str(out),
                       data={"source": "parquet", "train": str(source / "train.parquet"),
                             "test": str(source / "test.parquet"), "classes": None, "channels": 1,
                             "image_size": 16, "max_per_class": None},
                       sample={"ipc": 1, "steps": 2, "baseline": False})
    latents = encode.main(cfg)
    assert latents["classes"] == sorted(ODD_NAMES)
    publish_finetune(cfg, latents, backbone)  # the DiT as the fine-tuned model: names are what is tested
    made = sample.main(cfg)
    folder = out / "samples" / "minimax"
    markers = [storage.read_json(str(p)) for p in (folder / "classes").iterdir()]
    assert sorted(m["class"] for m in markers) == sorted(ODD_NAMES)  # the real names are kept
    for m in markers:
        assert m["folder"] == storage.safe_name(m["class"]) and "/" not in m["folder"] and ".." not in m["folder"]
        assert len(os.listdir(folder / "images" / m["folder"])) == 1
    root = os.path.realpath(out)
    written = [p for p in glob.glob(str(tmp_path / "**"), recursive=True) if os.path.isfile(p)]
    outside = [p for p in written if not os.path.realpath(p).startswith(root + os.sep)
               and not p.startswith((str(source), str(tmp_path / "backbone")))]
    assert not outside, outside
    assert made["classes"] == sorted(ODD_NAMES)


def test_no_secret_in_any_artifact_or_ray_log(smoke_run):
    """The AWS secret is in every process's environment (conftest); it must reach no file we write."""
    cfg, _ = smoke_run
    import ray

    session = ray._private.worker._global_node.get_session_dir_path()  # no public API gives the log folder
    places = [cfg.output, os.path.join(session, "logs")]
    scanned = 0
    for place in places:
        for dirpath, _, files in os.walk(place):
            for f in files:
                with open(os.path.join(dirpath, f), "rb") as fh:
                    assert SECRET.encode() not in fh.read(), os.path.join(dirpath, f)
                scanned += 1
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET and scanned > 50


def test_no_unsafe_deserialisation_in_the_package():
    """Weights and checkpoints are safetensors; any torch.load must be weights_only; no pickle at all."""
    package = os.path.join(os.path.dirname(__file__), "..", "mmdist")
    offenders = []
    for path in glob.glob(os.path.join(package, "**", "*.py"), recursive=True):
        text = open(path).read()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            if "weights_only=True" not in call:
                offenders.append((path, call))
        if re.search(r"^\s*(import pickle|from pickle|import dill|import cloudpickle)", text, re.M):
            offenders.append((path, "pickle import"))
    assert not offenders, offenders
