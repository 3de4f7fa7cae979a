"""The command line: bad input ends in one clear line and exit status 2, never a traceback wall."""

import os
import subprocess
import sys

import pytest
from helpers import image_folder


def mmdist(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "mmdist", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)
    return proc.returncode, proc.stdout, proc.stderr


def one_line_error(code, err, *fragments):
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("mmdist: error:")]
    assert code == 2, err[-2000:]
    assert "Traceback" not in err and len(lines) == 1, err[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_data_folder(tmp_path):
    code, _, err = mmdist("encode", "--smoke", "--output", str(tmp_path), f"data.train={tmp_path}/nowhere",
                          "data.download=false")
    one_line_error(code, err, "Fashion-MNIST not found", "dataset-fashion-mnist")


def test_missing_image_folder(tmp_path):
    code, _, err = mmdist("encode", "--output", str(tmp_path), "data.source=imagefolder",
                          f"data.train={tmp_path}/nowhere")
    one_line_error(code, err, "does not exist")


def test_empty_class_folder_in_strict_mode(tmp_path):
    root = image_folder(str(tmp_path / "train"), {"a": 2})
    (tmp_path / "train" / "b").mkdir()
    code, _, err = mmdist("encode", "--output", str(tmp_path / "out"), "data.source=imagefolder",
                          f"data.train={root}", "encode.strict=true")
    one_line_error(code, err, "encode.strict", "empty_class")


def test_unknown_preset(tmp_path):
    code, _, err = mmdist("pretrain", "--output", str(tmp_path), "pretrain.model=DiT-Z/9")
    one_line_error(code, err, "pretrain.model", "unknown DiT size")


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "x.yaml"
    bad.write_text("finetune: {steps: [\n")
    code, _, err = mmdist("run", "--config", str(bad))
    one_line_error(code, err, "malformed YAML")


@pytest.mark.parametrize("override, fragment", [("sample.ipcs=3", "sample.ipcs: unknown field"),
                                                ("sample.ipc=-3", "sample.ipc: must be >= 1"),
                                                ("justaword", "expected key=value")])
def test_bad_overrides(override, fragment):
    code, _, err = mmdist("config", override)
    one_line_error(code, err, fragment)


def test_config_prints_the_resolved_config_and_options_lists_fields():
    code, out, _ = mmdist("config", "--smoke", "sample.ipc=3")
    assert code == 0 and '"ipc": 3' in out and '"name": "smoke"' in out
    code, out, _ = mmdist("options")
    assert code == 0 and "finetune.minimax.lambda_div = 0.008" in out


def test_version_sections_and_did_you_mean():
    code, out, _ = mmdist("--version")
    assert code == 0 and out.startswith("mmdist ") and out.split()[1][0].isdigit()
    code, out, _ = mmdist("options", "finetune.minimax")
    names = [ln.split(" = ")[0] for ln in out.splitlines() if not ln.startswith(" ")]
    assert code == 0 and names and all(n.startswith("finetune.minimax.") for n in names), out
    one_line_error(*mmdist("options", "finetun")[::2], "unknown section", "did you mean finetune?")
    one_line_error(*mmdist("config", "finetune.lambda_rep=0.1")[::2], "did you mean finetune.minimax.lambda_rep?")
    one_line_error(*mmdist("config", "tracking=nonsense")[::2], "tracking", "not one of")
    one_line_error(*mmdist("plan", "--smoke", "finetun")[::2], "unknown stage 'finetun'", "did you mean finetune?")


def test_data_without_the_files_or_a_download_is_one_line(tmp_path):
    code, _, err = mmdist("data", "--smoke", f"data.train={tmp_path}/nowhere", "data.download=false")
    one_line_error(code, err, "Fashion-MNIST", f"{tmp_path}/nowhere", "apt-get install dataset-fashion-mnist")


def test_plan_reads_the_artifacts_without_running_anything(smoke_run, tmp_path):
    import dataclasses

    from mmdist import plan

    cfg, _ = smoke_run
    assert [(r["stage"], r["state"]) for r in plan.stage_states(cfg)] == [
        (s, "done") for s in ("encode", "pretrain", "finetune", "sample", "evaluate")]
    changed = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, steps=3))
    rows = {r["stage"]: r for r in plan.stage_states(changed)}
    assert rows["encode"]["state"] == rows["pretrain"]["state"] == "done"
    assert rows["finetune"]["state"] == "stale" and "finetune.steps 2 -> 3" in rows["finetune"]["detail"]
    assert rows["sample"]["state"] == "to do" and rows["sample"]["detail"] == "after finetune"
    fresh = dataclasses.replace(cfg, output=str(tmp_path / "fresh"))
    assert {r["state"] for r in plan.stage_states(fresh)} == {"to do"}
    # a started, unfinished evaluation of this config resumes: 'current'
    import shutil

    resumed = str(tmp_path / "resumed")
    shutil.copytree(cfg.output, resumed)
    os.remove(os.path.join(resumed, "eval", "manifest.json"))
    rows = plan.stage_states(dataclasses.replace(cfg, output=resumed), only=["evaluate"])
    trials = len(os.listdir(os.path.join(resumed, "eval", "trials")))
    assert trials and [(r["state"], r["detail"]) for r in rows] == [("current", f"{trials} trial results written")]


def test_errors_from_ray_tasks_data_udfs_and_train_workers_reach_the_user_as_ours(ray_cluster):
    import ray
    from ray.train import WorkerGroupError

    from mmdist.cli import error_line
    from mmdist.errors import DataError

    @ray.remote
    def task():
        raise DataError("bad task")

    class Udf:
        def __call__(self, batch):
            raise DataError("bad block")

    with pytest.raises(Exception) as raised:
        ray.get(task.remote())
    assert error_line(raised.value) == "bad task"
    with pytest.raises(Exception) as raised:
        ray.data.from_items([{"a": 1}]).map_batches(Udf, compute=ray.data.ActorPoolStrategy(size=1),
                                                     num_cpus=0.25).materialize()
    assert error_line(raised.value) == "bad block"  # Ray Data appends retry advice on more lines
    assert error_line(WorkerGroupError("rank 0 failed", {0: DataError("bad step")})) == "bad step"
    assert error_line(RuntimeError("a bug of ours")) is None  # a traceback, not a one-liner


def test_an_error_raised_while_handling_a_ctrl_c_ends_as_an_interrupt(monkeypatch, capsys):
    """A Ctrl-C that lands while a library starts a thread can surface as another error with the
    KeyboardInterrupt as its context (seen in Ray Data's read_parquet): still status 130, our line."""
    from mmdist import cli, plan

    def interrupted_inside_a_library(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("cannot join thread before it is started")  # noqa: B904 (as the library does)

    monkeypatch.setattr(plan, "main", interrupted_inside_a_library)
    assert cli.main(["plan", "--smoke"]) == 130
    assert "mmdist: interrupted" in capsys.readouterr().err

    def a_plain_bug(*args, **kwargs):
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(plan, "main", a_plain_bug)
    with pytest.raises(RuntimeError, match="a bug of ours"):  # not an interrupt: the traceback stays
        cli.main(["plan", "--smoke"])
