"""Argument checks before any work: one rule type, one message per kind of mistake.

The same `Rule` checks a public API argument (the message names the argument:
`batch_size=0: must be an int >= 1`) and an experiment's config field (the message names
the flag: `--batch-size 0: must be an int >= 1`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

BAD_ARGUMENT = "{name}={value!r}: must be {want}"
BAD_FLAG = "--{flag} {value}: must be {want}"


class Rule(NamedTuple):
    """What a value must be: its type, and optionally bounds or a set of choices."""

    kind: type  # int, float (ints accepted), str, bool
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # `>` rather than `>=`
    high_open: bool = False  # `<` rather than `<=`
    choices: Sequence[Any] = ()
    optional: bool = False  # None allowed

    def want(self) -> str:
        """The rule in words: 'an int >= 1', 'a number in [0, 1)', "one of 'a', 'b'"."""
        if self.choices:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            text = {int: "an int", float: "a finite number", str: "a string", bool: "a bool"}[
                self.kind
            ]
            if self.low is not None and self.high is not None:
                lo, hi = "(" if self.low_open else "[", ")" if self.high_open else "]"
                text += f" in {lo}{self.low:g}, {self.high:g}{hi}"
            elif self.low is not None:
                text += f" {'>' if self.low_open else '>='} {self.low:g}"
            elif self.high is not None:
                text += f" {'<' if self.high_open else '<='} {self.high:g}"
        return text + (" (or none)" if self.optional else "")

    def ok(self, value: Any) -> bool:
        """Whether `value` satisfies the rule."""
        if value is None:
            return self.optional
        if self.choices:
            return value in self.choices
        if self.kind in (int, float):
            if isinstance(value, (bool, np.bool_)):
                return False
            kinds = (int, np.integer) if self.kind is int else (int, float, np.integer, np.floating)
            if not isinstance(value, kinds) or not math.isfinite(value):
                return False
            if self.low is not None and (value <= self.low if self.low_open else value < self.low):
                return False
            return not (
                self.high is not None
                and (value >= self.high if self.high_open else value > self.high)
            )
        return isinstance(value, self.kind)


POSITIVE_INT = Rule(int, low=1)
NONNEGATIVE_INT = Rule(int, low=0)
POSITIVE = Rule(float, low=0, low_open=True)
NONNEGATIVE = Rule(float, low=0)
FRACTION = Rule(float, low=0, high=1, high_open=True)  # a held-out share, a momentum
PROBABILITY = Rule(float, low=0, high=1)


def check_argument(name: str, value: Any, rule: Rule) -> None:
    """Raises ValueError naming the API argument when `value` breaks `rule`."""
    if not rule.ok(value):
        raise ValueError(BAD_ARGUMENT.format(name=name, value=value, want=rule.want()))


# The fields most experiments share, by name (a config without the field ignores its rule).
TRAINING_CHECKS = {
    "epochs": POSITIVE_INT,
    "batch_size": POSITIVE_INT,
    "learning_rate": POSITIVE,
    "momentum": FRACTION,
    "decay": NONNEGATIVE,
    "weight_decay": NONNEGATIVE,
    "l1": NONNEGATIVE,
    "validation_split": FRACTION,
    "test_split": FRACTION,
    "microbatches": POSITIVE_INT,
    "ema_decay": Rule(float, low=0, high=1, high_open=True),
}

# The flags of `run.RunConfig` (devices, cadences, checkpoints), also of configs that repeat them.
RUN_CHECKS = {
    "devices": Rule(int, low=1, optional=True),
    "sharding": Rule(str, choices=("replicated", "fsdp")),
    "steps_per_dispatch": Rule(int, low=1, optional=True),
    "input": Rule(str, choices=("auto", "resident", "stream")),
    "log_every_steps": POSITIVE_INT,
    "checkpoint_every_steps": NONNEGATIVE_INT,
    "checkpoint_every_minutes": NONNEGATIVE,
    "keep_checkpoints": POSITIVE_INT,
    "keep_best": NONNEGATIVE_INT,
    "best_mode": Rule(str, choices=("min", "max")),
    "early_stop_patience": NONNEGATIVE_INT,
    "early_stop_min_delta": NONNEGATIVE,
}
