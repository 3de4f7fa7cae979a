"""Configs: typed, frozen, documented, validated once with errors that name the field."""

import dataclasses
import typing

import pytest

from mmdist import config as C
from mmdist.errors import ConfigError


def _config_classes():
    seen, todo = [], [C.Config]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp) and tp not in seen:
                todo.append(tp)
    return seen


@pytest.mark.parametrize("cls", _config_classes(), ids=lambda c: c.__name__)
def test_every_config_is_frozen_kw_only_and_documented(cls):
    params = cls.__dataclass_params__
    assert params.frozen, cls
    for f in dataclasses.fields(cls):
        assert f.kw_only, (cls, f.name)
        assert f.metadata.get("doc"), f"{cls.__name__}.{f.name} has no documentation"


def test_round_trip_through_dict():
    cfg = C.apply_overrides(C.Config(), ["sample.ipc=7", "evaluate.seeds=[3, 4]", "finetune.minimax.lambda_div=0.02"])
    assert C.Config.from_dict(cfg.to_dict()) == cfg
    assert cfg.evaluate.seeds == (3, 4) and cfg.finetune.minimax.lambda_div == 0.02


@pytest.mark.parametrize("override, field", [
    ("sample.ipc=0", "sample.ipc"),
    ("sample.ipc=many", "sample.ipc"),
    ("finetune.minimax.lambda_rep=-1", "finetune.minimax.lambda_rep"),
    ("finetune.trainable=half", "finetune.trainable"),
    ("finetune.global_batch_size=0", "finetune.global_batch_size"),
    ("evaluate.methods=[minimax, magic]", "evaluate.methods"),
    ("sample.nope=1", "sample.nope"),
    ("data.channels=2", "data.channels"),
    ("pretrain.model=huge", "pretrain.model"),
    ("evaluate.archs=[resnet9000]", "evaluate.archs"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        C.apply_overrides(C.Config(), [override])
    assert str(e.value).startswith(field), str(e.value)


def test_vae_needs_rgb():
    with pytest.raises(ConfigError, match="data.channels"):
        C.apply_overrides(C.Config(), ["encode.encoder=stabilityai/sd-vae-ft-ema"])


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sample:\n  ipc: [1,\n")
    with pytest.raises(ConfigError, match="malformed YAML at line"):
        C.load_yaml(str(bad))
    with pytest.raises(ConfigError, match="not found"):
        C.load_yaml(str(tmp_path / "missing.yaml"))
    good = tmp_path / "good.yaml"
    good.write_text("sample:\n  ipc: 5\nfinetune:\n  minimax:\n    memory_size: 16\n")
    cfg = C.load_yaml(str(good))
    assert cfg.sample.ipc == 5 and cfg.finetune.minimax.memory_size == 16
    assert cfg.data == C.Config().data


def test_fingerprint_tracks_only_its_sections():
    a = C.Config()
    b = C.apply_overrides(a, ["sample.ipc=20"])
    assert a.fingerprint("finetune") == b.fingerprint("finetune")
    assert a.fingerprint("sample") != b.fingerprint("sample")


def test_describe_lists_leaf_fields():
    names = [n for n, _, _ in C.describe()]
    assert "finetune.minimax.lambda_rep" in names and "sample.ipc" in names
