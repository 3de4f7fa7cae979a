"""The CPU benchmarks' shared helpers against a real (smoke) run: a benchmark that reads the wrong
manifest fails after minutes of measuring, so its reading is tested here in a second."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _common(monkeypatch):
    """benchmarks/common.py, its environment settings undone when the test ends."""
    for key in ("RAY_AUTH_MODE", "TQDM_MININTERVAL", "RAY_DEDUP_LOGS"):
        if key in os.environ:
            monkeypatch.setenv(key, os.environ[key])
        else:
            monkeypatch.delenv(key, raising=False)
    spec = importlib.util.spec_from_file_location("bench_common", os.path.join(ROOT, "benchmarks", "common.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_timed_finetune_reads_the_variants_history(smoke_run, monkeypatch):
    """What finetune.py and data.py time: the minimax variant's history, past its warm-up window."""
    common = _common(monkeypatch)
    cfg, _ = smoke_run
    manifest, stats = common.timed_finetune(cfg)  # finished: the stage skips, the reading is what runs
    assert manifest["steps"] == cfg.finetune.steps and len(manifest["history"]) == 2
    assert stats["windows_used"] == 1 and stats["steps_measured"] == 1
    assert stats["step_seconds"] > 0 and stats["steps_per_second"] > 0 and stats["wall_seconds"] >= 0
