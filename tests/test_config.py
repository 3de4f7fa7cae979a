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
    cfg = C.apply_overrides(C.Config(), ["sample.ipc=17", "evaluate.seeds=[3, 4]", "finetune.minimax.lambda_div=0.02"])
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


def test_numbers_in_exponent_form_are_numbers_in_overrides_and_files(tmp_path):
    """YAML 1.1 reads 1e-4 as a string (it wants 1.0e-4); a user writes finetune.lr=1e-4."""
    cfg = C.apply_overrides(C.Config(), ["finetune.lr=1e-4", "pretrain.lr=2.5E-3", "finetune.minimax.lambda_div=.8e-2"])
    assert (cfg.finetune.lr, cfg.pretrain.lr, cfg.finetune.minimax.lambda_div) == (1e-4, 2.5e-3, 0.008)
    assert C.apply_overrides(C.Config(), ["sample.ipc=10"]).sample.ipc == 10  # integers stay integers
    assert C.apply_overrides(C.Config(), ["name=e5"]).name == "e5"  # and words stay words
    path = tmp_path / "lr.yaml"
    path.write_text("finetune:\n  lr: 1e-4\n")
    assert C.load_yaml(str(path)).finetune.lr == 1e-4


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
    good.write_text("sample:\n  ipc: 15\nfinetune:\n  minimax:\n    memory_size: 16\n")
    cfg = C.load_yaml(str(good))
    assert cfg.sample.ipc == 15 and cfg.finetune.minimax.memory_size == 16
    assert cfg.data == C.Config().data


def test_fingerprint_tracks_only_its_sections():
    a = C.Config()
    b = C.apply_overrides(a, ["sample.ipc=20"])
    assert a.fingerprint("finetune") == b.fingerprint("finetune")
    assert a.fingerprint("sample") != b.fingerprint("sample")


def test_describe_lists_leaf_fields():
    names = [n for n, _, _ in C.describe()]
    assert "finetune.minimax.lambda_rep" in names and "sample.ipc" in names


# ----------------------------------------------------------------------------------------------
# Every field declares its checks, and each declared check refuses what it should
# ----------------------------------------------------------------------------------------------


def _leaves(cls=C.Config, prefix=""):
    """(dotted name, annotation, Checks) of every leaf field."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _leaves(tp, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", tp, f.metadata["checks"]))
    return out


def _scalar(tp):
    """The scalar type under Optional[...] and tuple[..., ...]."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, type(int | None)):
        return _scalar(args[0])
    if typing.get_origin(tp) is tuple:
        return _scalar(args[0])
    return tp


LEAVES = _leaves()
NUMERIC = [(n, tp, c) for n, tp, c in LEAVES if _scalar(tp) in (int, float)]
STRINGS = [(n, tp, c) for n, tp, c in LEAVES if _scalar(tp) is str]


def _with(name, value, tp):
    raw = C.to_dict(C.Config())
    node = raw
    *parents, leaf = name.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = [value] if typing.get_origin(tp) is tuple else value
    return C.Config.from_dict(raw)


def test_every_numeric_field_declares_a_lower_bound_and_every_string_what_it_is():
    assert len(NUMERIC) > 40 and len(STRINGS) > 10  # the walk reaches every section
    assert not [n for n, _, c in NUMERIC if not c.bounded], "numeric fields without a declared range"
    assert not [n for n, _, c in STRINGS if c.registry is None and c.kind is None], \
        "string fields that are neither a registry name nor a declared kind (uri/text)"


def _outside(c, scalar):
    """Values just outside each declared bound."""
    step = 1 if scalar is int else 1e-6
    out = []
    if c.ge is not None:
        out.append(c.ge - step)
    if c.gt is not None:
        out.append(c.gt)
    if c.le is not None:
        out.append(c.le + step)
    if c.lt is not None:
        out.append(c.lt)
    if scalar is int:
        out.append(2**63)
    else:
        out += [float("inf"), float("-inf"), float("nan")]
    return out


@pytest.mark.parametrize("name, tp, checks", NUMERIC, ids=[n for n, _, _ in NUMERIC])
def test_every_numeric_field_refuses_values_outside_its_range(name, tp, checks):
    scalar = _scalar(tp)
    for value in _outside(checks, scalar):
        value = int(value) if scalar is int else value
        with pytest.raises(ConfigError) as e:
            _with(name, value, tp)
        assert str(e.value).startswith(name) and "\n" not in str(e.value), (value, str(e.value))


@pytest.mark.parametrize("name, tp, checks", STRINGS, ids=[n for n, _, _ in STRINGS])
def test_every_string_field_refuses_unknown_names_and_credentials(name, tp, checks):
    bad = ["line\nbreak"]
    if checks.registry is not None:
        bad.append("no-such-name-xyz")
    if checks.kind == "uri":
        bad += ["s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/x", "gs://bucket/x?X-Amz-Signature=wJalrXUtnFEMI"]
    for value in bad:
        with pytest.raises(ConfigError) as e:
            _with(name, value, tp)
        msg = str(e.value)
        assert msg.startswith(name) and "wJalrXUtnFEMI" not in msg and "\n" not in msg, msg


@pytest.mark.parametrize("override, field", [
    ("sample.guidance_scale=.inf", "sample.guidance_scale"),
    ("evaluate.lr=-1", "evaluate.lr"),
    ("evaluate.resolution=-5", "evaluate.resolution"),
    ("ray.num_cpus=-1", "ray.num_cpus"),
    ("finetune.max_failures=-1", "finetune.max_failures"),
    ("evaluate.seeds=[0, 0]", "evaluate.seeds"),
    ("sample.classes=[]", "sample.classes"),
    ("evaluate.teacher_arch=nope", "evaluate.teacher_arch"),
    ("output=s3://KEY:SECRET@bucket/x", "output"),
    ("data.channels=true", "data.channels"),
    ("evaluate.methods=[distilled]", "evaluate.methods"),
    ("evaluate.ipcs=[50]", "evaluate.ipcs"),  # more than sample.ipc
    ("finetune.num_workers=3", "finetune.global_batch_size"),
])
def test_the_reviewed_holes_are_closed(override, field):
    """Each was accepted by `mmdist config` before the checks were declared on the fields."""
    with pytest.raises(ConfigError) as e:
        C.apply_overrides(C.Config(), [override])
    assert str(e.value).startswith(field) and "SECRET" not in str(e.value), str(e.value)


@pytest.mark.parametrize("override", ["sample.ipc=s3://AKIA:wJalr@b/x", "evaluate.seeds=[s3://AKIA:wJalr@b/x]",
                                      "finetune.minimax=s3://AKIA:wJalr@b/x"])
def test_a_credential_given_to_any_field_is_not_echoed(override):
    with pytest.raises(ConfigError) as e:
        C.apply_overrides(C.Config(), [override])
    assert "wJalr" not in str(e.value) and "s3://b/x" in str(e.value), str(e.value)


@pytest.mark.parametrize("overrides, field", [
    (["evaluate.ipcs=[50]", "sample.ipc=50"], "evaluate.ipcs: IPC 50 is larger than data.max_per_class=48"),
])
def test_stage_spanning_checks_refuse_before_ray_starts(overrides, field, tmp_path):
    """`mmdist run --smoke evaluate.ipcs=[50]` used to fail only after sampling."""
    from mmdist import run
    from mmdist.presets import smoke

    # each stage alone is fine; were the check missing, encode would fail at once on the missing data
    cfg = C.apply_overrides(smoke(), [*overrides, f"output={tmp_path}", f"data.train={tmp_path}/none",
                                      "data.download=false"])
    with pytest.raises(ConfigError, match="^" + field.replace("[", r"\[").replace(".", r"\.")):
        run.main(cfg)  # ... the run is refused before its first stage
