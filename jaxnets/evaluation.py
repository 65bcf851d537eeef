"""Evaluation: a data set's metrics for a train state, the data resident or streamed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxnets import inputs, parallel, train
from jaxnets import metrics as jmetrics


class Evaluation(NamedTuple):
    """What `fit` needs to evaluate: a runner and the data (device-resident or a stream)."""

    dp: parallel.DataParallel
    run: Callable  # (state, data, idx) -> metrics
    data: Any  # replicated batch pytree, or an `inputs.Stream`
    idx: Any  # sharded eval_indices (resident) or this process's host eval_indices (stream)


EVAL_STEPS_PER_CALL = 50  # streamed evaluation: batches per device call


def make_evaluation(
    eval_step: Callable,
    dp: parallel.DataParallel,
    data: Any,
    *,
    batch_size: int,
    input: str = "auto",
) -> Evaluation:
    """An evaluation set, padded to whole global batches: put on the devices, or streamed.

    Args:
      data: a batch pytree, an `inputs.Stream` or a random-access source (as `fit`'s).
      input: "auto", "resident" or "stream" (`inputs.resolve`); the metrics agree (sums
        are only added in another order).
    """
    dp.check_batch(batch_size)
    data = inputs.resolve(data, dp, input)
    if isinstance(data, inputs.Stream):
        idx = dp.process_columns(train.eval_indices(len(data), batch_size))
        return Evaluation(dp, _streamed_eval(eval_step, dp), data, idx)
    n = train.num_examples(data, "evaluation data")
    idx = dp.shard_columns(dp.process_columns(train.eval_indices(n, batch_size)))
    on_device = dp.replicate(data)
    return Evaluation(dp, train.make_eval_runner(eval_step, dp), on_device, idx)


def _streamed_eval(eval_step: Callable, dp: parallel.DataParallel) -> Callable:
    runner = train.make_stream_eval_runner(eval_step, dp)

    def run_fn(state, stream: inputs.Stream, idx: np.ndarray):
        batches = stream.batches(np.maximum(idx, 0), 0)
        total = None
        for lo in range(0, len(idx), EVAL_STEPS_PER_CALL):
            rows = idx[lo : lo + EVAL_STEPS_PER_CALL]
            chunk = [next(batches)[0] for _ in range(len(rows))]
            batch, mask = dp.shard_columns(inputs._stack(chunk)), dp.shard_columns(rows >= 0)
            sums = _host_sums(dp, runner(state, batch, mask))
            total = sums if total is None else jax.tree.map(np.add, total, sums)
        batches.close()
        return total

    return run_fn


def evaluate(evaluation: Evaluation, state: train.TrainState) -> dict[str, float]:
    """Every metric of `state` (a plain train state) on an `Evaluation`'s data, on the host."""
    return _evaluate_replicated(evaluation, evaluation.dp.replicate(state))


def _evaluate_replicated(evaluation: Evaluation, state: train.TrainState) -> dict[str, float]:
    sums = evaluation.run(state, evaluation.data, evaluation.idx)
    if not isinstance(evaluation.data, inputs.Stream):  # the streamed run sums on the host
        sums = _host_sums(evaluation.dp, sums)
    return jmetrics.compute(sums)


def _host_sums(dp: parallel.DataParallel, sums: Any) -> Any:
    return jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(dp.unreplicate(sums)))
