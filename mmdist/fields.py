"""Config fields that declare their own checks: ``opt(default, doc, ge=1)``.

Every field of a config dataclass is made by ``opt``, which records the documentation and the
field's constraints in ``metadata``; ``check_fields`` enforces them for any section, so a new
field declares its range, finiteness or registry in one place and no hand-written check can be
forgotten. ``coerce`` turns YAML/JSON values into the annotated types. Every error is one line
that starts with the dotted field name and never echoes a credential.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from mmdist.errors import ConfigError

INT_LIMIT = 2**63 - 1  # every int ends up in numpy/torch/Arrow int64
KINDS = ("uri", "text")  # what a free string field holds: a path/URI/hub id, or a name/label


@dataclass(frozen=True)
class Checks:
    """The constraints a field declares (``None``: not constrained that way)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    finite: bool = True  # floats only: NaN and ±Inf are refused
    registry: Callable[[str], None] | None = None  # raises KeyError/ValueError for an unknown name
    kind: str | None = None  # one of KINDS for strings that are not registry names
    nonempty: bool = False  # sequences
    unique: bool = False  # sequences

    @property
    def bounded(self) -> bool:
        """Whether a lower bound is declared (every numeric field needs one)."""
        return self.ge is not None or self.gt is not None


def opt(default: Any, doc: str, result: bool = True, **checks: Any) -> Any:
    """A dataclass field with a default, its documentation and its declared ``Checks``.

    ``result=False`` marks a field that says only how a stage runs (actor counts, retries,
    checkpoint spacing), not what it makes: the same artifact comes out byte for byte whatever its
    value, so fingerprints leave it out and changing it reuses finished work.
    """
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults so configs stay hashable and frozen")
    if checks.get("kind") not in (None, *KINDS):
        raise TypeError(f"kind must be one of {KINDS}")
    meta = {"doc": doc, "checks": Checks(**checks), "result": result}
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


def _show(value: Any) -> str:
    """A value for an error line: repr without URI credentials, capped."""
    import re

    from mmdist.storage import redact

    text = re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]*", lambda m: redact(m.group(0)), repr(value))
    return text if len(text) <= 80 else text[:77] + "..."


# ----------------------------------------------------------------------------------------------
# Checking a constructed section
# ----------------------------------------------------------------------------------------------


def check_fields(obj: Any, section: str) -> None:
    """Enforce every field's declared ``Checks`` on a constructed config section."""
    for f in dataclasses.fields(obj):
        checks = f.metadata.get("checks")
        if checks is not None:
            check_value(f"{section}.{f.name}" if section else f.name, getattr(obj, f.name), checks)


def check_value(name: str, value: Any, c: Checks) -> None:
    """Check one field value (a scalar, or each item of a tuple) against its Checks."""
    if value is None or dataclasses.is_dataclass(value):
        return
    if isinstance(value, tuple):
        if c.nonempty and not value:
            raise ConfigError(f"{name}: must not be empty")
        if c.unique and len(set(value)) != len(value):
            dup = next(v for i, v in enumerate(value) if v in value[:i])
            raise ConfigError(f"{name}: {_show(dup)} appears twice (entries must be unique)")
        for item in value:
            check_value(name, item, c)
        return
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        _check_number(name, value, c)
    elif isinstance(value, str):
        _check_string(name, value, c)


def _check_number(name: str, value: float, c: Checks) -> None:
    """Finiteness, the int64 range and the declared bounds."""
    if isinstance(value, float) and not math.isfinite(value):
        if c.finite:
            raise ConfigError(f"{name}: must be a finite number, got {value}")
        return
    if isinstance(value, int) and abs(value) > INT_LIMIT:
        raise ConfigError(f"{name}: {_show(value)} is outside the 64-bit integer range")
    for bound, ok, word in ((c.ge, lambda b: value >= b, ">="), (c.gt, lambda b: value > b, ">"),
                            (c.le, lambda b: value <= b, "<="), (c.lt, lambda b: value < b, "<")):
        if bound is not None and not ok(bound):
            raise ConfigError(f"{name}: must be {word} {bound}, got {_show(value)}")


def _check_string(name: str, value: str, c: Checks) -> None:
    """Printable text; registry names exist; URIs carry no credentials."""
    if not value.isprintable():
        raise ConfigError(f"{name}: has control or unprintable characters")
    if c.registry is not None:
        try:
            c.registry(value)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"{name}: {e.args[0] if e.args else _show(value)}") from None
    if c.kind == "uri":
        from mmdist.storage import credentials_in

        where = credentials_in(value)
        if where:
            # the value is not echoed: it holds a secret
            raise ConfigError(f"{name}: refused a URI with credentials in its {where}; give credentials "
                              "through the storage client's own chain (environment, profile, instance role)")


# ----------------------------------------------------------------------------------------------
# YAML/JSON values -> annotated types
# ----------------------------------------------------------------------------------------------


def coerce(tp: Any, value: Any, name: str, build: Callable[[type, dict, str], Any]) -> Any:
    """Check ``value`` against the annotation ``tp``; lists become tuples and ints floats.

    ``build(cls, raw, prefix)`` builds nested dataclass sections.
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(option, value, name, build)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: {_show(value)} matches none of {options}")
    if origin is Literal:
        choices = typing.get_args(tp)
        # type-exact: `true` is not the channel count 1
        if not any(type(value) is type(c) and value == c for c in choices):
            raise ConfigError(f"{name}: {_show(value)} is not one of {list(choices)}")
        return value
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {_show(value)}")
        return tuple(coerce(item_tp, v, f"{name}[{i}]", build) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {_show(value)}")
        return build(tp, value, f"{name}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true/false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {_show(value)}")
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{name}: {_show(value)} is too large for a float") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {_show(value)}")
        return value
    raise TypeError(f"unsupported config annotation {tp} for {name}")
