"""`fit()`: a short host loop over the public parts of `jaxnets.train`, with periodic actions.

What the loop decides, and why it cannot change the numbers:
- **Device calls.** Steps run in chunks of `k` scanned steps per call from each epoch's
  start (the epoch's remainder as one shorter chunk), every program compiled before the
  first step. Nothing else cuts a chunk: logging splits the per-step metrics that come out
  of the scan into windows afterwards; checkpoints and signals wait for the next chunk
  boundary. So the numbers depend on `k` alone, not on any log, save or stop cadence.
- **k, when not given, is measured**: a chunk of 1 and of `k` steps are timed on a copy of
  the state before training, and the faster kept. Scanning may round differently from
  single steps, so the choice is recorded: in the work directory (a resumed run uses the
  choice of the run it continues) and in the jaxnets cache, keyed by the compiled program
  and the devices (the same command on the same machine makes the same choice).
- Everything else (progress, logs, checkpoints) happens between device calls, on the host;
  the metrics of a chunk are read back while the next chunk runs.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxnets import dispatch, inputs, parallel, train
from jaxnets import metrics as jmetrics
from jaxnets.checks import POSITIVE_INT, Rule, check_argument
from jaxnets.evaluation import Evaluation, _evaluate_replicated, evaluate, make_evaluation
from jaxnets.types import Batch, PRNGKey

__all__ = ["Evaluation", "FitResult", "Hooks", "Periodic", "evaluate", "fit", "make_evaluation"]

log = logging.getLogger("jaxnets.loop")

CHOICE_FILE = "steps_per_call.json"
_now = time.monotonic  # the clock of `every_seconds` (replaceable in tests)
NONFINITE = ("raise", "warn", "ignore")


class Periodic(NamedTuple):
    """When an action runs: every N steps, every T seconds, at epoch ends, on a stop signal.

    Actions run between device calls, at the first chunk boundary at or after they fall due
    (`every_steps`: once a multiple of N has been passed); they never cut a chunk, so they
    cannot change the numbers. With `steps_per_dispatch` dividing N, they run at exactly
    the multiples of N.
    """

    fn: Callable[[int, train.TrainState], None]  # (step, state as a checkpoint holds it)
    every_steps: int = 0
    every_seconds: float = 0.0
    at_epoch_end: bool = False
    on_stop: bool = False


def _check_periodic(action: Periodic) -> None:
    if not callable(action.fn):
        raise TypeError(f"Periodic.fn must be a function (step, state), got {action.fn!r}")
    if not (isinstance(action.every_steps, int) and action.every_steps >= 0):
        raise ValueError(f"every_steps={action.every_steps!r}; use an int >= 0 (0: off)")
    if not action.every_seconds >= 0:
        raise ValueError(f"every_seconds={action.every_seconds!r}; use a number >= 0 (0: off)")


class _Timers:
    """Last run time per action (monotonic seconds)."""

    def __init__(self, actions: Sequence[Periodic]):
        now = _now()
        self.last = [now] * len(actions)

    def due(self, i: int, action: Periodic, step: int, c: int, epoch_end: bool) -> bool:
        """Whether `action` runs after a chunk of `c` steps that ended at `step`."""
        now = _now()
        n = action.every_steps
        due = (
            (n and step // n != (step - c) // n)
            or (action.at_epoch_end and epoch_end)
            or (action.every_seconds and now - self.last[i] >= action.every_seconds)
        )
        if due:
            self.last[i] = now
        return bool(due)


def chunk_plan(start: int, stop: int, k: int) -> list[int]:
    """Chunk lengths from position `start` to `stop` (the epoch's length) of an epoch.

    Chunks of `k` from the epoch's start, the remainder `stop % k` as one chunk. Nothing
    else cuts a chunk (logs, checkpoints and signals wait for the next boundary), so the
    calls, and with them the rounding, depend only on `k`: a run with any log or save
    cadence, and a resumed run, make the calls of an uninterrupted one. A start that is
    not a boundary (a resume with another `k`) is reached with single steps.
    """
    plan, pos = [], start
    to_boundary = min(-pos % k, stop - pos)
    plan += [1] * to_boundary
    pos += to_boundary
    plan += [k] * ((stop - pos) // k)
    if (stop - pos) % k:
        plan.append((stop - pos) % k)
    return plan


class Hooks(NamedTuple):
    """Optional host-side functions `fit` calls; none of them changes what a step computes.

    Attributes:
      on_log: `(record)` at each log point (`record["kind"] == "train"`) and after each
        epoch's evaluation (`"epoch"`).
      should_stop: `() -> bool`, polled at chunk boundaries (preemption).
      progress: `(epoch, steps_per_epoch, start_in_epoch) -> bar` with `update(n, **postfix)`
        and `close()`; None for no progress bar.
    """

    on_log: Callable[[dict], None] | None = None
    should_stop: Callable[[], bool] | None = None
    progress: Callable[..., Any] | None = None


class FitResult(NamedTuple):
    state: train.TrainState  # plain (device 0's copy): what a checkpoint saves
    history: list[dict]  # one record per epoch
    stopped_early: bool
    steps_per_call: int  # the chunk length used


def _check_fit_args(
    data_key, epochs, batch_size, log_every_steps, steps_per_dispatch, on_nonfinite
):
    train.check_key(data_key, "data_key")
    check_argument("epochs", epochs, POSITIVE_INT)
    check_argument("batch_size", batch_size, POSITIVE_INT)
    check_argument("log_every_steps", log_every_steps, POSITIVE_INT)
    check_argument("steps_per_dispatch", steps_per_dispatch, Rule(int, low=1, optional=True))
    check_argument("on_nonfinite", on_nonfinite, Rule(str, choices=NONFINITE))


def fit(
    state: train.TrainState,
    train_step: Callable,
    dp: parallel.DataParallel,
    train_data: Batch | inputs.Stream | Any,
    *,
    data_key: PRNGKey,
    epochs: int,
    batch_size: int,
    input: str = "auto",
    evaluation: Evaluation | None = None,
    steps_per_dispatch: int | None = None,
    log_every_steps: int = 10,
    actions: Sequence[Periodic] = (),
    hooks: Hooks = Hooks(),
    on_nonfinite: str = "raise",
    workdir: str | os.PathLike | None = None,
    epoch_indices: Callable[[int], np.ndarray] | None = None,
) -> FitResult:
    """Trains until `epochs` epochs are done, resuming from `state.step`.

    Args:
      state: the TrainState (as `create_train_state` or a checkpoint restore gives it; `fit`
        replicates it over `dp`); its step says where to start.
      train_step: `train.make_train_step(loss_fn, tx, axis_name=dp.axis_name)`.
      dp: the data-parallel plan.
      train_data: the training set: a host batch pytree (`{"image": x, "label": y}`),
        put on the devices once or streamed (`input`); an `inputs.Stream`; or any
        random-access source (`__len__`, `__getitem__`: streamed).
      data_key: key of the data order (epoch e uses `fold_in(data_key, e)`).
      epochs: total epochs (a finished run given more epochs continues).
      batch_size: global batch.
      input: "auto" (resident when the data fits with a margin, else streamed; logged),
        "resident", or "stream" (`jaxnets.inputs`). Both give the same numbers.
      evaluation: evaluated after every epoch (`make_evaluation`); its metrics get `val_`.
      steps_per_dispatch: steps per device call; None: measured (module docstring), or
        `dispatch.scan_candidates` with several processes (they must all make the same
        calls).
      log_every_steps: a "train" record (means over the window) every this many steps.
      actions: `Periodic` actions (checkpoints), run at chunk boundaries.
      hooks: host-side logging, progress and stop hooks.
      on_nonfinite: "raise": a non-finite training loss stops training with
        FloatingPointError naming the step range (checked at log points, no extra sync);
        "warn": log a warning and go on (the optimiser must skip such updates:
        `optax.apply_if_finite`; if the parameters have become non-finite, it did not,
        and FloatingPointError says so); "ignore": go on silently (a sweep, where one diverged
        model must not stop the others).
      workdir: where the measured steps-per-call choice is recorded (for resume).
      epoch_indices: `epoch -> [steps, batch, ...]` example indices (default:
        `train.epoch_indices(data_key, epoch, n, batch_size)`); a sweep gives each model
        its own order `[steps, batch, models]`.

    Returns:
      FitResult(state, history, stopped_early, steps_per_call).
    """
    _check_fit_args(data_key, epochs, batch_size, log_every_steps, steps_per_dispatch, on_nonfinite)
    for action in actions:
        _check_periodic(action)
    data = inputs.resolve(train_data, dp, input)
    if isinstance(data, inputs.Stream):
        n = len(data)
    else:
        n = train.num_examples(data, "training data")
        _check_data_finite(data, "training data")
    dp.check_batch(batch_size)
    steps_per_epoch = n // batch_size
    train.epoch_indices(data_key, 0, n, batch_size)  # validates the batch size
    if epoch_indices is None:
        epoch_indices = lambda epoch: train.epoch_indices(data_key, epoch, n, batch_size)
    step = int(np.max(jax.device_get(state.step)))  # a sweep holds one step per model
    total_steps = epochs * steps_per_epoch
    history: list[dict] = []
    if step >= total_steps:
        return FitResult(state, history, False, steps_per_dispatch or 1)
    feed = inputs.make_feed(data, dp, data_key=data_key, batch_size=batch_size)
    run = feed.runner(train_step)
    state = dp.replicate(state)
    if isinstance(feed, inputs._StreamFeed):
        feed.check_position(step, steps_per_epoch)

    # Every program the plan calls is compiled here, before the first step: none later.
    start_epoch, start_pos = divmod(step, steps_per_epoch)
    first = dp.process_columns(epoch_indices(start_epoch))
    k = min(steps_per_dispatch or dispatch.scan_candidates(dp.devices), steps_per_epoch)

    def compile_for(k):
        lengths = set(chunk_plan(start_pos, steps_per_epoch, k))
        if start_epoch + 1 < epochs:
            lengths |= set(chunk_plan(0, steps_per_epoch, k))
        return {c: run.lower(state, *feed.args(first[:c])) for c in lengths}

    lowered = compile_for(k)
    programs = {c: lo.compile() for c, lo in lowered.items()}
    # With several processes every one must make the same calls: no measured (local) choice.
    if steps_per_dispatch is None and k > 1 and jax.process_count() == 1:
        single = programs.get(1) or run.lower(state, *feed.args(first[:1])).compile()
        k = dispatch.choose_steps_per_call(
            {1: single, k: programs[k]},
            state,
            feed.args,
            first,
            dp,
            key_text=lowered[k].as_text(),
            workdir=workdir,
        )
        if k == 1:
            programs = {1: single}
    timers = _Timers(actions)
    stopping = False
    while step < total_steps and not stopping:
        epoch, pos = divmod(step, steps_per_epoch)
        idx = dp.process_columns(epoch_indices(epoch))
        bar = hooks.progress(epoch, steps_per_epoch, pos) if hooks.progress else None
        logger = _WindowLogger(epoch, step, pos, log_every_steps, hooks, bar, on_nonfinite)
        pending: list[Any] = []  # per-step metrics of chunks not yet read back
        t0 = time.perf_counter()
        plan = chunk_plan(pos, steps_per_epoch, k)
        chunks = feed.chunks(idx, pos, plan)
        ahead = next(chunks)
        for c in plan:
            state, metrics = programs[c](state, *ahead)
            # The host reads and places the next chunk while this one runs.
            ahead = next(chunks, None)
            pos, step = pos + c, step + c
            feed.consumed(step, epoch)
            pending.append(metrics)
            epoch_end = pos == steps_per_epoch
            stopping = bool(hooks.should_stop and hooks.should_stop())
            due = [
                j
                for j, action in enumerate(actions)
                if timers.due(j, action, step, c, epoch_end) or (stopping and action.on_stop)
            ]
            # Metrics are read back one chunk late, while the next chunk runs (the host never
            # stalls the device for a log); all of them at an epoch end, a stop, or before an
            # action (a checkpoint never holds steps the logs lack).
            flush = epoch_end or stopping
            ready = pending if flush or due else pending[:-1]
            if ready:
                logger.add(jax.device_get([dp.unreplicate(m) for m in ready]), flush=flush)
                pending = pending[len(ready) :]
                if logger.warned is not None:  # "warn": were those updates really skipped?
                    _check_skipped(dp.unreplicate(state.params), logger.warned)
                    logger.warned = None
            for j in due:
                actions[j].fn(step, dp.to_checkpoint(state))
            if stopping:
                break
        chunks.close()
        if bar is not None:
            bar.close()
        if stopping and pos != steps_per_epoch:
            return FitResult(dp.to_checkpoint(state), history, True, k)
        record = {"kind": "epoch", "epoch": epoch + 1, "step": step}
        if logger.epoch_sums is not None:
            record.update(jmetrics.compute(logger.epoch_sums))
        record["epoch_seconds"] = time.perf_counter() - t0
        if evaluation is not None:
            val = _evaluate_replicated(evaluation, state)
            record.update({f"val_{name}": v for name, v in val.items()})
        history.append(record)
        if hooks.on_log:
            hooks.on_log(record)
    return FitResult(dp.to_checkpoint(state), history, stopping, k)


class _WindowLogger:
    """Splits per-step metrics into log windows of `every` steps (aligned within the epoch)."""

    def __init__(self, epoch, step, pos, every, hooks, bar, on_nonfinite):
        self.epoch, self.every, self.hooks, self.bar = epoch, every, hooks, bar
        self.on_nonfinite = on_nonfinite
        self.step0 = step - pos  # global step of the epoch's start
        self.pos = pos  # epoch position of the first step in `self.window`
        self.window = None  # stacked per-step host metrics, leading [steps]
        self.epoch_sums = None
        self.warned = None  # (first, last) step of a non-finite loss let through by "warn"

    def add(self, chunks: list, *, flush: bool) -> None:
        chunks = ([self.window] if self.window is not None else []) + list(chunks)
        self.window = jax.tree.map(lambda *xs: np.concatenate(xs), *chunks)
        have = len(jax.tree.leaves(self.window)[0])
        used = 0
        while used < have:
            room = self.every - (self.pos + used) % self.every
            if room > have - used and not flush:
                break
            size = min(room, have - used)
            part = jax.tree.map(lambda x, a=used, b=used + size: x[a:b], self.window)
            self._log(jmetrics.sum_steps(part), self.pos + used, self.pos + used + size)
            used += size
        self.window = jax.tree.map(lambda x: x[used:], self.window) if used < have else None
        self.pos += used

    def _log(self, sums: dict, lo: int, hi: int) -> None:
        warned = _check_finite(sums, self.step0 + lo, self.step0 + hi, self.on_nonfinite)
        if warned and self.warned is None:  # the first window let through, for the message
            self.warned = (self.step0 + lo, self.step0 + hi)
        self.epoch_sums = sums if self.epoch_sums is None else jmetrics.merge(self.epoch_sums, sums)
        record = {"kind": "train", "step": self.step0 + hi, "epoch": self.epoch}
        record.update(jmetrics.compute(sums))
        if self.hooks.on_log:
            self.hooks.on_log(record)
        if self.bar is not None:
            self.bar.update(hi - lo, **jmetrics.compute(self.epoch_sums))  # arrays too


def _check_finite(sums: dict, first_step: int, last_step: int, on_nonfinite: str) -> bool:
    """Raises on a non-finite loss ("raise"); returns True when "warn" let one through."""
    loss = sums.get("loss")
    if on_nonfinite == "ignore" or loss is None or np.all(np.isfinite(loss.compute())):
        return False
    where = f"non-finite training loss between steps {first_step + 1} and {last_step}"
    if on_nonfinite == "warn":
        log.warning("%s", where)
        return True
    raise FloatingPointError(
        f"{where}: lower the learning rate, or check the labels (class ids outside the "
        "model's classes give NaN: jaxnets.data.check_labels); to skip such updates instead, "
        "wrap the optimiser in optax.apply_if_finite and pass on_nonfinite='warn'. The last "
        "checkpoint saved before this is intact"
    )


def _check_data_finite(data: Batch, what: str) -> None:
    """Once, on the host: NaN or Inf in float inputs would show up as a non-finite loss."""
    for path, x in jax.tree_util.tree_flatten_with_path(data)[0]:
        x = np.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.inexact) or np.isfinite(x.sum()):
            continue  # the sum is finite only if every value is (2x faster than isfinite)
        if not np.all(np.isfinite(x)):  # else the sum merely overflowed
            bad = ~np.isfinite(x.reshape(len(x), -1)).all(-1)
            raise ValueError(
                f"{what}{jax.tree_util.keystr(path)}: {int(bad.sum())} of {len(x)} examples "
                f"hold NaN or Inf (the first is example {int(np.argmax(bad))}); fix or drop "
                "them before training"
            )


NOT_SKIPPED = (
    "on_nonfinite='warn' goes on past a non-finite loss (between steps {first} and {last}) "
    "only when the optimiser skips such updates, but the parameters are now non-finite: "
    "wrap it in optax.apply_if_finite(tx, max_consecutive_errors=...), or use "
    "on_nonfinite='raise'"
)


def _check_skipped(params: Any, steps: tuple[int, int]) -> None:
    """After "warn" let a non-finite loss through: the parameters must still be finite."""
    leaves = jax.device_get(jax.tree.leaves(params))
    if not all(np.all(np.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)):
        raise FloatingPointError(NOT_SKIPPED.format(first=steps[0] + 1, last=steps[1]))
