"""Bad input refused with a clear error, and what must never leak or escape (issue 8)."""

import glob
import os
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SECRETS, smoke_config
from helpers import png, publish_finetune, tiny_dit

from mmdist import encode, finetune, sample, schema, shards, storage
from mmdist.distributed import check_shards
from mmdist.errors import ArtifactError

# names that would escape or collide: parent steps, an absolute path, 300 bytes, names equal on a
# case-insensitive disk, unicode with a separator, and a name crafted to equal another's safe form
ODD_NAMES = ["../../x", "/abs/evil", "a" * 300, "Cat", "cat", "a/b", storage.safe_name("a/b"), "ünï/ç"]


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
    backbone = tiny_dit(str(tmp_path / "backbone"), classes=len(ODD_NAMES), size=16, channels=1)
    cfg = smoke_config(str(out),
                       data={"source": "parquet", "train": str(source / "train.parquet"),
                             "test": str(source / "test.parquet"), "classes": None, "channels": 1,
                             "image_size": 16, "max_per_class": None},
                       sample={"ipc": 1, "steps": 2, "baseline": False}, evaluate={"ipcs": [1]})
    latents = encode.main(cfg)
    assert latents["classes"] == sorted(ODD_NAMES)
    publish_finetune(cfg, latents, backbone)  # the DiT as the fine-tuned model: names are what is tested
    made = sample.main(cfg)
    folder = out / "samples" / "minimax"
    markers = [storage.read_json(str(p)) for p in (folder / "classes").iterdir()]
    assert sorted(m["class"] for m in markers) == sorted(ODD_NAMES)  # the real names are kept
    folders = [m["folder"] for m in markers]
    assert len({f.casefold() for f in folders}) == len(ODD_NAMES)  # distinct on a case-insensitive disk too
    for m in markers:
        assert m["folder"] == storage.safe_name(m["class"]) and "/" not in m["folder"]
        assert m["folder"] not in (".", "..") and not m["folder"].startswith(".")
        assert len(m["folder"].encode()) <= 120  # file systems cap a name at 255 bytes
        assert len(os.listdir(folder / "images" / m["folder"])) == 1
    root = os.path.realpath(out)
    written = [p for p in glob.glob(str(tmp_path / "**"), recursive=True) if os.path.isfile(p)]
    outside = [p for p in written if not os.path.realpath(p).startswith(root + os.sep)
               and not p.startswith((str(source), str(tmp_path / "backbone")))]
    assert not outside, outside
    assert not os.path.exists("/abs/evil") and made["classes"] == sorted(ODD_NAMES)


def test_no_secret_in_any_artifact_or_ray_log(smoke_run):
    """The AWS secret key and session token are in every process's environment (conftest); they
    must reach no file we write: artifacts, config.json and manifests, Tune's trial folders, Ray's logs."""
    cfg, _ = smoke_run
    import ray

    session = ray._private.worker._global_node.get_session_dir_path()  # no public API gives the log folder
    places = [cfg.output, os.path.join(session, "logs")]
    scanned, tune = 0, 0
    for place in places:
        for dirpath, _, files in os.walk(place):
            for f in files:
                with open(os.path.join(dirpath, f), "rb") as fh:
                    data = fh.read()
                for secret in SECRETS:
                    assert secret.encode() not in data, os.path.join(dirpath, f)
                scanned += 1
                tune += "/eval/tune/" in dirpath
    assert all(os.environ[k] in SECRETS for k in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"))
    assert scanned > 50 and tune > 0  # Tune's trial folders were among them


def _pickle_bomb(marker: str) -> bytes:
    """A .bin whose unpickling creates ``marker`` (what a malicious checkpoint does)."""
    import pickle

    class Bomb:
        def __reduce__(self):
            return (open, (marker, "w"))

    return pickle.dumps({"weight": Bomb()})


@pytest.mark.parametrize("payload", ["state dict", "pickle bomb"])
def test_a_bin_backbone_or_vae_is_refused_and_never_unpickled(tmp_path, payload):
    """Safetensors only: a diffusers folder with a .bin instead is refused, not loaded (behaviour, not a grep)."""
    import torch

    from mmdist.models import diffusion

    folder = tiny_dit(str(tmp_path / "dit"))
    weights = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    state = {k: v for k, v in diffusion.load_dit(folder).state_dict().items()}
    os.remove(weights)
    marker = str(tmp_path / "unpickled")
    with open(os.path.join(folder, "diffusion_pytorch_model.bin"), "wb") as f:
        if payload == "state dict":
            torch.save(state, f)
        else:
            f.write(_pickle_bomb(marker))
    with pytest.raises(ArtifactError, match="cannot load the model from safetensors weights") as e:
        diffusion.load_dit(folder)
    assert "\n" not in str(e.value) and not os.path.exists(marker)
    with pytest.raises(ArtifactError, match="cannot load the model from safetensors weights"):
        diffusion.LatentEncoder(folder)  # the VAE loader: same rule
    assert not os.path.exists(marker)


def _tiny_vae(folder: str, gain: float) -> str:
    """A tiny AutoencoderKL whose latents are scaled by ``gain`` (1e6 overflows float16)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), layers_per_block=1,
                        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",))
    with torch.no_grad():
        vae.quant_conv.weight.mul_(gain)
        vae.quant_conv.bias.mul_(gain)
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize("dtype, dropped", [("float32", 0), ("float16", 3)])
def test_nonfinite_latents_are_dropped_and_counted(tmp_path, dtype, dropped):
    """Latents of 1e6 overflow to Inf in float16: each such row is dropped, listed and counted."""
    from helpers import image_folder

    from mmdist import datasets
    from mmdist.config import Config, DataConfig, EncodeConfig
    from mmdist.encode import ShardEncoder

    root = image_folder(str(tmp_path / "img"), {"c": 3}, size=16)
    vae = _tiny_vae(str(tmp_path / "vae"), gain=1e6)
    cfg = Config(data=DataConfig(source="imagefolder", train=root, channels=3, image_size=16),
                 encode=EncodeConfig(encoder=vae, scaling_factor=1.0, dtype=dtype))
    items = datasets.index_split(cfg.data, "train").items
    meta = ShardEncoder(cfg.to_dict(), str(tmp_path / "out"), "fp", 1.0).encode_shard(
        0, [[it.source_id, it.class_name, it.label, it.uri, it.row] for it in items])
    assert meta["nonfinite_dropped"] == dropped and meta["rows"] == 3 - dropped
    assert [s["reason"] for s in meta["skipped"]] == ["non-finite latent"] * dropped


def test_evaluate_fingerprint_and_teacher_cache_cover_the_data(tmp_path):
    """Evaluation without sampled rows used to hash only its own section: a changed data.* was
    'complete, skipping', and the cached teacher ignored the data it was trained on."""
    import dataclasses

    from mmdist import artifacts, evaluate, teacher

    a = smoke_config(str(tmp_path), evaluate={"methods": ["random"], "protocol": "soft"})
    b = dataclasses.replace(a, data=dataclasses.replace(a.data, max_per_class=40))
    assert evaluate.fingerprint(a, []) != evaluate.fingerprint(b, [])
    assert teacher.teacher_cache(a, 16) != teacher.teacher_cache(b, 16)
    distilled = tmp_path / "distilled" / "c"
    distilled.mkdir(parents=True)
    (distilled / "0.png").write_bytes(png(8))
    before = artifacts.folder_fingerprint(str(tmp_path / "distilled"))
    (distilled / "1.png").write_bytes(png(8))
    assert artifacts.folder_fingerprint(str(tmp_path / "distilled")) != before
