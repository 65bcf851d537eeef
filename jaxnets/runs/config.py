"""Frozen dataclass configs and their command-line flags (every field is a flag)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import re
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from jaxnets.core.checks import BAD_FLAG, Rule

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


_WORDS = {int: "whole number", float: "number", str: "string"}
_EXAMPLES = {int: "2", float: "0.5", str: "a"}


def _not_a(text: str, tp: type, optional: bool) -> str:
    """The error of a flag value that is not of the field's type: what it must be, an example."""
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    hint = f" (the nearest is {round(number)})" if tp is int and math.isfinite(number) else ""
    none = " or none" if optional else ""
    return f"{text!r} is not a {_WORDS[tp]}{none}{hint}, e.g. {_EXAMPLES[tp]}"


def _parser_for(tp: Any, optional: bool):
    if tp is bool:
        raise AssertionError("bool handled by BooleanOptionalAction")
    if tp in (int, float, str):

        def parse(text: str):
            if optional and text.lower() in ("none", ""):
                return None
            try:
                return tp(text)
            except ValueError:
                raise argparse.ArgumentTypeError(_not_a(text, tp, optional)) from None

        return parse
    origin = typing.get_origin(tp)
    if origin is tuple:
        (elem, *rest) = typing.get_args(tp)
        if elem not in (int, float, str):
            raise TypeError(f"unsupported tuple element type {elem!r}")

        def parse_tuple(text: str):
            if optional and text.lower() == "none":
                return None
            try:
                return tuple(elem(t) for t in text.split(",") if t.strip())
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"{text!r} is not a comma-separated list of {_WORDS[elem]}s, e.g. "
                    f"{_EXAMPLES[elem]},{_EXAMPLES[elem]}"
                ) from None

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


def flags_of(text: str, config: Any) -> str:
    """`text` (a library error) with the arguments that are fields of `config` written as its
    flags: `batch_size=96` -> `--batch-size 96`, `restart=True` -> `--restart`,
    `workdir=<directory>` -> `--workdir <directory>`.

    The library's errors name arguments, never an experiment's flags; an experiment, whose
    config fields are its flags, says them in its own words (`errors_in_flags`).
    """
    for field in dataclasses.fields(config):
        name, flag = field.name, "--" + field.name.replace("_", "-")
        text = re.sub(rf"(?<![\w.'\"-]){name}=True\b", flag, text)
        text = re.sub(rf"(?<![\w.'\"-]){name}=False\b", "--no-" + flag[2:], text)
        text = re.sub(rf"(?<![\w.'\"-]){name}=('[^']*'|\"[^\"]*\"|[^\s,;)]+)", _as_flag(flag), text)
    return text


def _as_flag(flag: str) -> Callable[[re.Match], str]:
    """The replacement of a `name=value` match by `--flag value`."""

    def replace_fn(match: re.Match) -> str:
        return f"{flag} {_flag_value(match.group(1))}"

    return replace_fn


def _flag_value(value: str) -> str:
    if value[:1] in "'\"":
        inner = value[1:-1]
        return inner if inner and not re.search(r"\s", inner) else value
    return value.removesuffix(".") + ("." if value.endswith(".") else "")


def errors_in_flags(main: Callable[..., Any]) -> Callable[..., Any]:
    """Decorates an experiment's `main(config)`: the errors it raises say the config's flags
    (`flags_of`) where the library named the arguments they set."""

    @functools.wraps(main)
    def wrapper(config: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return main(config, *args, **kwargs)
        except Exception as error:
            _translate(error, config)
            raise

    return wrapper


def _translate(error: Exception, config: Any) -> None:
    if isinstance(error, OSError) and isinstance(error.strerror, str):
        error.strerror = flags_of(error.strerror, config)
    elif len(error.args) == 1 and isinstance(error.args[0], str):
        error.args = (flags_of(error.args[0], config),)
