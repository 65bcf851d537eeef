"""`fit()`: a short loop over the chunk iterator (`Chunks`) and hooks (`jaxnets.engine.hooks`).

What the iterator decides, and why it cannot change the numbers:
- **Device calls.** Steps run in chunks of `k` scanned steps per call from each epoch's
  start (the epoch's remainder as one shorter chunk); only the chunk lengths a run calls
  are compiled, once, before the first step. Nothing else cuts a chunk: hooks run between
  device calls, at the first chunk boundary at or after they fall due. So the numbers
  depend on `k` alone, not on any log, save or stop cadence.
- **k, when not given, is looked up or measured** (`jaxnets.engine.dispatch`): the record of the
  run being resumed, then the jaxnets cache, and only then a timing of 1 against k steps.
- The metrics of a chunk are read back while the next chunk runs (one chunk late); all of
  them at an epoch's end, a stop, or before a hook that needs them (`Hook.flush`: a
  checkpoint never holds steps the logs and the non-finite guard have not seen).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxnets.core import metrics as jmetrics
from jaxnets.core.checks import POSITIVE_INT, Rule, check_argument
from jaxnets.core.types import PRNGKey
from jaxnets.engine import dispatch, feeds, sharding, train
from jaxnets.engine.hooks import Hook

__all__ = ["Chunk", "Chunks", "Context", "FitResult", "chunk_plan", "fit"]

_now = time.monotonic  # the clock of `Hook.every_seconds` (replaceable in tests)


def chunk_plan(start: int, stop: int, k: int) -> list[int]:
    """Chunk lengths from position `start` to `stop` (the epoch's length) of an epoch.

    Chunks of `k` from the epoch's start, the remainder `stop % k` as one chunk; a start
    that is not a boundary (a resume with another `k`) is reached with single steps. A
    resumed run makes the calls of an uninterrupted one.
    """
    plan, pos = [], start
    to_boundary = min(-pos % k, stop - pos)
    plan += [1] * to_boundary
    pos += to_boundary
    plan += [k] * ((stop - pos) // k)
    if (stop - pos) % k:
        plan.append((stop - pos) % k)
    return plan


class Chunk(NamedTuple):
    """One device call's worth of steps, as the iterator yields it (after dispatch)."""

    step: int  # optimiser steps done after this chunk
    epoch: int  # the chunk's epoch (0-based)
    position: int  # steps of the epoch done after this chunk
    length: int  # steps in this chunk
    state: train.TrainState  # global arrays on the rule's shardings
    metrics: Any  # per-step metrics on the devices, leading [length]


class Chunks:
    """The fast part of training as an iterator: `for chunk in Chunks(...)` trains.

    Args:
      state: the train state (host values or global arrays); its step says where to start.
      train_step: `train.make_train_step(loss_fn, tx)`.
      feed: the input (`feeds.make_feed`).
      epochs: total epochs (a finished run given more epochs continues).
      mesh: the devices; rule: the state's sharding rule (`sharding.replicated`/`fsdp`).
      steps_per_call: steps per device call; None: recorded or measured (module docstring),
        `dispatch.scan_candidates` with several processes (they must make the same calls).
      workdir: where the measured choice is recorded (a resumed run uses it).
    """

    def __init__(
        self,
        state: train.TrainState,
        train_step: Callable,
        feed: feeds.Feed,
        *,
        epochs: int,
        mesh: Any,
        rule: sharding.Rule = sharding.replicated,
        steps_per_call: int | None = None,
        workdir: Any = None,
    ):
        check_argument("steps_per_call", steps_per_call, Rule(int, low=1, optional=True))
        self.feed, self.train_step, self.mesh, self.workdir = feed, train_step, mesh, workdir
        self.steps_per_epoch = len(feed.rows(0))
        self.total_steps = epochs * self.steps_per_epoch
        self.epochs = epochs
        self.shardings = sharding.state_shardings(state, mesh, rule)
        self.state = state
        self.step = int(np.max(jax.device_get(state.step)))  # a sweep holds one per model
        self.requested = steps_per_call
        self.steps_per_call = steps_per_call or 1
        self.programs: dict[int, Any] = {}  # chunk length -> compiled program (after start)
        self._compile_one: Callable[[], Any] | None = None
        self.compiled_at: float | None = None  # perf_counter when the programs were ready
        # Host seconds by where they went (`Context.seconds` adds the hooks'): compiling
        # (and measuring k), reading input, dispatching and waiting for the devices.
        self.seconds = {"compile": 0.0, "input": 0.0, "device": 0.0}

    def _programs(self, program: Any, state: Any, rows: np.ndarray, start: int) -> dict:
        """The compiled programs of the chunk lengths this run calls (k chosen first)."""
        spe, devices = self.steps_per_epoch, list(self.mesh.devices.flat)
        compiled: dict[int, Any] = {}

        def compile_fn(c: int):
            if c not in compiled:
                compiled[c] = program.lower(state, *self.feed.chunk_args(rows[:c])).compile()
            return compiled[c]

        k = min(self.requested or dispatch.scan_candidates(devices), spe)
        if self.requested is None and k > 1 and jax.process_count() == 1:
            key_text = program.lower(state, *self.feed.chunk_args(rows[:1])).as_text()
            k = dispatch.choose_steps_per_call(
                compile_fn,
                k,
                state,
                self.feed.chunk_args,
                rows,
                devices,
                key_text=key_text,
                workdir=self.workdir,
            )
        self.steps_per_call = k
        epoch0 = self.step // spe
        lengths = set(chunk_plan(start, spe, k))
        if epoch0 + 1 < self.epochs:
            lengths |= set(chunk_plan(0, spe, k))
        shapes = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
        )  # the state itself is donated to the first call
        self._compile_one = lambda: (
            compiled.get(1) or program.lower(shapes, *self.feed.chunk_args(rows[:1])).compile()
        )
        return {c: compile_fn(c) for c in sorted(lengths)}

    def step_flops(self) -> float | None:
        """FLOPs of one step on one device, by XLA's cost analysis of the compiled one-step
        program (compiled now if the run calls none: its seconds count as "compile")."""
        if self._compile_one is None:
            return None
        t = time.perf_counter()
        compiled = self._compile_one()
        self.seconds["compile"] += time.perf_counter() - t
        from jaxnets.engine.monitoring import cost_flops

        return cost_flops(compiled)

    def __iter__(self) -> Iterator[Chunk]:
        feed, spe, step = self.feed, self.steps_per_epoch, self.step
        if step >= self.total_steps:
            return
        feed.check_position(step, spe)
        state = sharding.place(self.state, self.shardings)
        program = feed.train_program(self.train_step, self.shardings)
        clock, seconds = time.perf_counter, self.seconds
        t = clock()
        programs = self._programs(program, state, feed.rows(step // spe), step % spe)
        self.programs = programs
        seconds["compile"] += clock() - t
        self.compiled_at = clock()
        while step < self.total_steps:
            epoch, pos = divmod(step, spe)
            plan = chunk_plan(pos, spe, self.steps_per_call)
            args = feed.epoch(epoch, pos, plan)
            try:
                t = clock()
                ahead: Any = next(args)
                seconds["input"] += clock() - t
                for c in plan:
                    t = clock()
                    state, metrics = programs[c](state, *ahead)
                    t2 = clock()
                    ahead = next(args, None)  # the host reads the next chunk while this runs
                    seconds["device"] += t2 - t
                    seconds["input"] += clock() - t2
                    pos, step = pos + c, step + c
                    feed.consumed(step, epoch)
                    self.state, self.step = state, step
                    yield Chunk(step, epoch, pos, c, state, metrics)
            finally:
                args.close()


class FitResult(NamedTuple):
    state: train.TrainState  # global arrays on the rule's shardings
    history: list[dict]  # one record per epoch
    stopped_early: bool
    steps_per_call: int  # the chunk length used


class Context:
    """What hooks see after each chunk (one object for the whole `fit`, updated in place).

    Attributes:
      step, epoch, position, steps_per_epoch, total_steps: where training is.
      epoch_end: the chunk ended an epoch; stopping: a hook asked to stop (a signal).
      state: the current train state (global arrays; donated to the next chunk: read or
        save it in the hook, do not keep it).
      feed, mesh: the input and the devices.
      new_metrics: `[(first_step, per-step host metrics [steps])]` read back since the
        last hook round (a hook due every chunk sees every step once).
      record: at an epoch's end, the epoch's record (`kind="epoch"`, epoch means, seconds);
        evaluation adds `val_` entries before the loggers write it.
      history: the epoch records so far.
      seconds: host seconds of the run so far by where they went: "compile" (and the
        steps-per-call measurement), "input" (reading and placing chunks), "device"
        (dispatching and waiting for results), and each hook's `timer` ("evaluation",
        "checkpoint", "logging", "hooks"); `started` is the `time.perf_counter()` of the
        start. No timing adds a wait for the devices.
      window_fields: `{step: {name: value}}` that a hook ordered before `Log` adds to the
        "train" record ending at `step` (`Log` takes them out as it writes).
      status: `{name: float}` the progress bar shows besides the running means.
    """

    def __init__(self, chunks: Chunks, hooks: Sequence[Hook]):
        self.chunks, self.feed, self.mesh = chunks, chunks.feed, chunks.mesh
        self.hooks = sorted(hooks, key=lambda h: h.order)
        self.steps_per_epoch, self.total_steps = chunks.steps_per_epoch, chunks.total_steps
        self.step, self.epoch, self.position, self.length = chunks.step, 0, 0, 0
        self.state = chunks.state
        self.epoch_end = self.stopping = self.stop_requested = False
        self.new_metrics: list[tuple[int, Any]] = []
        self.record: dict | None = None
        self.history: list[dict] = []
        self._pending: list[Chunk] = []
        self._epoch_sums: Any = None
        self._epoch_start = time.perf_counter()
        self._last = [_now()] * len(self.hooks)
        self.started = time.perf_counter()
        self.seconds = chunks.seconds
        for hook in self.hooks:
            self.seconds.setdefault(getattr(hook, "timer", "hooks"), 0.0)
        self.window_fields: dict[int, dict] = {}
        self.status: dict[str, float] = {}

    def call(self, hook: Hook) -> None:
        """Runs a due hook, its seconds counted under its `timer`."""
        t, compiling = time.perf_counter(), self.seconds["compile"]
        try:
            hook(self)
        finally:
            spent = time.perf_counter() - t - (self.seconds["compile"] - compiling)
            self.seconds[getattr(hook, "timer", "hooks")] += spent

    def request_stop(self) -> None:
        """Ends training after this round of hooks (early stopping)."""
        self.stop_requested = True

    def advance(self, chunk: Chunk) -> list[Hook]:
        """Takes a chunk, reads back metrics, and returns the hooks due now."""
        self.step, self.epoch, self.position, self.length = (
            chunk.step,
            chunk.epoch,
            chunk.position,
            chunk.length,
        )
        self.state, self.epoch_end = chunk.state, chunk.position == self.steps_per_epoch
        self._pending.append(chunk)
        self.stopping = any(h.should_stop(self) for h in self.hooks)
        due = [h for i, h in enumerate(self.hooks) if self._due(i, h)]
        flush = self.epoch_end or self.stopping or any(h.flush for h in due)
        self._read(self._pending if flush else self._pending[:-1])
        self.record = self._epoch_record() if self.epoch_end else None
        return due

    def _due(self, i: int, hook: Hook) -> bool:
        now, n, c = _now(), hook.every_steps, self.length
        due = (
            (n and self.step // n != (self.step - c) // n)
            or (hook.at_epoch_end and self.epoch_end)
            or (hook.on_stop and self.stopping)
            or (hook.every_seconds and now - self._last[i] >= hook.every_seconds)
        )
        if due:
            self._last[i] = now
        return bool(due)

    def _read(self, ready: list[Chunk]) -> None:
        self.new_metrics = []
        if not ready:
            return
        t = time.perf_counter()
        host = sharding.to_host([c.metrics for c in ready])
        self.seconds["device"] += time.perf_counter() - t
        for chunk, metrics in zip(ready, host):
            self.new_metrics.append((chunk.step - chunk.length, metrics))
            sums = jmetrics.sum_steps(metrics)
            self._epoch_sums = (
                sums if self._epoch_sums is None else jmetrics.merge(self._epoch_sums, sums)
            )
        self._pending = self._pending[len(ready) :]

    def _epoch_record(self) -> dict:
        record = {"kind": "epoch", "epoch": self.epoch + 1, "step": self.step}
        if self._epoch_sums is not None:
            record.update(jmetrics.compute(self._epoch_sums))
        record["epoch_seconds"] = time.perf_counter() - self._epoch_start
        self._epoch_sums, self._epoch_start = None, time.perf_counter()
        self.history.append(record)
        return record


def fit(
    state: train.TrainState,
    train_step: Callable,
    data: Any,
    *,
    data_key: PRNGKey,
    epochs: int,
    batch_size: int,
    hooks: Sequence[Hook] = (),
    mesh: Any = None,
    rule: sharding.Rule = sharding.replicated,
    input: str = "auto",
    steps_per_call: int | None = None,
    workdir: Any = None,
    order: Callable[[int], np.ndarray] | None = None,
) -> FitResult:
    """Trains until `epochs` epochs are done, resuming from `state.step`.

    Args:
      state: the TrainState (`create_train_state`, or a checkpoint's); its step says where
        to start.
      train_step: `train.make_train_step(loss_fn, tx)`, a function of the global batch.
      data: the training set: a batch pytree of host arrays, an `inputs.Stream`, or any
        random-access source (`feeds.make_feed`).
      data_key: key of the data order (epoch e uses `fold_in(data_key, e)`).
      epochs: total epochs; batch_size: the global batch.
      hooks: `jaxnets.engine.hooks` run between device calls when due (logs, evaluation,
        checkpoints, the non-finite guard, preemption, your own `Hook`).
      mesh: the devices (`sharding.make_mesh()`, default: all); rule: how the state is
        placed (`sharding.replicated`, default, or `sharding.fsdp()`).
      input: "auto", "resident" or "stream" (`feeds.make_feed`): the same numbers.
      steps_per_call, workdir: as `Chunks`.
      order: `epoch -> [steps, batch, ...]` example indices (a sweep's per-model order).

    Returns:
      FitResult(state, history, stopped_early, steps_per_call).
    """
    check_argument("epochs", epochs, POSITIVE_INT)
    check_argument("batch_size", batch_size, POSITIVE_INT)
    mesh = sharding.make_mesh() if mesh is None else mesh
    feed = feeds.make_feed(
        data, mesh, batch_size=batch_size, data_key=data_key, input=input, order=order
    )
    chunks = Chunks(
        state,
        train_step,
        feed,
        epochs=epochs,
        mesh=mesh,
        rule=rule,
        steps_per_call=steps_per_call,
        workdir=workdir,
    )
    ctx = Context(chunks, hooks)
    for hook in ctx.hooks:
        hook.start(ctx)
    try:
        for chunk in () if ctx.stop_requested else chunks:  # a restored hook may stop at once
            for hook in ctx.advance(chunk):
                ctx.call(hook)
            if ctx.stopping or ctx.stop_requested:
                break
    finally:
        for hook in ctx.hooks:
            hook.end(ctx)
    stopped = ctx.stopping or (ctx.stop_requested and chunks.step < chunks.total_steps)
    return FitResult(chunks.state, ctx.history, stopped, chunks.steps_per_call)
