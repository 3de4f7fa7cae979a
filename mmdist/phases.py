"""Fine-tuning in class phases (``finetune.class_phases=K``): the paper's route to ImageNet-1K.

The paper's code fine-tunes ImageNet-1K as ~50 independent models of 20 classes each at batch 8
(its author saw 100 classes at once give broken images: docs/method.md §1.11). With K > 0 every
fine-tuned variant is split the same way: the classes, in label order, are cut into phases of K,
and each phase is its own Ray Train run of ``finetune.steps`` steps on only its classes' rows (so
its memories hold only its classes). Phases run side by side, as many at once as the cluster
holds, each from its own driver thread; each is published on its own, so a rerun trains only the
phases that are not. Sampling draws each class from its phase's model.

    <output>/finetune/<method>/phases/<p>/model_ema/   the phase's models, ray/, history.json
    <output>/finetune/<method>/phases/<p>/manifest.json its labels, classes and fingerprint
    <output>/finetune/<method>/manifest.json           lists the phases and the classes of each
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from mmdist import artifacts, storage
from mmdist.config import Config, FinetuneConfig
from mmdist.errors import ConfigError

log = logging.getLogger("mmdist")


def split(num_classes: int, k: int) -> list[list[int]]:
    """The labels of each phase: runs of ``k`` consecutive labels (one phase when k is 0 or >= the classes)."""
    k = k if 0 < k < num_classes else num_classes
    return [list(range(i, min(i + k, num_classes))) for i in range(0, num_classes, k)]


def phase_dir(variant_folder: str, phase: int) -> str:
    """Where phase ``phase`` of a variant lives."""
    return storage.join(variant_folder, "phases", str(phase))


def view(latents: dict[str, Any], labels: list[int]) -> dict[str, Any]:
    """The latents manifest as a phase's training sees it: its classes only, relabelled 0..len-1."""
    return {**latents, "classes": [latents["classes"][i] for i in labels],
            "model_class_ids": [latents["model_class_ids"][i] for i in labels]}


def rows_of(dataset: Any, labels: list[int]) -> Any:
    """A Ray Dataset of latent rows cut down to the phase's classes, relabelled as ``view`` does."""
    # a quarter CPU, like the reads it fuses with (docs/ray-notes.md: 1 CPU starves on a laptop)
    return dataset.map_batches(_keep_rows, fn_kwargs={"labels": labels}, batch_format="pyarrow",
                               batch_size=None, num_cpus=0.25)


def _keep_rows(batch: Any, labels: list[int]) -> Any:
    """Ray Data transform: keep the rows whose label is in ``labels``, relabelled by position."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from mmdist import schema

    wanted = pa.array(labels, pa.int64())
    kept = batch.filter(pc.is_in(batch[schema.LABEL], value_set=wanted))
    local = pc.index_in(kept[schema.LABEL], value_set=wanted).cast(pa.int64())
    return kept.set_column(kept.schema.get_field_index(schema.LABEL), schema.LABEL, local)


def class_models(variant_folder: str, manifest: dict[str, Any], weights: str
                 ) -> dict[int, tuple[str, str | None]] | None:
    """Label -> the model of its phase (``weights``: model_ema or model), from a fine-tuned variant's
    manifest; None for a variant that is one model."""
    if not manifest.get("phases"):
        return None
    return {lab: (storage.join(variant_folder, ph["folder"], weights), None)
            for ph in manifest["phases"] for lab in ph["labels"]}


# ----------------------------------------------------------------------------------------------
# Running the phases
# ----------------------------------------------------------------------------------------------


def side_by_side(tcfg: FinetuneConfig, phases: int) -> tuple[int, float | None]:
    """(phases trained at once, CPUs per worker they get; None leaves that to ``fit``).

    Each phase needs ``num_workers`` workers. A laptop training on CPUs runs one phase at a time
    with every core (unless ``cpus_per_worker`` is set small enough for more); one with GPUs runs
    one phase per ``num_workers`` GPUs and shares its CPUs among them. An autoscaling cluster gets
    every phase at once (the pending runs are the demand it scales on); a fixed cluster as many as
    its nodes hold.
    """
    from mmdist import ray_runtime

    workers, gpus = tcfg.num_workers, 1.0 if tcfg.use_gpu else 0.0
    laptop = ray_runtime.laptop_cpus()
    if laptop is not None:
        if tcfg.use_gpu:
            fits = int(ray_runtime.cluster_gpus()) // workers
        elif tcfg.cpus_per_worker:  # one CPU stays free for Ray Data's file listing (ray_runtime.worker_cpus)
            fits = int((laptop - 1.0) // (workers * tcfg.cpus_per_worker))
        else:
            fits = 1
        at_once = max(1, min(phases, fits))
        shared = ray_runtime.share(laptop, at_once * workers, reserve=1.0) if at_once > 1 else None
        return at_once, tcfg.cpus_per_worker or shared
    if ray_runtime.autoscaler() is not None:
        return phases, None
    cpus = ray_runtime.worker_cpus(tcfg.cpus_per_worker, workers)
    return max(1, min(phases, ray_runtime.capacity(cpus, gpus) // workers)), None


def fit_variant(cfg: Config, method: str, folder: str, fp: str, latents: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune the phases of variant ``method`` not yet published, then publish the variant's manifest
    (listing every phase and its classes). ``cfg`` is the variant's config, ``fp`` its fingerprint."""
    import dataclasses

    from mmdist import distributed, ray_runtime, ray_work

    tcfg = cfg.finetune
    groups = split(len(latents["classes"]), tcfg.class_phases)
    _check_rows(tcfg, latents, groups)
    prints = [hashlib.sha256(f"{fp}|phase|{labels}".encode()).hexdigest()[:16] for labels in groups]
    done: dict[int, dict[str, Any]] = {}
    for p in range(len(groups)):
        manifest = artifacts.existing(phase_dir(folder, p), "finetune", prints[p], cfg, cfg.overwrite)
        if manifest:
            done[p] = manifest
    todo = [p for p in range(len(groups)) if p not in done]
    start = time.time()
    if todo:
        ray_runtime.connect(cfg)
        at_once, cpus = side_by_side(tcfg, len(todo))
        run_cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(tcfg, cpus_per_worker=cpus)) if cpus else cfg
        log.info("finetune %s: %d of %d phases of %d classes to train, %d at a time (%d done)", method, len(todo),
                 len(groups), tcfg.class_phases, at_once, len(done))

        def train(p: int) -> dict[str, Any]:
            """Fine-tune phase ``p`` and publish it."""
            fields = distributed.fit(run_cfg, "finetune", prints[p], folder=phase_dir(folder, p), labels=groups[p])
            log.info("finetune %s: phase %d/%d (%s…) published", method, p + 1, len(groups), fields["classes"][0])
            return artifacts.publish(phase_dir(folder, p), "finetune", prints[p], cfg, method=method, phase=p,
                                     labels=groups[p], model="model", model_ema="model_ema",
                                     backbone=tcfg.backbone, **fields)

        results = ray_work.on_threads(todo, at_once, train)
        failed = {p: r for p, r in results.items() if isinstance(r, BaseException)}
        done.update({p: r for p, r in results.items() if p not in failed})
        if failed:
            for p, e in list(failed.items())[1:]:
                log.error("finetune %s: phase %d failed too: %s", method, p, e)
            log.error("finetune %s: %d of %d phases are published; a rerun trains the rest", method, len(done),
                      len(groups))
            raise next(iter(failed.values()))
    phases = [{"phase": p, "folder": f"phases/{p}", "labels": groups[p], "fingerprint": prints[p],
               **{k: done[p].get(k) for k in ("classes", "steps", "final", "wall_seconds", "accelerator_seconds")}}
              for p in range(len(groups))]
    return artifacts.publish(
        folder, "finetune", fp, cfg, method=method, class_phases=tcfg.class_phases, phases=phases,
        backbone=tcfg.backbone, steps=tcfg.steps, classes=latents["classes"],
        model_class_ids=latents["model_class_ids"], ema_start_share=done[0].get("ema_start_share"),
        wall_seconds=round(time.time() - start, 2),
        accelerator_seconds=round(sum(ph["accelerator_seconds"] or 0.0 for ph in phases), 2))


def _check_rows(tcfg: FinetuneConfig, latents: dict[str, Any], groups: list[list[int]]) -> None:
    """Refuse phases with fewer rows than one global batch (their workers would never get a batch)."""
    counts = latents.get("counts") or {}
    for p, labels in enumerate(groups):
        rows = sum(counts.get(latents["classes"][i], tcfg.global_batch_size) for i in labels)
        if rows < tcfg.global_batch_size:
            raise ConfigError(f"finetune.class_phases: phase {p} ({len(labels)} classes from "
                              f"{latents['classes'][labels[0]]!r}) has {rows} images, fewer than "
                              f"finetune.global_batch_size={tcfg.global_batch_size}; use larger phases or a "
                              "smaller batch")
