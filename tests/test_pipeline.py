"""The whole pipeline on the smoke preset: real artifacts at every stage, and resume."""

import glob
import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from mmdist import artifacts, run, schema, shards
from mmdist.config import Config
from mmdist.errors import ArtifactError
from mmdist.models import diffusion


def test_latent_shards_match_the_manifest(smoke_run):
    cfg, results = smoke_run
    m = results["encode"]
    assert m["counts"] == {"T-shirt/top": 48, "Trouser": 48} and m["latent_shape"] == [1, 16, 16]
    labels = []
    for rel in m["shards"]:
        data = shards.read_shard(os.path.join(cfg.output, "latents", rel))
        assert data[schema.LATENT_MEAN].shape[1:] == (1, 16, 16)
        labels += data[schema.LABEL].tolist()
        assert set(data[schema.CLASS_NAME]) <= {"T-shirt/top", "Trouser"}
    assert np.bincount(labels).tolist() == [48, 48]


def test_models_are_diffusers_folders_that_load(smoke_run):
    cfg, results = smoke_run
    from diffusers import DDPMScheduler, DiTPipeline, DiTTransformer2DModel

    for folder in ("pretrain", os.path.join("finetune", "minimax")):
        model = DiTTransformer2DModel.from_pretrained(os.path.join(cfg.output, folder, "model_ema"))
        assert model.config.num_embeds_ada_norm == 2 and model.config.in_channels == 1
    assert results["pretrain"]["steps"] == 2 and results["finetune"]["variants"]["minimax"]["steps"] == 2
    tuned = diffusion.load_dit(os.path.join(cfg.output, "finetune", "minimax", "model_ema"))
    assert not any("difffit" in n for n, _ in tuned.named_parameters())
    pipe = DiTPipeline(transformer=tuned, vae=None, scheduler=DDPMScheduler())
    assert pipe.transformer is tuned
    with open(os.path.join(cfg.output, "finetune", "minimax", "manifest.json")) as f:
        history = json.load(f)["history"]
    assert [h["step"] for h in history] == [1.0, 2.0]
    assert "representativeness" in history[-1] and history[-1]["minimax_classes"] >= 1


def test_ipc_images_per_class_with_the_right_labels(smoke_run):
    cfg, results = smoke_run
    for variant in ("minimax", "diffusion"):
        folder = os.path.join(cfg.output, "samples", variant)
        manifest = json.load(open(os.path.join(folder, schema.MANIFEST)))
        assert manifest["counts"] == {"T-shirt/top": 2, "Trouser": 2}
        for entry in manifest["classes"]:
            pngs = sorted(os.listdir(os.path.join(folder, "images", entry["folder"])))
            assert pngs == ["00000.png", "00001.png"]
            table = pq.read_table(os.path.join(folder, "parquet", f"{entry['folder']}.parquet"))
            assert set(table.column(schema.LABEL).to_pylist()) == {entry["label"]}
            assert set(table.column(schema.CLASS_NAME).to_pylist()) == {entry["class"]}
        assert os.path.getsize(os.path.join(folder, "grid.png")) > 100
    names = os.listdir(os.path.join(cfg.output, "samples", "minimax", "images"))
    assert any(n.startswith("T-shirt_top-") for n in names)  # 'T-shirt/top' cannot become a path


def test_accuracy_table_has_finite_numbers_for_every_cell(smoke_run):
    cfg, results = smoke_run
    rows = results["evaluate"]["rows"]
    cells = {(r["method"], r["ipc"]) for r in rows}
    assert cells == {(m, k) for m in ("minimax", "diffusion", "random") for k in (1, 2)}
    for r in rows:
        assert r["protocol"] == "hard" and np.isfinite(r["mean"]) and 0 <= r["mean"] <= 100 and r["n"] == 1
    folder = os.path.join(cfg.output, "eval")
    for name in ("results.md", "results.csv", "results.json", "accuracy.png"):
        assert os.path.getsize(os.path.join(folder, name)) > 0
    assert "| minimax | hard | convnet | 1 |" in results["evaluate"]["table_markdown"]


def test_every_artifact_carries_config_git_sha_and_cost(smoke_run):
    cfg, results = smoke_run
    for stage, manifest in results.items():
        folder = artifacts.stage_dir(cfg, stage)
        saved = json.load(open(os.path.join(folder, schema.CONFIG)))
        assert saved["config"]["output"] == cfg.output and saved["git_sha"]
        assert manifest["wall_seconds"] > 0 and "accelerator_seconds" in manifest


def test_rerun_skips_every_finished_stage(smoke_run):
    cfg, results = smoke_run
    again = run.main(cfg)
    for stage, manifest in results.items():
        assert again[stage]["created"] == manifest["created"], stage


def test_changed_config_is_refused_not_overwritten(smoke_run):
    import dataclasses

    cfg, _ = smoke_run
    changed = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, guidance_scale=3.0))
    with pytest.raises(ArtifactError, match="sample.guidance_scale"):
        run.main(changed, stages=("sample",))


def test_fields_that_say_how_to_run_reuse_every_finished_stage(smoke_run):
    """Every field declared ``result=False`` (actor counts, retries, checkpoint spacing, the encoder
    layout) changed at once: the rerun finds every stage complete and rewrites nothing, as on a
    bigger cluster or after raising max_failures on a crashed run."""
    import dataclasses
    import typing

    cfg, first = smoke_run
    changes, raw = [], cfg.to_dict()
    for section in ("encode", "pretrain", "finetune", "sample", "evaluate"):
        obj = getattr(cfg, section)
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            if f.metadata.get("result", True):
                continue
            value = getattr(obj, f.name)
            choices = typing.get_args(hints[f.name])
            raw[section][f.name] = next(c for c in choices if c != value) if choices else value + 1
            changes.append(f"{section}.{f.name}")
    assert {"encode.num_actors", "encode.pipeline", "finetune.max_failures", "sample.num_actors"} <= set(changes)
    manifests = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(cfg.output, "**", schema.MANIFEST),
                                                           recursive=True)}
    again = run.main(Config.from_dict(raw))
    assert again["evaluate"]["rows"] == first["evaluate"]["rows"]
    assert {p: os.path.getmtime(p) for p in manifests} == manifests, f"rewritten after changing {changes}"


def test_loaders_refuse_an_artifact_without_its_config(smoke_run, tmp_path):
    cfg, _ = smoke_run
    copy = tmp_path / "latents"
    shutil.copytree(os.path.join(cfg.output, "latents"), copy)
    os.remove(copy / schema.CONFIG)
    with pytest.raises(ArtifactError, match="unknown origin"):
        artifacts.require(str(copy), "encode")


def test_a_changed_backbone_makes_its_fine_tunes_stale(smoke_run, tmp_path, monkeypatch):
    """The fine-tuning fingerprint covers the backbone's weights, not its name: 'embedded' is hashed
    by the shipped bytes (a release that replaces the asset makes old fine-tunes stale, a changed
    provenance note does not), a folder by its files (rewritten in place, it is another backbone)."""
    import dataclasses

    from helpers import tiny_dit
    from safetensors.torch import load_file, save_file

    from mmdist import finetune, model_folders, plan
    from mmdist.config import absolute_paths

    smoke_cfg, _ = smoke_run
    stand_in = tiny_dit(str(tmp_path / "stand-in"))

    def state(cfg):
        (row,) = plan.stage_states(cfg, only=["finetune"])
        return row["state"], row["detail"]

    def with_backbone(name, backbone):
        cfg = dataclasses.replace(
            smoke_cfg, output=str(tmp_path / name), latents=os.path.join(smoke_cfg.output, "latents"),
            finetune=dataclasses.replace(smoke_cfg.finetune, backbone=backbone),
            evaluate=dataclasses.replace(smoke_cfg.evaluate, methods=("minimax",)))
        cfg = absolute_paths(cfg)
        finetune.adopt(cfg, stand_in)
        assert state(cfg)[0] == "done" and finetune.main(cfg)["fingerprint"]  # complete: reused
        return cfg

    def shipped_copy(name, change):
        folder = tmp_path / name
        shutil.copytree(model_folders.EMBEDDED_BACKBONE, folder)
        change(folder)
        monkeypatch.setattr(model_folders, "EMBEDDED_BACKBONE", str(folder))

    def perturb(folder):
        weights = load_file(folder / "diffusion_pytorch_model.safetensors")
        first = sorted(weights)[0]
        weights[first] = weights[first] + 1e-3
        save_file(weights, folder / "diffusion_pytorch_model.safetensors")

    shipped_copy("release-1", lambda folder: None)
    cfg = with_backbone("embedded", "embedded")
    shipped_copy("release-1-renoted", lambda folder: (folder / "provenance.json").write_text("{}"))
    assert state(cfg)[0] == "done"
    shipped_copy("release-2", perturb)
    assert state(cfg) == ("stale", "an upstream stage or the backbone's weights changed; --overwrite redoes it")
    with pytest.raises(ArtifactError, match="backbone's weights changed"):
        finetune.main(cfg)

    backbone = tiny_dit(str(tmp_path / "backbone"), seed=1)
    cfg = with_backbone("folder", backbone)
    tiny_dit(backbone, seed=2)  # retrained into the same folder
    assert state(cfg)[0] == "stale"
    with pytest.raises(ArtifactError, match="backbone's weights changed"):
        finetune.main(cfg)
