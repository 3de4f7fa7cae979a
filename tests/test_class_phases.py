"""finetune.class_phases: the paper's route to ImageNet-1K, one model per K-class phase (smoke size, real Ray)."""

import os

import numpy as np
import pytest
from conftest import smoke_config
from helpers import tiny_dit

from mmdist import phases
from mmdist.config import Config, apply_overrides
from mmdist.errors import ConfigError


@pytest.mark.parametrize("value", ["-1", "many", "2.5", "true"])
def test_class_phases_must_be_a_count(value):
    with pytest.raises(ConfigError, match="^finetune.class_phases: "):
        apply_overrides(Config(), [f"finetune.class_phases={value}"])


def test_classes_split_into_phases_in_label_order():
    assert phases.split(1000, 20) == [list(range(i, i + 20)) for i in range(0, 1000, 20)]
    assert phases.split(5, 2) == [[0, 1], [2, 3], [4]]
    assert phases.split(3, 0) == phases.split(3, 3) == phases.split(3, 20) == [[0, 1, 2]]  # K >= classes: one phase


def test_a_phase_smaller_than_a_batch_is_refused_before_training():
    cfg = apply_overrides(Config(), ["finetune.class_phases=2", "finetune.global_batch_size=64"])
    latents = {"classes": ["a", "b", "c"], "counts": {"a": 40, "b": 40, "c": 63}}
    with pytest.raises(ConfigError, match="^finetune.class_phases: phase 1 .* has 63 images, fewer than "
                                          "finetune.global_batch_size=64"):
        phases._check_rows(cfg.finetune, latents, phases.split(3, 2))


def _mtimes(folder):
    """Relative path -> mtime (ns) of every file under ``folder``."""
    return {os.path.relpath(os.path.join(d, f), folder): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(folder) for f in files}


def test_each_class_is_fine_tuned_and_sampled_in_its_own_phase(smoke_run, tmp_path):
    import ray

    from mmdist import artifacts, finetune, sample, schema, shards, storage

    out = tmp_path / "run"
    folder = artifacts.stage_dir(smoke_run[0], "encode")  # the session's smoke latents: no encode of our own
    cfg = smoke_config(str(out), latents=folder, sample={"baseline": False}, evaluate={"methods": ["minimax"]},
                       finetune={"backbone": tiny_dit(str(tmp_path / "dit")), "class_phases": 1})
    latents = artifacts.require(folder, "encode")
    names = latents["classes"]
    assert len(names) == 2

    # a phase's rows are exactly its class's, relabelled from 0
    rows = [shards.read_shard(storage.join(folder, s)) for s in latents["shards"]]
    trousers = np.concatenate([r[schema.LATENT_MEAN][r[schema.LABEL] == 1] for r in rows])
    got = phases.rows_of(ray.data.read_parquet([os.path.join(folder, s) for s in latents["shards"]]), [1]).take_all()
    assert {r[schema.LABEL] for r in got} == {0} and len(got) == len(trousers) == latents["counts"][names[1]]
    assert sorted(r[schema.LATENT_MEAN].tobytes() for r in got) == sorted(t.tobytes() for t in trousers)

    finetune.main(cfg)
    variant = out / "finetune" / "minimax"
    listed = storage.read_json(str(variant / schema.MANIFEST))
    assert [(p["phase"], p["labels"], p["classes"]) for p in listed["phases"]] == [(0, [0], names[:1]),
                                                                                   (1, [1], names[1:])]
    for p, name in enumerate(names):
        phase = variant / "phases" / str(p)
        m = storage.read_json(str(phase / schema.MANIFEST))
        assert (m["phase"], m["labels"], m["classes"], m["model_class_ids"]) == (p, [p], [name], [p])
        assert m["steps"] == cfg.finetune.steps and m["fingerprint"] == listed["phases"][p]["fingerprint"]
        # the memories held its one class (empty before the first step)
        assert [row["minimax_classes"] for row in m["history"]] == [0.0] + [1.0] * (cfg.finetune.steps - 1)
        for weights in ("model", "model_ema"):
            assert (phase / weights / "config.json").exists()
    assert not (variant / "model_ema").exists()  # no all-class model

    sample.main(cfg)
    for p, name in enumerate(names):
        marker = storage.read_json(str(out / "samples" / "minimax" / "classes" / f"{storage.safe_name(name)}.json"))
        assert marker["model"] == str(variant / "phases" / str(p) / "model_ema") and marker["count"] == cfg.sample.ipc

    # a run killed after phase 0 was published: only phase 1 is fine-tuned again
    kept, redone = _mtimes(variant / "phases" / "0"), _mtimes(variant / "phases" / "1")
    for manifest in (out / "finetune", variant, variant / "phases" / "1"):
        os.remove(manifest / schema.MANIFEST)
    finetune.main(cfg)
    assert _mtimes(variant / "phases" / "0") == kept
    again = _mtimes(variant / "phases" / "1")
    assert again[schema.MANIFEST] and again["model_ema/config.json"] != redone["model_ema/config.json"]
    assert [p["classes"] for p in storage.read_json(str(variant / schema.MANIFEST))["phases"]] == [names[:1],
                                                                                                  names[1:]]
