"""The command line: bad input ends in one clear line and exit status 2, never a traceback wall."""

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
