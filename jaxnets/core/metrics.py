"""Metrics as mergeable sums: computed per step on the device, added up anywhere, read on the host.

A metric value is a small pytree of additive leaves (a total and a count, a confusion count)
with a `compute()` method that turns it into a number; like CLU's metrics, two values of the
same metric merge by adding their leaves, so per-step values add up over steps (on the host),
over devices (`lax.psum`) and over evaluation batches with one rule (`merge`). Sums are kept
in float32 whatever the model's dtype (bfloat16 sums lose digits after a few hundred steps).

A metric function, as the adapters take them, is `(outputs, targets, mask) -> value`: either
a `Metric` or a per-example array `[batch]`, which becomes `Mean` over the unmasked examples.

Example:
    >>> import jax.numpy as jnp
    >>> logits, labels = jnp.array([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]]), jnp.array([0, 0, 0])
    >>> m = accuracy(logits, labels, jnp.array([True, True, False]))
    >>> float(m.compute()), float(merge(m, m).count)
    (0.5, 4.0)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxnets.core.types import Array

SUM_DTYPE = jnp.float32


class Metric(Protocol):
    """What a metric value is: a pytree of additive leaves with `compute()`."""

    def compute(self) -> Any: ...


class Mean(NamedTuple):
    """The mean of per-example values: `total / count` (NaN for no examples)."""

    total: Array  # float32 []
    count: Array  # type: ignore[assignment]  # float32 [] (a field named like tuple.count)

    def compute(self) -> Any:
        total, count = np.asarray(self.total, np.float64), np.asarray(self.count, np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, total / count, np.nan)

    @classmethod
    def from_values(cls, values: Array, mask: Array | None = None) -> Mean:
        """Mean of `values` ([batch] or [batch, ...]: averaged per example) where `mask`."""
        values = jnp.asarray(values, SUM_DTYPE)
        if values.ndim > 1:
            values = values.reshape(values.shape[0], -1).mean(-1)
        if mask is None:
            return cls(jnp.sum(values), jnp.asarray(values.size, SUM_DTYPE))
        mask = jnp.asarray(mask, bool)
        return cls(jnp.sum(jnp.where(mask, values, 0.0)), jnp.sum(mask, dtype=SUM_DTYPE))

    @classmethod
    def from_scalar(cls, value: Array, weight: Array | float = 1.0) -> Mean:
        """A scalar (e.g. a batch's weighted-mean loss) counted with `weight`."""
        weight = jnp.asarray(weight, SUM_DTYPE)
        return cls(jnp.asarray(value, SUM_DTYPE) * weight, weight)


def merge(a: Any, b: Any) -> Any:
    """Adds two metric values (or two dicts of them) leaf by leaf."""
    return jax.tree.map(lambda x, y: x + y, a, b)


def sum_steps(values: Any) -> Any:
    """Host sums over a leading `[steps]` axis of every leaf, in float64 (exact counts)."""
    return jax.tree.map(lambda x: np.sum(np.asarray(x, np.float64), axis=0), values)


def compute(values: Mapping[str, Metric]) -> dict[str, float]:
    """`{name: float(value.compute())}` of a dict of (host) metric values."""
    out = {}
    for name, value in values.items():
        result = value.compute()
        out[name] = float(result) if np.ndim(result) == 0 else np.asarray(result).tolist()
    return out


def as_metric(value: Any, mask: Array | None, name: str, *, batch: int | None = None) -> Metric:
    """A metric function's result as a `Metric`: per-example arrays `[batch, ...]` become `Mean`.

    A scalar, or an array whose leading axis is not the batch's (e.g. `[1]`, a batch mean
    kept as an array), is refused: it cannot leave out the padding of the last evaluation
    batch, so it would be averaged with it.
    """
    if hasattr(value, "compute"):
        return value
    value = jnp.asarray(value)
    if value.ndim == 0:
        raise ValueError(
            f"metric {name!r} returned a scalar; return per-example values [batch] (averaged "
            "for you) or a Metric such as metrics.Mean(total, count)"
        )
    if mask is not None and batch is None:
        batch = mask.shape[0]
    if batch is not None and value.shape[0] != batch:
        raise ValueError(
            f"metric {name!r} returned shape {tuple(value.shape)} for a batch of {batch}: not "
            f"per-example values [{batch}], so the padding of the last evaluation batch could "
            "not be left out; return per-example values (averaged for you, without the "
            "padding) or a Metric such as metrics.Mean(total, count)"
        )
    return Mean.from_values(value, mask)


def _labels(targets: Array, logits: Array) -> Array:
    """Class ids of integer labels or of one-hot / probability targets."""
    targets = jnp.asarray(targets)
    if targets.ndim == logits.ndim and jnp.issubdtype(targets.dtype, jnp.floating):
        return jnp.argmax(targets, -1)
    return targets.reshape(logits.shape[:-1])


def accuracy(logits: Array, targets: Array, mask: Array | None = None) -> Mean:
    """Fraction of examples whose largest score is the label.

    Args:
      logits: [batch, num_classes] scores.
      targets: [batch] int class ids, or [batch, num_classes] one-hot.
      mask: [batch] bool, False for padding.
    """
    return Mean.from_values(jnp.argmax(logits, -1) == _labels(targets, logits), mask)


def top_k_accuracy(k: int) -> Callable[[Array, Array, Array | None], Mean]:
    """A metric: the label is among the `k` largest scores (ties broken by `lax.top_k`)."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k_accuracy(k={k!r}): k must be an int >= 1")

    def metric_fn(logits, targets, mask=None):
        if k > logits.shape[-1]:
            raise ValueError(f"top_k_accuracy(k={k}) with only {logits.shape[-1]} classes")
        _, top = jax.lax.top_k(logits, k)
        hit = jnp.any(top == _labels(targets, logits)[..., None], axis=-1)
        return Mean.from_values(hit, mask)

    return metric_fn


def _regression(predictions: Array, targets: Array, name: str) -> Array:
    predictions, targets = jnp.asarray(predictions), jnp.asarray(targets)
    if predictions.shape != targets.shape:
        raise ValueError(
            f"{name}: predictions {predictions.shape} and targets {targets.shape} differ in "
            "shape; reshape the targets (e.g. y[:, None] for one output)"
        )
    return predictions - targets


def mean_squared_error(predictions: Array, targets: Array, mask: Array | None = None) -> Mean:
    """Mean over examples of the squared error, averaged over output dims."""
    return Mean.from_values(jnp.square(_regression(predictions, targets, "mse")), mask)


def mean_absolute_error(predictions: Array, targets: Array, mask: Array | None = None) -> Mean:
    """Mean over examples of the absolute error, averaged over output dims."""
    return Mean.from_values(jnp.abs(_regression(predictions, targets, "mae")), mask)
