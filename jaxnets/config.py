"""Frozen dataclass configs and their command-line flags (every field is a flag)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

from jaxnets.checks import BAD_FLAG, Rule

C = TypeVar("C")

_SCALARS = (bool, int, float, str)


def _field_type(cls: type, field: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(cls)
    return hints[field.name]


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _parser_for(tp: Any, optional: bool):
    if tp is bool:
        raise AssertionError("bool handled by BooleanOptionalAction")
    if tp in (int, float, str):

        def parse(text: str):
            if optional and text.lower() in ("none", ""):
                return None
            return tp(text)

        return parse
    origin = typing.get_origin(tp)
    if origin is tuple:
        (elem, *rest) = typing.get_args(tp)
        if elem not in (int, float, str):
            raise TypeError(f"unsupported tuple element type {elem!r}")

        def parse_tuple(text: str):
            if optional and text.lower() == "none":
                return None
            return tuple(elem(t) for t in text.split(",") if t.strip())

        return parse_tuple
    raise TypeError(f"config field type {tp!r} cannot be set from the command line")


def add_config_flags(parser: argparse.ArgumentParser, config: Any) -> None:
    """Adds one `--field-name` flag per field of the dataclass instance `config`.

    Booleans get `--name/--no-name`; tuples take comma-separated values; `Optional`
    fields accept `none`. The help text comes from `field.metadata["help"]`.
    """
    cls = type(config)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        tp, optional = _unwrap_optional(_field_type(cls, field))
        default = getattr(config, field.name)
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata.get("help", "")
        help_text = f"{help_text} (default: {default!r})".strip()
        if tp is bool:
            parser.add_argument(
                flag,
                dest=field.name,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=help_text,
            )
        elif callable(default) and tp not in _SCALARS and typing.get_origin(tp) is not tuple:
            continue  # callables are set in code, not on the command line
        else:
            parser.add_argument(
                flag,
                dest=field.name,
                type=_parser_for(tp, optional),
                default=default,
                metavar=field.name.upper(),
                help=help_text,
            )


def parse_config(config: C, argv: Sequence[str] | None = None, *, description: str = "") -> C:
    """Returns `config` with the fields given as flags in `argv` replaced.

    Example:
        >>> @dataclasses.dataclass(frozen=True)
        ... class Config:
        ...     learning_rate: float = 0.1
        ...     nesterov: bool = False
        >>> parse_config(Config(), ["--learning-rate", "0.5", "--nesterov"])
        Config(learning_rate=0.5, nesterov=True)
    """
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_flags(parser, config)
    args = parser.parse_args(argv)
    try:
        return dataclasses.replace(config, **vars(args))  # type: ignore[type-var]
    except ValueError as e:  # check_config in the config's __post_init__
        parser.error(str(e))  # exits 2 with the usage line, before any work


def _type_rule(tp: Any) -> Rule | None:
    tp, optional = _unwrap_optional(tp)
    if tp in (int, float, str, bool):
        return Rule(tp, optional=optional)
    return None


def check_config(config: Any) -> None:
    """Raises ValueError naming every flag of `config` whose value is wrong, and why.

    Each field is checked against its type (an `int` field refuses 2.5 and True, a `float`
    field refuses NaN) and against the `Rule`s in the `CHECKS` class attributes of the
    config's classes (a subclass adds to, or overrides, its bases'). Tuple fields check
    each element. Call it from the config's `__post_init__`, so that a config built in code
    (`dataclasses.replace`) is checked as a parsed one is.
    """
    cls = type(config)
    rules: dict[str, Rule] = {}
    for base in reversed(cls.__mro__):
        rules.update(vars(base).get("CHECKS", {}))
    hints = typing.get_type_hints(cls)
    problems = []
    for field in dataclasses.fields(cls):
        value = getattr(config, field.name)
        tp, optional = _unwrap_optional(hints[field.name])
        values = [value]
        if typing.get_origin(tp) is tuple and isinstance(value, tuple):
            values, tp = list(value), typing.get_args(tp)[0]
        for rule in (rules.get(field.name), _type_rule(tp)):
            if rule is None:
                continue
            if optional and not rule.optional:
                rule = rule._replace(optional=True)
            bad = [v for v in values if not rule.ok(v)]
            if bad:
                flag = field.name.replace("_", "-")
                shown = ",".join(map(str, values)) if len(values) != 1 else bad[0]
                problems.append(BAD_FLAG.format(flag=flag, value=shown, want=rule.want()))
                break
    if problems:
        raise ValueError("; ".join(problems))


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-serialisable dict of the config (callables by their qualified name)."""
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if callable(value):
            value = f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', value)}"
        elif isinstance(value, tuple):
            value = list(value)
        out[field.name] = value
    return out


def config_to_json(config: Any) -> str:
    return json.dumps(config_to_dict(config), indent=2, sort_keys=True)


def config_diff(saved: dict[str, Any], current: dict[str, Any], keys: Sequence[str] | None = None):
    """Lists `(field, saved_value, current_value)` for every field that differs.

    Args:
      saved: a dict from `config_to_dict` (e.g. read back from a run's `config.json`).
      current: the same for the config of this run.
      keys: only compare these fields (default: the union of both).
    """
    names = sorted(set(saved) | set(current)) if keys is None else list(keys)
    return [(k, saved.get(k), current.get(k)) for k in names if saved.get(k) != current.get(k)]
