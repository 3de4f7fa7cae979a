"""Stage 4 — sample: IPC images per class, fanned out per class over a pool of Ray actors.

Variants: every generated row of ``evaluate.methods`` — ``minimax`` (always), the fine-tuned
ablations (``finetune``, ``representativeness``, ``diversity``: finetune/<method>/), ``diffusion``
(the un-fine-tuned backbone: the paper's "DiT" column, also drawn when ``sample.baseline``) — and
``<method>+select``, which draws ``sample.oversample`` x IPC candidates from <method>'s model and
keeps the IPC that best cover the class's real latents (``mmdist.models.selection``). Each actor
loads its DiT and decoder once and generates whole classes in batches. Image k of class c is a
pure function of (seed, c, k) whatever the variant, so the rows are paired (image k of minimax and
of diffusion start from the same noise) and the first IPC candidates of a +select variant are its
base variant's images. Files go to paths that depend only on (variant, class, k), so any number of
actors gives the same files and a retried class overwrites the same files. A class is published by
its marker (written after its PNGs, Parquet and grid); the variant's manifest after all classes.

    samples/<variant>/images/<class>/<k:05d>.png   ImageFolder tree
    samples/<variant>/parquet/<class>.parquet      the same images as PNG bytes
    samples/<variant>/classes/<class>.json         per-class marker
    samples/<variant>/grid.png                     a look at every class
"""

from __future__ import annotations

import io
import json
import logging
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmdist import artifacts, schema, storage
from mmdist.config import SELECT, Config, base_method, is_generated
from mmdist.errors import ArtifactError, ConfigError
from mmdist.seeding import derive_seed

log = logging.getLogger("mmdist")
ModelRef = tuple[str, str | None]  # a model as every node names it: URI, hub id or 'embedded'; subfolder


class ClassSampler:
    """Ray actor: holds a DiT and the decoder; ``sample_class`` writes one class."""

    def __init__(self, config: dict[str, Any], model: ModelRef | dict[int, ModelRef], folder: str,
                 latents: dict[str, Any], threads: int, fingerprint: str, center: np.ndarray | None = None):
        from mmdist.model_folders import resolve
        from mmdist.models import diffusion

        self.cfg = Config.from_dict(config)
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() and self.cfg.sample.num_gpus_per_actor > 0
                                   else "cpu")
        # ``model`` names the DiT as every node can (output URI, hub id, 'embedded'): this node
        # loads or copies it itself, the driver's disk is never read. A variant fine-tuned in class
        # phases gives each class its phase's model: loaded when a class needs it, and kept, so the
        # classes of a phase (consecutive labels, handed out in order) reuse it
        self.models = model if isinstance(model, dict) else {}
        self.ref = None if self.models else model
        self.model = None if self.models else diffusion.load_dit(*resolve(*model)).eval().to(self.device)
        decoder = self.cfg.sample.decoder or self.cfg.encode.encoder
        subfolder = None if self.cfg.sample.decoder else self.cfg.encode.encoder_subfolder
        if decoder != "identity":
            decoder, subfolder = resolve(decoder, subfolder)
        self.decoder = diffusion.LatentEncoder(decoder, subfolder, latents["scaling_factor"], self.device)
        self.folder, self.latents, self.fingerprint = folder, latents, fingerprint
        self.center = None if center is None else torch.from_numpy(np.array(center))

    def _model_for(self, label: int) -> torch.nn.Module:
        """The DiT that samples class ``label`` (its phase's, loaded if it is not the one held)."""
        from mmdist.model_folders import resolve
        from mmdist.models import diffusion

        ref = self.models.get(label, self.ref)
        if ref != self.ref:
            self.model = None  # the last phase's weights go before the next are loaded (GPU memory)
            self.model, self.ref = diffusion.load_dit(*resolve(*ref)).eval().to(self.device), ref
        return self.model

    def _latents(self, label: int, ks: range) -> torch.Tensor:
        """Scaled latents of images ``ks`` of class ``label`` (each from its own seeded noise)."""
        from mmdist.models.sampler import sample_latents

        s = self.cfg.sample
        gens = [torch.Generator().manual_seed(derive_seed(s.seed, "sample", label, k)) for k in ks]
        return sample_latents(self._model_for(label), class_ids=[self.latents["model_class_ids"][label]] * len(gens),
                              generators=gens, latent_shape=tuple(self.latents["latent_shape"]),
                              scheduler=s.scheduler, steps=s.steps, guidance_scale=s.guidance_scale,
                              guidance_channels=s.guidance_channels, autocast=s.mixed_precision)

    def sample_class(self, label: int, reference: np.ndarray | None = None, fresh: bool = False) -> dict[str, Any]:
        """Generate, write and publish all IPC images of one class; returns its marker.

        With ``reference`` (the class's real latents, centred and normalised) this is a +select
        variant: oversample x IPC candidates are drawn and the IPC that cover the reference best
        are kept, best first. ``fresh``: the class had no image folder when the stage started.
        """
        s = self.cfg.sample
        start = time.time()
        name = self.latents["classes"][label]
        safe = storage.safe_name(name)
        n = s.ipc if reference is None else s.ipc * s.oversample
        batches = [range(i, min(i + s.batch_size, n)) for i in range(0, n, s.batch_size)]
        selected = None
        if reference is not None:
            from mmdist.models.minimax import embed
            from mmdist.models.selection import facility_location

            z_all = torch.cat([self._latents(label, ks).cpu() for ks in batches])
            # the reference comes from the object store, read-only
            selected = facility_location(embed(z_all, self.center), torch.from_numpy(np.array(reference)), s.ipc)
            batches = [selected[i: i + s.batch_size] for i in range(0, s.ipc, s.batch_size)]
        pngs: list[bytes] = []
        for chunk in batches:
            z = self._latents(label, chunk) if selected is None else z_all[list(chunk)]
            pngs += [png_bytes(img) for img in self.decoder.decode(z).cpu().numpy()]
        # the class's files go out together (on object storage, concurrently); the marker after them
        storage.write_many({**{storage.join(self.folder, "images", safe, f"{k:05d}.png"): data
                               for k, data in enumerate(pngs)},
                            storage.join(self.folder, "parquet", f"{safe}.parquet"): _class_parquet(pngs, label, name),
                            storage.join(self.folder, "grids", f"{safe}.png"):
                                png_bytes(grid([decode_png(p) for p in pngs[:64]], cols=8))})
        # a published class folder holds exactly its images: not a killed writer's temp file, nor
        # images past IPC from an earlier, larger run. On object storage a PUT leaves no temp file
        # and a retry writes the same names, so a folder absent at the start needs no listing (a
        # round trip per class: a minute at 1000 classes)
        if not (fresh and storage.is_remote(self.folder)):
            storage.keep_only(storage.join(self.folder, "images", safe), {f"{k:05d}.png" for k in range(s.ipc)})
        marker = {"class": name, "label": label, "folder": safe, "count": len(pngs),
                  "fingerprint": self.fingerprint, "seconds": round(time.time() - start, 2),
                  **({"model": self.ref[0]} if self.models else {}),
                  **({} if selected is None else {"candidates": n, "selected": selected})}
        storage.write_json(storage.join(self.folder, "classes", f"{safe}.json"), marker)
        return marker


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------


def png_bytes(chw: np.ndarray) -> bytes:
    """uint8 [C, H, W] -> PNG bytes (deterministic)."""
    arr = chw.transpose(1, 2, 0)
    image = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 [C, H, W]."""
    arr = np.asarray(Image.open(io.BytesIO(data)))
    return (arr[:, :, None] if arr.ndim == 2 else arr).transpose(2, 0, 1)


def grid(images: list[np.ndarray], cols: int) -> np.ndarray:
    """Tile uint8 [C, H, W] images row-major into one uint8 [3, H', W'] image (white 2-px gaps)."""
    from torchvision.utils import make_grid

    return make_grid(torch.from_numpy(np.stack(images)), nrow=cols, padding=2, pad_value=255).numpy()


def labelled_grid(rows: list[tuple[str, list[np.ndarray]]], scale: int = 3) -> Image.Image:
    """One row per class with its name on the left: the picture shown at the end of a run."""
    from PIL import ImageDraw

    c, h, w = rows[0][1][0].shape
    cols = max(len(imgs) for _, imgs in rows)
    body = grid([img for _, imgs in rows for img in imgs + [np.full((c, h, w), 255, np.uint8)] * (cols - len(imgs))],
                cols=cols)
    image = Image.fromarray(body.transpose(1, 2, 0))
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    label_w = 110
    canvas = Image.new("RGB", (image.width + label_w, image.height), "white")
    canvas.paste(image, (label_w, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (name, _) in enumerate(rows):
        draw.text((4, (2 + i * (h + 2)) * scale + h * scale // 2 - 5), name[:18], fill="black")
    return canvas


def _class_parquet(pngs: list[bytes], label: int, name: str) -> bytes:
    """The class's images as a Parquet file (PNG bytes, index, label, class name)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({schema.PNG: pa.array(pngs, pa.binary()), schema.INDEX: pa.array(range(len(pngs)), pa.int64()),
                      schema.LABEL: pa.array([label] * len(pngs), pa.int64()),
                      schema.CLASS_NAME: pa.array([name] * len(pngs), pa.string())})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


def variant_names(cfg: Config) -> list[str]:
    """The sampled sets: minimax, the generated rows of the evaluation, diffusion if baseline."""
    wanted = ["minimax"] + [m for m in cfg.evaluate.methods if is_generated(m)]
    if cfg.sample.baseline:
        wanted.append("diffusion")
    return list(dict.fromkeys(wanted))


def variants(cfg: Config) -> dict[str, ModelRef | dict[int, ModelRef]]:
    """Variant name -> (model, subfolder) as any node names it: a fine-tuned variant's output URI, or
    the backbone ('embedded', the pretrain output, a hub id or a URI). Never a path on the driver.
    A variant fine-tuned in class phases maps each label to its phase's model instead."""
    from mmdist.finetune import variant_dir
    from mmdist.model_folders import backbone_ref
    from mmdist.phases import class_models

    out = {}
    for name in variant_names(cfg):
        base = base_method(name)
        if base == "diffusion":
            out[name] = backbone_ref(cfg)
            continue
        weights = "model_ema" if cfg.sample.use_ema else "model"
        folder = variant_dir(cfg, base)
        phased = class_models(folder, storage.read_json(storage.join(folder, schema.MANIFEST)), weights)
        out[name] = phased or (storage.join(folder, weights), None)
    return out


def selected_labels(cfg: Config, latents: dict[str, Any]) -> list[int]:
    """Labels of the classes to sample (``sample.classes`` by name, else all)."""
    names = latents["classes"]
    if cfg.sample.classes is None:
        return list(range(len(names)))
    unknown = [c for c in cfg.sample.classes if c not in names]
    if unknown:
        raise ConfigError(f"sample.classes: unknown class {unknown[0]!r}; the data set has {names[:10]}")
    return [names.index(c) for c in cfg.sample.classes]


def main(cfg: Config) -> dict[str, Any]:
    """Sample every variant; skip finished classes and finished variants."""
    latents = artifacts.require(artifacts.stage_dir(cfg, "encode"), "encode")
    tuned = artifacts.require(artifacts.stage_dir(cfg, "finetune"), "finetune")
    stage_folder = artifacts.stage_dir(cfg, "sample")
    fp = artifacts.fingerprint(cfg, "sample", [latents, tuned])
    done = artifacts.existing(stage_folder, "sample", fp, cfg, cfg.overwrite)
    if done and set(variant_names(cfg)) <= set(done["variants"]):
        log.info("sample: %s is complete, skipping", stage_folder)
        return done
    labels = selected_labels(cfg, latents)
    start = time.time()
    gpu_seconds = 0.0
    results = {v: {} for v in (done or {}).get("variants", [])}  # variants sampled by an earlier run
    references = None
    for variant, model in variants(cfg).items():
        if variant in results:
            continue
        for ref in sorted(set(model.values())) if isinstance(model, dict) else [model]:
            _check_model(variant, ref, latents)
        folder = storage.join(stage_folder, variant)
        if variant.endswith(SELECT) and references is None:
            references = class_references(cfg, latents, labels)
        results[variant], seconds = _sample_variant(cfg, variant, model, folder, latents, labels, fp,
                                                    references if variant.endswith(SELECT) else None)
        gpu_seconds += seconds
    wall = time.time() - start
    return artifacts.publish(stage_folder, "sample", fp, cfg, variants=sorted(results),
                             ipc=cfg.sample.ipc, classes=[latents["classes"][i] for i in labels],
                             wall_seconds=round(wall, 2), accelerator_seconds=round(gpu_seconds, 2))


def _check_model(variant: str, model: ModelRef, latents: dict[str, Any]) -> None:
    """Refuse a model that cannot sample the data set's classes at its latent shape (config only)."""
    from mmdist.model_folders import model_config

    conf = model_config(*model)
    needed = max(latents["model_class_ids"]) + 1
    if conf["num_embeds_ada_norm"] < needed:
        raise ArtifactError(f"{variant} model at {model[0]} has {conf['num_embeds_ada_norm']} classes; "
                            f"the data set needs class ids up to {needed - 1}")
    shape = [conf["in_channels"], conf["sample_size"], conf["sample_size"]]
    if shape != list(latents["latent_shape"]):
        raise ArtifactError(f"{variant} model at {model[0]} takes latents {shape}, the data set's are "
                            f"{latents['latent_shape']} (a model of another size or data set)")


def class_references(cfg: Config, latents: dict[str, Any], labels: list[int]) -> dict[str, Any]:
    """For +select: up to ``sample.select_reference`` real latents per class, centred and normalised
    as the fine-tuning objective sees them, and the centre.

    Shards are uniform samples of the classes (encode shuffles rows), so reading them in order and
    stopping once every class is full takes about select_reference x classes rows.
    """
    from safetensors.numpy import load as load_tensors

    from mmdist import shards
    from mmdist.models.minimax import embed

    folder = artifacts.stage_dir(cfg, "encode")
    stats = load_tensors(storage.read_bytes(storage.join(folder, schema.STATS)))
    center = stats["latent_mean"].astype(np.float32)
    want = cfg.sample.select_reference
    found: dict[int, list[np.ndarray]] = {lab: [] for lab in labels}
    for rel in latents["shards"]:
        table = shards.read_shard(storage.join(folder, rel))
        for lab in labels:
            have = sum(len(a) for a in found[lab])
            if have < want:
                found[lab].append(table[schema.LATENT_MEAN][table[schema.LABEL] == lab][: want - have])
        if all(sum(len(a) for a in found[lab]) >= want for lab in labels):
            break
    scale = float(latents["scaling_factor"])
    refs = {lab: embed(torch.from_numpy(np.concatenate(found[lab]).astype(np.float32) * scale),
                       torch.from_numpy(center)).numpy() for lab in labels}
    return {"center": center, "per_class": refs}


def _sample_variant(cfg: Config, variant: str, model: ModelRef | dict[int, ModelRef], folder: str,
                    latents: dict[str, Any], labels: list[int], fp: str, references: dict[str, Any] | None = None
                    ) -> tuple[dict[str, Any], float]:
    """Fan the unfinished classes of one variant out over actors; publish its manifest."""
    import ray
    from tqdm import tqdm

    from mmdist import ray_runtime, ray_work

    vfp = f"{fp}-{variant}"
    prior = storage.join(folder, schema.MANIFEST)
    if storage.exists(prior) and storage.read_json(prior).get("fingerprint") == vfp:
        return storage.read_json(prior), 0.0
    markers = {}
    # one listing and concurrent reads, not a request per class: 1000 classes on object storage
    listed = set(storage.listdir(storage.join(folder, "classes")))
    safe = {lab: storage.safe_name(latents["classes"][lab]) for lab in labels}
    present = [lab for lab in labels if f"{safe[lab]}.json" in listed]
    for lab, data in zip(present, storage.read_many([storage.join(folder, "classes", f"{safe[lab]}.json")
                                                     for lab in present])):
        try:
            m = json.loads(data)
        except (TypeError, ValueError):  # unreadable or damaged: the class is sampled again
            continue
        if m.get("fingerprint") == vfp and m.get("count") == cfg.sample.ipc:
            markers[lab] = m
    todo = [lab for lab in labels if lab not in markers]
    had_images = set(storage.listdir(storage.join(folder, "images"))) if todo else set()
    start = time.time()
    n_actors = 0
    if todo:
        ray_runtime.connect(cfg)
        s = cfg.sample
        _, n_actors, cpus = ray_runtime.actor_pool(s.num_actors, len(todo), s.num_gpus_per_actor)
        # "DEFAULT" keeps the actors out of an enclosing placement group (a Tune trial of jobs.sweep)
        actor_cls = ray.remote(ClassSampler).options(
            num_cpus=cpus, num_gpus=s.num_gpus_per_actor, max_restarts=3, max_task_retries=3,
            scheduling_strategy="DEFAULT")
        center = None if references is None else references["center"]
        refs = {} if references is None else {lab: ray.put(references["per_class"][lab]) for lab in todo}
        actors = [actor_cls.remote(cfg.to_dict(), model, folder, latents, ray_runtime.torch_threads(cpus), vfp, center)
                  for _ in range(n_actors)]
        try:
            with tqdm(total=len(todo), desc=f"sample {variant}", unit="class") as bar:
                for marker in ray_work.elastic_map(
                        actors, lambda a, lab: a.sample_class.remote(
                            lab, refs.get(lab), safe[lab] not in had_images), todo):
                    markers[marker["label"]] = marker
                    bar.update()
        finally:
            for a in actors:  # started or still waiting for a node: either way, done
                ray.kill(a)
    seconds = (time.time() - start) * n_actors * cfg.sample.num_gpus_per_actor
    rows = []
    shown = min(cfg.sample.ipc, 10)
    files = storage.read_many([storage.join(folder, "images", markers[lab]["folder"], f"{k:05d}.png")
                               for lab in labels for k in range(shown)])
    for i, lab in enumerate(labels):
        blobs = files[i * shown: (i + 1) * shown]
        for blob in blobs:
            if isinstance(blob, Exception):
                raise blob
        rows.append((markers[lab]["class"], [decode_png(b) for b in blobs]))
    buf = io.BytesIO()
    labelled_grid(rows).save(buf, format="PNG")
    storage.write_bytes(storage.join(folder, "grid.png"), buf.getvalue())
    manifest = {
        "kind": "samples", "fingerprint": vfp, "variant": variant,
        "model": sorted({m[0] for m in model.values()}) if isinstance(model, dict) else model[0],
        "ipc": cfg.sample.ipc, "seed": cfg.sample.seed, "scheduler": cfg.sample.scheduler,
        "steps": cfg.sample.steps, "guidance_scale": cfg.sample.guidance_scale,
        "guidance_channels": cfg.sample.guidance_channels,
        **({} if references is None else {"oversample": cfg.sample.oversample, "selection": "facility_location",
                                          "select_reference": cfg.sample.select_reference}),
        "classes": [{k: markers[lab][k] for k in ("class", "label", "folder", "count", "model") if k in markers[lab]}
                    for lab in labels],
        "counts": {markers[lab]["class"]: markers[lab]["count"] for lab in labels},
        "config": cfg.to_dict(), "git_sha": artifacts.git_sha(),
        "accelerator_seconds": round(seconds, 2),
    }
    storage.write_json(storage.join(folder, schema.CONFIG), {"config": cfg.to_dict(), "git_sha": artifacts.git_sha()})
    storage.write_json(prior, manifest)
    return manifest, seconds
