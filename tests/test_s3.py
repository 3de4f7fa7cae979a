"""Object storage end to end: ImageFolder on s3:// -> encode to s3:// -> fine-tune streaming from s3://
-> sample to s3://."""

import os

import numpy as np
from conftest import smoke_config
from helpers import image_folder, tiny_dit

from mmdist import encode, finetune, sample, schema, shards, storage
from mmdist.model_folders import local_folder
from mmdist.models import diffusion


def upload(local_root, uri):
    for dirpath, _, files in os.walk(local_root):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), local_root)
            storage.write_bytes(f"{uri}/{rel}", open(os.path.join(dirpath, f), "rb").read())


def test_encode_to_s3_and_finetune_from_it(ray_cluster, bucket, tmp_path):
    upload(image_folder(str(tmp_path / "train"), {"cat": 6, "dog": 5}, size=20), f"{bucket}/data/train")
    upload(image_folder(str(tmp_path / "test"), {"cat": 2, "dog": 2}, size=20), f"{bucket}/data/test")
    backbone = tiny_dit(str(tmp_path / "backbone"), classes=2, size=16, channels=1)
    cfg = smoke_config(f"{bucket}/run",
                       data={"source": "imagefolder", "train": f"{bucket}/data/train", "test": f"{bucket}/data/test",
                             "classes": None, "channels": 1, "image_size": 16, "max_per_class": None},
                       encode={"shard_rows": 4},
                       finetune={"backbone": backbone, "steps": 3, "checkpoint_every": 3})
    m = encode.main(cfg)
    assert m["counts"] == {"cat": 6, "dog": 5} and len(m["shards"]) == 3
    assert storage.exists(f"{bucket}/run/latents/{schema.MANIFEST}")
    back = shards.read_shard(f"{bucket}/run/latents/{m['shards'][0]}")
    assert back[schema.LATENT_MEAN].shape == (4, 1, 16, 16) and np.isfinite(back[schema.LATENT_MEAN]).all()
    # rows are shuffled across shards: each keeps its source (class/file) beside its class name
    assert [s.split("/")[0] for s in back[schema.SOURCE_ID]] == list(back[schema.CLASS_NAME])

    tuned = finetune.main(cfg)
    assert tuned["variants"]["minimax"]["steps"] == 3
    assert storage.read_json(f"{bucket}/run/finetune/minimax/{schema.MANIFEST}")["latents"] == f"{bucket}/run/latents"
    assert storage.exists(f"{bucket}/run/finetune/minimax/model_ema/config.json")
    assert storage.listdir(f"{bucket}/run/finetune/minimax/ray")  # Ray Train checkpoints went to S3 too
    model = diffusion.load_dit(local_folder(f"{bucket}/run/finetune/minimax/model_ema"))
    assert diffusion.num_classes_of(model) == 2

    # sampling on S3: a class folder absent at the start is written without a listing; one that an
    # earlier, larger run left images in is still cut to IPC
    storage.write_bytes(f"{bucket}/run/samples/minimax/images/dog/00009.png", b"an earlier run's image")
    assert "minimax" in sample.main(cfg)["variants"]
    ipc = cfg.sample.ipc
    assert storage.read_json(f"{bucket}/run/samples/minimax/{schema.MANIFEST}")["counts"] == {"cat": ipc, "dog": ipc}
    for name in ("cat", "dog"):
        assert storage.listdir(f"{bucket}/run/samples/minimax/images/{name}") == [f"{k:05d}.png" for k in range(ipc)]
