"""Stage 1 — encode: real images -> latent shards (Parquet) + manifest, with Ray Data.

The train split is cut into fixed shards of ``encode.shard_rows`` images in a fixed order. Each
shard is one row of a Ray Dataset. With GPU encoders it streams through three stages: CPU tasks
read, decode and centre-crop its images; an actor pool (encoder loaded once, a GPU each) encodes
them; CPU tasks write the shard in one atomic write with its statistics in the Parquet footer.
The stages overlap, so the encoder never waits on storage or decoding. On CPUs each actor does
all of it for a whole shard (``encode.pipeline``). A rerun skips every shard
already written by the same config, so an interrupted encode resumes. Bad images are counted and
listed, never dropped silently; ``encode.strict`` turns them into a failure.
"""

from __future__ import annotations

import io
import json
import logging
import time
from typing import Any

import numpy as np
import torch

from mmdist import artifacts, datasets, schema, shards, storage
from mmdist.config import Config, DataConfig
from mmdist.errors import DataError
from mmdist.seeding import derive_seed

log = logging.getLogger("mmdist")


def decode_shard(data: DataConfig, items: list[datasets.Item]) -> tuple[np.ndarray, list, list[dict]]:
    """Read and decode one shard's images: uint8 [n, C, H, W], the items kept, the items skipped."""
    images, kept, skipped = [], [], []
    for it, raw in zip(items, datasets.read_files(data, items)):
        try:
            images.append(datasets.load_item(data, it, data=raw).transpose(2, 0, 1))
            kept.append(it)
        except DataError as e:
            skipped.append({"source_id": it.source_id, "class": it.class_name, "reason": str(e)})
    shape = (0, data.channels, data.image_size, data.image_size)
    return (np.stack(images) if images else np.zeros(shape, np.uint8)), kept, skipped


class ShardEncoder:
    """Ray Data actor holding the encoder (loaded once): decoded shards in, latents out."""

    def __init__(self, config: dict[str, Any], folder: str, fp: str, cpus: float):
        from mmdist.models.diffusion import LatentEncoder
        from mmdist.ray_runtime import torch_threads

        self.cfg = Config.from_dict(config)
        torch.set_num_threads(torch_threads(cpus))
        device = "cuda" if torch.cuda.is_available() and self.cfg.encode.num_gpus_per_actor > 0 else "cpu"
        self.encoder = LatentEncoder(self.cfg.encode.encoder, self.cfg.encode.encoder_subfolder,
                                     self.cfg.encode.scaling_factor, device)
        self.folder, self.fp = folder, fp

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The pipeline's middle stage: encode each decoded shard of ``batch``. Without the pipeline
        (rows are shard plans, no images): each shard whole, returning its summary (JSON)."""
        if "images" not in batch:
            metas = [json.dumps(self.encode_shard(int(i), json.loads(items)))
                     for i, items in zip(batch["shard"], batch["items"])]
            return {"shard": batch["shard"], "meta": _objects(metas)}
        means, stds = [], []
        for images in batch["images"]:
            mean, std = self.encode(_unpack(images))
            means.append(_pack(mean))
            stds.append(b"" if std is None else _pack(std))
        return {"shard": batch["shard"], "items": batch["items"], "kept": batch["kept"],
                "skipped": batch["skipped"], "mean": _objects(means), "std": _objects(stds)}

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 [n, C, H, W] -> latent mean and std (None for a deterministic encoder) in the shard dtype."""
        cfg = self.cfg
        means, stds = [], []
        for start in range(0, len(images), cfg.encode.batch_size):
            mean, std = self.encoder.encode(torch.from_numpy(images[start: start + cfg.encode.batch_size]))
            means.append(mean.float().cpu().numpy())
            stds.append(None if std is None else std.float().cpu().numpy())
        shape = list(self.encoder.latent_shape(cfg.data.channels, cfg.data.image_size))
        mean = np.concatenate(means) if means else np.zeros([0, *shape], np.float32)
        std = None if self.encoder.deterministic else (np.concatenate(stds) if stds else np.zeros_like(mean))
        # cast here, before write_shard's check: a float16 shard overflows to Inf beyond 65504
        dtype = np.float16 if cfg.encode.dtype == "float16" else np.float32
        return mean.astype(dtype), (None if std is None else std.astype(dtype))

    def encode_shard(self, index: int, raw_items: list[list]) -> dict[str, Any]:
        """Read, decode, encode and write one shard in this process (the pipeline's stages in series)."""
        items = [datasets.Item(*row) for row in raw_items]
        images, kept, skipped = decode_shard(self.cfg.data, items)
        mean, std = self.encode(images)
        return write_shard(self.folder, self.fp, index, items, kept, skipped, mean, std)


def write_shard(folder: str, fp: str, index: int, items: list[datasets.Item], kept: list[datasets.Item],
                skipped: list[dict], mean: np.ndarray, std: np.ndarray | None) -> dict[str, Any]:
    """Drop non-finite latents (counted, listed), write the shard atomically; return its summary."""
    skipped = list(skipped)
    flat = (len(mean), int(np.prod(mean.shape[1:])))  # explicit: a shard whose images were all skipped has 0 rows
    finite = np.isfinite(mean.reshape(flat)).all(1)
    if std is not None:
        finite &= np.isfinite(std.reshape(flat)).all(1)
    for it in (k for k, ok in zip(kept, finite) if not ok):
        skipped.append({"source_id": it.source_id, "class": it.class_name, "reason": "non-finite latent"})
    kept = [k for k, ok in zip(kept, finite) if ok]
    mean, std = mean[finite], (None if std is None else std[finite])
    counts: dict[str, int] = {}
    for it in kept:
        counts[it.class_name] = counts.get(it.class_name, 0) + 1
    meta = {
        "fingerprint": fp, "items": items_hash(items), "rows": len(kept), "counts": counts, "skipped": skipped,
        "nonfinite_dropped": int((~finite).sum()), "shape": list(mean.shape[1:]),
        "sum": shards.encode_vector(mean.astype(np.float64).sum(0).ravel()),
    }
    shards.write_shard(
        storage.join(folder, "shards", shards.shard_name(index)),
        mean=mean, std=std,
        labels=np.array([it.label for it in kept], dtype=np.int64),
        class_names=[it.class_name for it in kept], source_ids=[it.source_id for it in kept], meta=meta,
    )
    return meta


def decode_stage(batch: dict[str, np.ndarray], config: dict[str, Any]) -> dict[str, np.ndarray]:
    """The pipeline's first stage (CPU tasks): read and decode each shard of ``batch``."""
    cfg = Config.from_dict(config).data
    packed, kept, skipped = [], [], []
    for raw in batch["items"]:
        images, k, s = decode_shard(cfg, [datasets.Item(*row) for row in json.loads(raw)])
        packed.append(_pack(images))
        kept.append(json.dumps([_item_row(it) for it in k]))
        skipped.append(json.dumps(s))
    return {"shard": batch["shard"], "items": batch["items"], "kept": _objects(kept),
            "skipped": _objects(skipped), "images": _objects(packed)}


def write_stage(batch: dict[str, np.ndarray], folder: str, fp: str) -> dict[str, np.ndarray]:
    """The pipeline's last stage (CPU tasks): write each encoded shard; one summary (JSON) per shard."""
    metas = []
    for i, items, kept, skipped, mean, std in zip(batch["shard"], batch["items"], batch["kept"],
                                                  batch["skipped"], batch["mean"], batch["std"]):
        meta = write_shard(folder, fp, int(i), [datasets.Item(*row) for row in json.loads(items)],
                           [datasets.Item(*row) for row in json.loads(kept)], json.loads(skipped),
                           _unpack(mean), _unpack(std) if len(std) else None)
        metas.append(json.dumps(meta))
    return {"shard": batch["shard"], "meta": _objects(metas)}


def _pack(array: np.ndarray) -> bytes:
    """An array as .npy bytes: shape and dtype travel with it between the pipeline's stages."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _unpack(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _objects(values: list) -> np.ndarray:
    """A column of Python objects (bytes, str) that numpy must not try to broadcast."""
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


def items_hash(items: list[datasets.Item]) -> str:
    """Identity of a shard's inputs: a finished shard is reused only for the same images."""
    import hashlib

    return hashlib.sha256("\n".join(f"{it.source_id}|{it.label}" for it in items).encode()).hexdigest()[:16]


def plan_shards(items: list[datasets.Item], rows: int, seed: int) -> list[list[datasets.Item]]:
    """Shuffle the split (seeded) and cut it into shards of ``rows`` images (the last may be shorter).

    Splits are indexed class by class; without the shuffle a shard would hold one class and a
    training batch's classes would depend on how Ray Data interleaves its reads. The minimax
    terms compare predictions within each class of a batch, so batches must be i.i.d. draws over
    classes, as the paper's DistributedSampler gives (docs/method.md §1.2): every shard is a uniform
    random sample of the split.
    """
    order = np.random.default_rng(derive_seed(seed, "encode", "rows")).permutation(len(items))
    shuffled = [items[i] for i in order]
    return [shuffled[i: i + rows] for i in range(0, len(shuffled), rows)]


def main(cfg: Config) -> dict[str, Any]:
    """Encode the train split into latent shards; skip if a current manifest exists."""
    from mmdist import ray_runtime

    folder = artifacts.stage_dir(cfg, "encode")
    fp = artifacts.fingerprint(cfg, "encode")
    done = artifacts.existing(folder, "encode", fp, cfg, cfg.overwrite)
    if done:
        log.info("encode: %s is complete, skipping", folder)
        return done
    start = time.time()
    train = datasets.index_split(cfg.data, "train")
    problems = list(train.problems)
    if cfg.data.source == "fashion-mnist" or cfg.data.test:
        test = datasets.index_split(cfg.data, "test")
        problems += [{"kind": "class_missing", "class": c, "split": "test"}
                     for c in train.classes if c not in test.classes]
    if problems and cfg.encode.strict:
        raise DataError(f"encode.strict: {len(problems)} input problems, first: {problems[0]}")
    plans = plan_shards(train.items, cfg.encode.shard_rows, cfg.encode.seed)
    uris = [storage.join(folder, "shards", shards.shard_name(i)) for i in range(len(plans))]
    metas: dict[int, dict] = {}
    for i, uri in enumerate(uris):
        meta = shards.read_shard_meta(uri)
        if meta is not None and meta.get("fingerprint") == fp and meta.get("items") == items_hash(plans[i]):
            metas[i] = meta
    todo = [i for i in range(len(plans)) if i not in metas]
    log.info("encode: %d images of %d classes -> %d shards (%d to do) in %s",
             len(train.items), len(train.classes), len(plans), len(todo), folder)
    gpus = 0.0
    if todo:
        ray_runtime.connect(cfg)
        metas.update(_run_actors(cfg, folder, fp, plans, todo))
        gpus = cfg.encode.num_gpus_per_actor * _pool_size(cfg, len(todo))[1]
    skipped = [s for i in sorted(metas) for s in metas[i]["skipped"]]
    if skipped and cfg.encode.strict:
        raise DataError(f"encode.strict: {len(skipped)} images could not be used, first: {skipped[0]}")
    counts = dict.fromkeys(train.classes, 0)
    for m in metas.values():
        for name, n in m["counts"].items():
            counts[name] += n
    shape = metas[0]["shape"]
    total = sum(counts.values())
    mean = sum(shards.decode_vector(m["sum"], (int(np.prod(shape)),)) for m in metas.values()) / max(total, 1)
    encoder_scale = _scaling_factor(cfg)
    from safetensors.numpy import save as save_tensors

    storage.write_bytes(storage.join(folder, schema.STATS),
                        save_tensors({"latent_mean": (mean.reshape(shape) * encoder_scale).astype(np.float32)}))
    wall = time.time() - start
    return artifacts.publish(
        folder, "encode", fp, cfg,
        shards=[storage.join("shards", shards.shard_name(i)) for i in range(len(plans))],
        rows=total, classes=list(train.classes), counts=counts,
        model_class_ids=list(cfg.data.model_class_ids or range(len(train.classes))),
        latent_shape=shape, dtype=cfg.encode.dtype, encoder=cfg.encode.encoder,
        scaling_factor=encoder_scale, deterministic=cfg.encode.encoder == "identity",
        skipped=skipped, problems=problems,
        nonfinite_dropped=sum(m.get("nonfinite_dropped", 0) for m in metas.values()),
        wall_seconds=round(wall, 2), accelerator_seconds=round(wall * gpus, 2),
    )


def _pool_size(cfg: Config, shards_to_do: int) -> tuple[int, int, float]:
    """(min, max, CPUs per actor) of the encoder pool: fixed on a laptop, a range on a cluster
    that Ray Data grows as nodes join (mmdist.ray_runtime.actor_pool)."""
    from mmdist import ray_runtime

    return ray_runtime.actor_pool(cfg.encode.num_actors, shards_to_do, cfg.encode.num_gpus_per_actor)


def _run_actors(cfg: Config, folder: str, fp: str, plans: list, todo: list[int]) -> dict[int, dict]:
    """Stream the shards to do through Ray Data; returns their summaries as they finish.

    Pipelined (``encode.pipeline``; by default where the actors hold GPUs): reading and decoding
    run as CPU tasks, the encoder on the actor pool, writing as CPU tasks again; while an actor
    encodes shard k, tasks decode the shards after it and write the ones before, so a GPU never
    waits on object storage or PIL. Otherwise each actor does a whole shard: on CPUs the stages
    would share the same cores, and there the pipeline measured half the throughput
    (benchmarks/data.py). A shard is one row (the unit of resume) either way.
    """
    import ray
    from tqdm import tqdm

    from mmdist import ray_runtime

    lo, hi, cpus = _pool_size(cfg, len(todo))
    rows = [{"shard": i, "items": json.dumps([list(_item_row(it)) for it in plans[i]])} for i in todo]
    config = cfg.to_dict()
    pipelined = cfg.encode.pipeline == "on" or (cfg.encode.pipeline == "auto" and cfg.encode.num_gpus_per_actor > 0)
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    if pipelined:
        # a laptop's actors leave a quarter CPU per task stage (docs/ray-notes.md: starvation); a
        # cluster's decode tasks take a core each, as many as the nodes have left over
        decode_cpus = 0.25 if ray_runtime.laptop_cpus() is not None else 1.0
        ds = ds.map_batches(decode_stage, fn_kwargs=dict(config=config), batch_size=1, num_cpus=decode_cpus)
    ds = ds.map_batches(ShardEncoder, fn_constructor_kwargs=dict(config=config, folder=folder, fp=fp, cpus=cpus),
                        batch_size=1, compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
                        num_cpus=cpus, num_gpus=cfg.encode.num_gpus_per_actor or None)
    if pipelined:
        ds = ds.map_batches(write_stage, fn_kwargs=dict(folder=folder, fp=fp), batch_size=1, num_cpus=0.25)
    out = {}
    with tqdm(total=len(todo), desc="encode shards", unit="shard") as bar:
        for row in ds.iter_rows():
            out[int(row["shard"])] = json.loads(row["meta"])
            bar.update()
    return out


def _item_row(it: datasets.Item) -> tuple:
    """An Item as a JSON-able tuple (field order of the dataclass)."""
    return (it.source_id, it.class_name, it.label, it.uri, it.row)


def _scaling_factor(cfg: Config) -> float:
    """The latent scale: configured, else 1 for identity, else read from the VAE config."""
    if cfg.encode.scaling_factor:
        return cfg.encode.scaling_factor
    if cfg.encode.encoder == "identity":
        return 1.0
    from mmdist.models.diffusion import vae_config

    return float(vae_config(cfg.encode.encoder, cfg.encode.encoder_subfolder).get("scaling_factor", 0.18215))
