"""Evaluation outside `fit`: a data set's metrics for a train state (the feed's own program).

Inside `fit`, pass `hooks.Evaluate(eval_step, data, batch_size=...)` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from jaxnets.core import metrics as jmetrics
from jaxnets.engine import feeds, sharding, train


class Evaluation(NamedTuple):
    """An evaluation set ready to run: the eval step and its feed."""

    eval_step: Callable
    feed: feeds.Feed


def make_evaluation(
    eval_step: Callable,
    data: Any,
    *,
    batch_size: int,
    mesh: Any = None,
    input: str = "auto",
) -> Evaluation:
    """An evaluation set, padded to whole global batches: put on the devices, or streamed.

    Args:
      eval_step: `train.make_eval_step(eval_fn)`.
      data: a batch pytree, an `inputs.Stream` or a random-access source (as `fit`'s).
      batch_size: the global batch (the last one is padded and the padding masked).
      mesh: the devices (default: all).
      input: "auto", "resident" or "stream": the metrics agree (sums added in another order).
    """
    mesh = sharding.make_mesh() if mesh is None else mesh
    feed = feeds.make_feed(data, mesh, batch_size=batch_size, input=input, what="evaluation data")
    return Evaluation(eval_step, feed)


def evaluate(evaluation: Evaluation, state: train.TrainState) -> dict[str, Any]:
    """Every metric of `state` on an `Evaluation`'s data, as host values."""
    mesh = evaluation.feed.mesh
    placed = sharding.place(state, sharding.state_shardings(state, mesh))
    return jmetrics.compute(evaluation.feed.evaluate(evaluation.eval_step, placed))
