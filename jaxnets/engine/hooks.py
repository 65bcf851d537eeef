"""Hooks: what `loop.fit` does between device calls, each saying when it is due.

A hook is any object with the `Hook` attributes and methods (subclass `Hook` for the
defaults). After each chunk of steps `fit` asks every hook whether training should stop
(`should_stop`), then calls the hooks that are due, in `order`: every N steps, every T
seconds, at an epoch's end, on a stop. A hook never cuts a chunk, so no hook changes the
numbers. The ones here are what a run needs; `run.open_run` wires them to a work directory.

Example (a user's loop with logs, evaluation and checkpoints, no work-directory API):
    >>> hooks = [NonFinite(), Log(JsonlWriter("m.jsonl"), TensorBoardWriter("tb"),
    ...          every_steps=10), Evaluate(eval_step, val_data, batch_size=256),
    ...          Checkpoint(Checkpointer("ckpt"), every_steps=500)]
    >>> loop.fit(state, train_step, data, data_key=key, epochs=3, batch_size=128,
    ...          hooks=hooks)
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnets.core import metrics as jmetrics
from jaxnets.engine import feeds, sharding

log = logging.getLogger("jaxnets.engine.hooks")

# `order`: lower runs first. Guards see the metrics before anything is written, evaluation
# fills the epoch record before loggers write it, checkpoints come last.
GUARD, EVALUATION, LOGGING, CHECKPOINT = 0, 10, 20, 30


class Hook:
    """The hook protocol, with its defaults (a hook that is never due and does nothing)."""

    every_steps: int = 0  # due once a multiple of N steps has been passed (1: every chunk)
    every_seconds: float = 0.0  # due when T seconds passed since it last ran
    at_epoch_end: bool = False
    on_stop: bool = False  # due when a hook's `should_stop` said stop (SIGTERM)
    flush: bool = False  # needs every step's metrics read back before it runs
    order: int = 50
    timer: str = "hooks"  # where `Context.seconds` counts its time
    # A hook with a `state_key` keeps JSON state across a resume: `Checkpoint` saves
    # `checkpoint_state()` under the key in every checkpoint's metadata ("hooks") and, in its
    # own `start`, gives a restored run's back to `restore_state` (keep state from __init__).
    state_key: str = ""

    def start(self, ctx: Any) -> None:
        """Before the first step (restore what the hook keeps, open files)."""

    def should_stop(self, ctx: Any) -> bool:
        """Polled after every chunk: True stops training after this round of hooks."""
        return False

    def __call__(self, ctx: Any) -> None:
        """When due (`ctx` is `loop.Context`)."""

    def end(self, ctx: Any) -> None:
        """After training, also when it failed (close what `start` opened)."""

    def checkpoint_state(self) -> Any:
        """JSON state saved with each checkpoint (with a `state_key`)."""
        return None

    def restore_state(self, saved: Any, ctx: Any) -> None:
        """Takes back `checkpoint_state()` of the checkpoint a run resumes from."""


def check_schedule(every_steps: int, every_seconds: float) -> None:
    """Refuses a hook schedule that is not a count of steps / seconds >= 0 (0: off)."""
    if isinstance(every_steps, bool) or not isinstance(every_steps, int) or every_steps < 0:
        raise ValueError(f"every_steps={every_steps!r}; use an int >= 0 (0: off)")
    if not every_seconds >= 0:
        raise ValueError(f"every_seconds={every_seconds!r}; use a number >= 0 (0: off)")


class Periodic(Hook):
    """Calls `fn(step, state)` when due: every N steps, every T seconds, at epoch ends,
    on a stop signal."""

    def __init__(
        self,
        fn: Callable[[int, Any], None],
        *,
        every_steps: int = 0,
        every_seconds: float = 0.0,
        at_epoch_end: bool = False,
        on_stop: bool = False,
    ):
        if not callable(fn):
            raise TypeError(f"Periodic's fn must be a function (step, state), got {fn!r}")
        check_schedule(every_steps, every_seconds)
        self.fn, self.every_steps, self.every_seconds = fn, every_steps, every_seconds
        self.at_epoch_end, self.on_stop = at_epoch_end, on_stop

    def __call__(self, ctx: Any) -> None:
        self.fn(ctx.step, ctx.state)


NONFINITE = ("raise", "warn")
NOT_SKIPPED = (
    "NonFinite('warn') goes on past a non-finite loss (between steps {first} and {last}) "
    "only when the optimiser skips such updates, but the parameters are now non-finite: "
    "wrap it in optax.apply_if_finite(tx, max_consecutive_errors=...), or use "
    "NonFinite('raise')"
)


class NonFinite(Hook):
    """Checks every step's training loss on the host, as the metrics come back.

    "raise": FloatingPointError naming the step range; "warn": log it and go on (the
    optimiser must skip such updates, `optax.apply_if_finite`; if the parameters became
    non-finite it did not, and FloatingPointError says so).
    """

    every_steps, order = 1, GUARD

    def __init__(self, mode: str = "raise"):
        if mode not in NONFINITE:
            raise ValueError(f"NonFinite(mode={mode!r}); use one of {NONFINITE}")
        self.mode = mode

    def __call__(self, ctx: Any) -> None:
        for first, metrics in ctx.new_metrics:
            loss = metrics.get("loss")
            if loss is None:
                continue
            bad = ~np.isfinite(np.asarray(loss.compute()).reshape(len(loss.total), -1)).all(-1)
            if not bad.any():
                continue
            lo, last = first + int(np.argmax(bad)) + 1, first + len(bad)
            where = f"non-finite training loss at step {lo} (of steps {first + 1}..{last})"
            if self.mode == "warn":
                log.warning("%s", where)
                if not all_finite(ctx.state.params):
                    raise FloatingPointError(NOT_SKIPPED.format(first=lo, last=last))
                continue
            raise FloatingPointError(
                f"{where}: lower the learning rate, or check the labels (class ids outside "
                "the model's classes give NaN: jaxnets.data.check_labels); to skip such "
                "updates instead, wrap the optimiser in optax.apply_if_finite and use "
                "NonFinite('warn'). No checkpoint holds a non-finite state"
            )


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in leaves] or [True]))


def all_finite(tree: Any) -> bool:
    """Whether every float of `tree` is finite (one device reduction, one bool back)."""
    return bool(sharding.to_host(_all_finite(tree)))


class Log(Hook):
    """Writes a "train" record (means over the window) every `every_steps` steps and the
    epoch record at each epoch's end to every sink (`sink.write(record)`: `JsonlWriter`,
    `TensorBoardWriter`, your own); closes the sinks at the end. Windows are aligned within
    the epoch; metrics are read one chunk late, so a window is written when its steps are
    back. Every metric reaches every sink (arrays as the sink can show them)."""

    every_steps, order, timer = 1, LOGGING, "logging"

    def __init__(self, *sinks: Any, every_steps: int = 10, close: bool = True):
        check_schedule(every_steps, 0.0)
        if every_steps < 1:
            raise ValueError(f"Log(every_steps={every_steps}); use an int >= 1")
        for sink in sinks:
            if not callable(getattr(sink, "write", None)):
                raise TypeError(f"a Log sink needs write(record); got {type(sink).__name__}")
        self.sinks, self.window, self.close = sinks, every_steps, close
        self._buffer: Any = None  # stacked per-step host metrics not yet in a window
        self._first = 0  # global step before the buffer's first step

    def write(self, record: Mapping[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(dict(record))

    def __call__(self, ctx: Any) -> None:
        for first, metrics in ctx.new_metrics:
            if self._buffer is None:
                self._buffer, self._first = metrics, first
            else:
                self._buffer = jax.tree.map(lambda *xs: np.concatenate(xs), self._buffer, metrics)
            self._write_windows(ctx, final=False)
        if ctx.record is not None:
            self._write_windows(ctx, final=True)
            self.write(ctx.record)

    def _write_windows(self, ctx: Any, *, final: bool) -> None:
        spe = ctx.steps_per_epoch
        while self._buffer is not None:
            have = len(jax.tree.leaves(self._buffer)[0])
            room = self.window - (self._first % spe) % self.window
            room = min(room, spe - self._first % spe)  # windows never cross an epoch's end
            if room > have and not final:
                return
            size = min(room, have)
            part = jax.tree.map(lambda x, n=size: x[:n], self._buffer)
            sums = jmetrics.sum_steps(part)
            end = self._first + size
            self.write(
                {
                    "kind": "train",
                    "step": end,
                    "epoch": self._first // spe,
                    **jmetrics.compute(sums),
                    **ctx.window_fields.pop(end, {}),
                }
            )
            self._first += size
            rest = jax.tree.map(lambda x, n=size: x[n:], self._buffer)
            self._buffer = rest if size < have else None

    def end(self, ctx: Any) -> None:
        if self.close:
            for sink in self.sinks:
                sink.close()


class Progress(Hook):
    """A progress bar per epoch (tqdm), with the epoch's running means."""

    every_steps, order, timer = 1, LOGGING, "logging"

    def __init__(self, epochs: int, *, disable: bool | None = None):
        self.epochs, self.disable = epochs, disable
        self._bar: Any = None
        self._sums: Any = None

    def __call__(self, ctx: Any) -> None:
        if self._bar is None:
            start = ctx.position - ctx.length
            self._bar = ProgressBar(
                ctx.epoch, self.epochs, ctx.steps_per_epoch, start, disable=self.disable
            )
        for _, metrics in ctx.new_metrics:
            sums = jmetrics.sum_steps(metrics)
            self._sums = sums if self._sums is None else jmetrics.merge(self._sums, sums)
        values = jmetrics.compute(self._sums) if self._sums is not None else {}
        self._bar.update(ctx.length, **values, **ctx.status)  # arrays too
        if ctx.epoch_end or ctx.stopping:
            self.end(ctx)

    def end(self, ctx: Any) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._sums = None, None


class Evaluate(Hook):
    """At each epoch's end, the metrics of an evaluation set, added to the epoch record
    as `val_<name>` (so every logger writes them).

    Args:
      eval_step: `train.make_eval_step(eval_fn)`.
      data: a batch pytree, an `inputs.Stream` or a random-access source.
      batch_size: the global evaluation batch (the last one padded and masked).
      input: "auto", "resident" or "stream".
      prefix: the names' prefix.
    """

    at_epoch_end, order, timer = True, EVALUATION, "evaluation"

    def __init__(
        self,
        eval_step: Callable,
        data: Any,
        *,
        batch_size: int,
        input: str = "auto",
        prefix: str = "val_",
    ):
        self.eval_step, self.data, self.batch_size = eval_step, data, batch_size
        self.input, self.prefix = input, prefix
        self.feed: Any = None

    def start(self, ctx: Any) -> None:
        self.feed = feeds.make_feed(
            self.data,
            ctx.mesh,
            batch_size=self.batch_size,
            input=self.input,
            what="evaluation data",
        )

    def __call__(self, ctx: Any) -> None:
        values = jmetrics.compute(self.feed.evaluate(self.eval_step, ctx.state))
        ctx.record.update({f"{self.prefix}{k}": v for k, v in values.items()})


class Checkpoint(Hook):
    """Saves the train state and the feed's position (Orbax, `checkpoint.Checkpointer`)
    at epoch ends, on a stop signal, and every N steps / T seconds; only a finite state
    (checked on the devices first: no checkpoint ever holds a diverged state).

    Args:
      checkpointer: where to save.
      every_steps, every_seconds: extra cadences (0: off).
      metadata: JSON saved with every checkpoint (the run's config).
      position: the feed position of the restored checkpoint (its metadata's "data"):
        the feed resumes from it.
      hook_state: the restored checkpoint's metadata "hooks": given back to the hooks
        with a `state_key` (early stopping) before the first step.

    A save at an epoch's end carries the epoch record's numbers as the checkpoint's
    metrics, so a `Checkpointer(best_metric="val_loss", keep_best=N)` keeps the best N.
    """

    at_epoch_end, on_stop, flush, order, timer = True, True, True, CHECKPOINT, "checkpoint"

    def __init__(
        self,
        checkpointer: Any,
        *,
        every_steps: int = 0,
        every_seconds: float = 0.0,
        metadata: Mapping[str, Any] | None = None,
        position: Mapping | None = None,
        hook_state: Mapping[str, Any] | None = None,
    ):
        check_schedule(every_steps, every_seconds)
        self.checkpointer, self.every_steps, self.every_seconds = (
            checkpointer,
            every_steps,
            every_seconds,
        )
        self.metadata, self.position = dict(metadata or {}), position
        self.hook_state = dict(hook_state or {})

    def start(self, ctx: Any) -> None:
        if self.position is not None:
            ctx.feed.restore(dict(self.position))
        for hook in _stateful(ctx.hooks):
            if hook.state_key in self.hook_state:
                hook.restore_state(self.hook_state[hook.state_key], ctx)

    def __call__(self, ctx: Any) -> None:
        if not all_finite((ctx.state.params, ctx.state.opt_state, ctx.state.model_state)):
            last = self.checkpointer.latest_step()
            raise FloatingPointError(
                f"the train state at step {ctx.step} holds NaN or Inf: not saved (the "
                f"latest checkpoint, step {last}, is finite); lower the learning rate or "
                "wrap the optimiser in optax.apply_if_finite"
            )
        metadata = {**self.metadata, "data": ctx.feed.state()}
        kept = {h.state_key: h.checkpoint_state() for h in _stateful(ctx.hooks)}
        if kept:
            metadata["hooks"] = kept
        metrics = None
        if ctx.record is not None:
            metrics = {
                k: v
                for k, v in ctx.record.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "kind"
            }
        self.checkpointer.save(ctx.step, ctx.state, metadata=metadata, metrics=metrics, force=True)


def _stateful(hooks: Any) -> list:
    keys = [getattr(h, "state_key", "") for h in hooks]
    dup = {k for k in keys if k and keys.count(k) > 1}
    if dup:
        raise ValueError(f"two hooks keep state under the same state_key {sorted(dup)}")
    return [h for h, k in zip(hooks, keys) if k]


class EarlyStopping(Hook):
    """Stops training when an epoch metric has not improved for `patience` epochs
    (Keras' `EarlyStopping`); its state is saved with every checkpoint (`state_key`), so
    a resumed run stops where an uninterrupted one would.

    Args:
      metric: a name in the epoch record, e.g. "val_loss" (from `Evaluate`) or "loss".
      mode: "min" or "max": which direction is better.
      patience: epochs without improvement before stopping (>= 1).
      min_delta: an improvement must beat the best by more than this.
    """

    at_epoch_end, order, state_key = True, EVALUATION + 5, "early_stopping"

    def __init__(
        self, metric: str = "val_loss", *, mode: str = "min", patience: int = 5, min_delta=0.0
    ):
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping(mode={mode!r}); use 'min' or 'max'")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"EarlyStopping(patience={patience!r}); use an int >= 1")
        if not min_delta >= 0:
            raise ValueError(f"EarlyStopping(min_delta={min_delta!r}); use a number >= 0")
        self.metric, self.mode, self.patience, self.min_delta = metric, mode, patience, min_delta
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.wait = 0  # epochs since the best
        self.stopped_epoch: int | None = None

    def __call__(self, ctx: Any) -> None:
        if self.metric not in ctx.record:
            names = sorted(k for k, v in ctx.record.items() if isinstance(v, (int, float)))
            raise ValueError(
                f"EarlyStopping(metric={self.metric!r}): the epoch record has no such value; "
                f"it has {names} (validation metrics need an Evaluate hook)"
            )
        value, epoch = float(ctx.record[self.metric]), ctx.epoch + 1
        sign = 1.0 if self.mode == "min" else -1.0
        if np.isfinite(value) and (
            self.best is None or sign * (self.best - value) > self.min_delta
        ):
            self.best, self.best_epoch, self.wait = value, epoch, 0
        else:
            self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            log.warning(
                "early stopping after epoch %d: %s has not improved for %d epochs (best %.6g "
                "at epoch %s)",
                epoch,
                self.metric,
                self.wait,
                self.best if self.best is not None else float("nan"),
                self.best_epoch,
            )
            ctx.request_stop()

    def checkpoint_state(self) -> dict:
        keys = ("best", "best_epoch", "wait", "stopped_epoch")
        return {k: getattr(self, k) for k in keys} | {"metric": self.metric, "mode": self.mode}

    def restore_state(self, saved: Any, ctx: Any) -> None:
        if (saved.get("metric"), saved.get("mode")) != (self.metric, self.mode):
            log.warning(
                "early stopping on %s now, %s before: its state starts afresh",
                (self.metric, self.mode),
                (saved.get("metric"), saved.get("mode")),
            )
            return
        self.best, self.best_epoch = saved["best"], saved["best_epoch"]
        self.wait, self.stopped_epoch = saved["wait"], saved["stopped_epoch"]
        if self.stopped_epoch is not None:  # the saved run had stopped: train no further
            ctx.request_stop()


class Preemption(Hook):
    """Stops training cleanly on SIGTERM/SIGINT (`preemption.PreemptionGuard`): the
    on-stop hooks (checkpoints) run, then `fit` returns with `stopped_early`.

    Args:
      guard: a guard its owner has entered (`with guard:`); None: the hook makes one and
        holds the signals for the duration of `fit`.
    """

    def __init__(self, guard: Any = None):
        from jaxnets.engine.preemption import PreemptionGuard

        self.owned = guard is None
        self.guard = PreemptionGuard() if guard is None else guard

    def start(self, ctx: Any) -> None:
        if self.owned:
            self.guard.__enter__()

    def should_stop(self, ctx: Any) -> bool:
        return self.guard.should_stop

    def end(self, ctx: Any) -> None:
        if self.owned:
            self.guard.__exit__(None, None, None)


class ProgressBar:
    """A tqdm bar for one epoch; `update(n, loss=..., accuracy=...)` after each log point."""

    def __init__(self, epoch: int, epochs: int, steps: int, start: int = 0, *, disable=None):
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=steps,
            initial=start,
            desc=f"epoch {epoch + 1}/{epochs}",
            unit="step",
            dynamic_ncols=True,
            leave=True,
            file=sys.stderr,
            disable=disable,
        )

    def update(self, n: int, **postfix: float) -> None:
        self._bar.set_postfix({k: _postfix(v) for k, v in postfix.items()}, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


def _postfix(value: Any) -> str:
    """A progress-bar value: a number to 4 decimals, an array metric as its values or shape."""
    if isinstance(value, (int, float)):
        return f"{value:.4f}"
    array = np.asarray(value)
    if array.size <= 4:
        return "[" + " ".join(f"{v:.4g}" for v in array.reshape(-1)) + "]"
    return "[" + "x".join(map(str, array.shape)) + "]"
