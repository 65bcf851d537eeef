"""One feed protocol: the training (or evaluation) input as the engine consumes it.

A feed owns what depends on where the data lives:
- its **train program**: `train_program(train_step, state_shardings)` jitted once, called
  with `(state, *chunk_args)` for a chunk of scanned steps;
- the **chunks** of an epoch: `epoch(e, start, plan)` yields each chunk's arguments, the
  next one read and placed while the current one runs;
- its **evaluation**: `evaluate(eval_step, state)`, the host sums of the eval metrics over
  every example once (the last batch padded and masked);
- its **position**: `state()` (JSON, saved with the checkpoint) and `restore(saved)`.

`make_feed` is the only place that looks at what the user passed: a batch pytree (kept
resident on the devices, or streamed when it does not fit), an `inputs.Stream`, or any
random-access source (streamed). Both feeds run the same steps on the same batches, so
resident and streamed runs give the same numbers bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import Mesh

from jaxnets.core.types import Batch, PRNGKey
from jaxnets.data.batching import num_examples
from jaxnets.engine import indices, inputs, programs, sharding, train

log = logging.getLogger("jaxnets.engine.feeds")

EVAL_STEPS_PER_CALL = 50  # streamed evaluation: batches per device call


class Feed(Protocol):
    """What `loop.fit` and `evaluation.evaluate` need of an input."""

    mesh: Mesh
    num_examples: int
    batch_size: int

    def rows(self, epoch: int) -> np.ndarray: ...
    def train_program(self, train_step: Callable, state_shardings: Any) -> Any: ...
    def chunk_args(self, rows: np.ndarray) -> tuple: ...
    def epoch(self, epoch: int, start: int, plan: list[int]) -> Generator[tuple, None, None]: ...
    def consumed(self, step: int, epoch: int) -> None: ...
    def evaluate(self, eval_step: Callable, state: train.TrainState) -> Any: ...
    def state(self) -> dict | None: ...
    def restore(self, saved: dict | None) -> None: ...
    def check_position(self, step: int, steps_per_epoch: int) -> None: ...


class _Order:
    """The data order shared by both feeds: this process's columns of each epoch's
    `[steps, batch]` indices (`indices.epoch_indices`, a pure function of key and epoch)."""

    def __init__(self, mesh, n, batch_size, data_key, order):
        self.mesh, self.num_examples, self.batch_size = mesh, n, batch_size
        self.data_key = data_key
        self._order = order or (
            lambda e: (
                indices.epoch_indices(data_key, e, n, batch_size)
                if data_key is not None
                else _no_key()
            )
        )

    def rows(self, epoch: int) -> np.ndarray:
        return sharding.process_columns(self.mesh, self._order(epoch))

    def eval_rows(self) -> np.ndarray:
        return sharding.process_columns(
            self.mesh, indices.eval_indices(self.num_examples, self.batch_size)
        )


def _no_key():
    raise ValueError("this feed was built for evaluation (no data_key): it has no train order")


class ResidentFeed(_Order):
    """The data set placed once (replicated); each step gathers its batch by index inside
    the scanned steps. Chunk arguments: `(data, idx)`."""

    def __init__(self, data: Batch, mesh: Mesh, batch_size: int, data_key, order=None):
        super().__init__(mesh, num_examples(data), batch_size, data_key, order)
        self.data = sharding.place(data, sharding.state_shardings(data, mesh))
        self._eval: dict = {}

    def train_program(self, train_step: Callable, state_shardings: Any) -> Any:
        return programs.make_epoch_program(train_step, self.mesh, state_shardings)

    def chunk_args(self, rows: np.ndarray) -> tuple:
        return (self.data, sharding.place_columns(self.mesh, rows))

    def epoch(self, epoch: int, start: int, plan: list[int]) -> Generator[tuple, None, None]:
        rows, pos = self.rows(epoch), start
        for c in plan:
            yield self.chunk_args(rows[pos : pos + c])
            pos += c

    def consumed(self, step: int, epoch: int) -> None:
        """Nothing to remember: the train state's step says where the data is."""

    def evaluate(self, eval_step: Callable, state: train.TrainState) -> Any:
        if eval_step not in self._eval:
            self._eval[eval_step] = (
                programs.make_eval_program(eval_step, self.mesh),
                sharding.place_columns(self.mesh, self.eval_rows()),
            )
        program, idx = self._eval[eval_step]
        return _host_sums(program(state, self.data, idx))

    def state(self) -> dict | None:
        return None

    def restore(self, saved: dict | None) -> None:
        """A resident position is the step's: nothing saved, nothing to restore."""

    def check_position(self, step: int, steps_per_epoch: int) -> None:
        """Any step is a position of the resident order."""


class StreamFeed(_Order):
    """Batches read by Grain from a random-access source while training (`inputs.Stream`);
    each process reads only its columns. Chunk arguments: `(batches,)`."""

    def __init__(self, stream: inputs.Stream, mesh: Mesh, batch_size: int, data_key, order=None):
        super().__init__(mesh, len(stream), batch_size, data_key, order)
        self.stream = stream
        self.order_id = {
            "examples": len(stream),
            "batch_size": int(batch_size),
            "data_key": None
            if data_key is None
            else np.asarray(train.raw_key(data_key)).ravel().tolist(),
        }
        self._pending: list[dict] = []  # Grain state after each yielded chunk, oldest first
        self._resume: dict | None = None  # a restored Grain state, for the first epoch
        self._eval: dict = {}

    def train_program(self, train_step: Callable, state_shardings: Any) -> Any:
        return programs.make_stream_program(train_step, self.mesh, state_shardings)

    def chunk_args(self, rows: np.ndarray) -> tuple:
        return (sharding.place_columns(self.mesh, _stack([self.stream.read(r) for r in rows])),)

    def epoch(self, epoch: int, start: int, plan: list[int]) -> Generator[tuple, None, None]:
        position: int | dict = start
        if self._resume is not None:  # the first epoch of a resumed run: Grain's own state
            position, self._resume = self._resume, None
        rows = self.rows(epoch)
        it = self.stream.batches(rows, position)
        try:
            for c in plan:
                got = [next(it) for _ in range(c)]
                self._pending.append(got[-1][1])
                batches = _stack([b for b, _ in got])
                _check_streamed_finite(batches, rows[start : start + c])
                start += c
                yield (sharding.place_columns(self.mesh, batches),)
        finally:
            it.close()

    def consumed(self, step: int, epoch: int) -> None:
        grain_state = self._pending.pop(0)
        self.stream.record({"step": step, "epoch": epoch, "grain": grain_state, **self.order_id})

    def evaluate(self, eval_step: Callable, state: train.TrainState) -> Any:
        if eval_step not in self._eval:
            self._eval[eval_step] = programs.make_stream_eval_program(eval_step, self.mesh)
        program, idx = self._eval[eval_step], self.eval_rows()
        batches = self.stream.batches(np.maximum(idx, 0), 0)
        total = None
        try:
            for lo in range(0, len(idx), EVAL_STEPS_PER_CALL):
                rows = idx[lo : lo + EVAL_STEPS_PER_CALL]
                chunk = _stack([next(batches)[0] for _ in range(len(rows))])
                args = sharding.place_columns(self.mesh, (chunk, rows >= 0))
                sums = _host_sums(program(state, *args))
                total = sums if total is None else jax.tree.map(np.add, total, sums)
        finally:
            batches.close()
        return total

    def state(self) -> dict | None:
        return self.stream.get_state()

    def restore(self, saved: dict | None) -> None:
        self.stream.set_state(saved)

    def check_position(self, step: int, steps_per_epoch: int) -> None:
        """A restored stream must be where the restored train state is; mid-epoch, its Grain
        state then starts the epoch (at an epoch's end the next epoch starts afresh)."""
        saved = self.stream.get_state()
        if saved is None or not self.stream.restored:
            return  # a fresh stream, or one a previous `fit` left: the step says where
        epoch, position = divmod(step, steps_per_epoch)
        if position == 0 and step:  # saved after the last chunk of the previous epoch
            epoch, position = epoch - 1, steps_per_epoch
        want = {**self.order_id, "step": step, "epoch": epoch, "grain": {"next_index": position}}
        mismatch = {k: (saved.get(k), v) for k, v in want.items() if saved.get(k) != v}
        if mismatch:
            raise ValueError(
                f"the stream's saved position (step {saved.get('step')}) does not match the "
                f"train state at step {step} (saved vs now: {mismatch}): the checkpoint and the "
                "data iterator state come from different runs or data"
            )
        if position < steps_per_epoch:
            self._resume = saved["grain"]


def _check_streamed_finite(batches: Batch, rows: np.ndarray) -> None:
    """NaN or Inf in a streamed chunk's float inputs, named by the example (as the resident
    path names them before training) instead of surfacing as a non-finite loss."""
    for path, x in jax.tree_util.tree_flatten_with_path(batches)[0]:
        if not np.issubdtype(x.dtype, np.inexact) or np.isfinite(x.sum()):
            continue  # the sum is finite only if every value is (a cheap first look)
        bad = ~np.isfinite(x.reshape(*rows.shape, -1)).all(-1)
        if bad.any():
            step, column = np.argwhere(bad)[0]
            raise ValueError(
                f"training data{jax.tree_util.keystr(path)}: streamed example "
                f"{int(rows[step, column])} holds NaN or Inf ({int(bad.sum())} of the "
                f"{bad.size} examples of this chunk); fix or drop it in the source"
            )


def _stack(batches: list[Batch]) -> Batch:
    return jax.tree.map(lambda *xs: np.stack(xs), *batches)


def _host_sums(sums: Any) -> Any:
    return jax.tree.map(lambda x: np.asarray(x, np.float64), sharding.to_host(sums))


def make_feed(
    data: Any,
    mesh: Mesh,
    *,
    batch_size: int,
    data_key: PRNGKey | None = None,
    input: str = "auto",
    order: Callable[[int], np.ndarray] | None = None,
    what: str = "training data",
) -> Feed:
    """The feed of what the user passed (the one place that looks at it).

    Args:
      data: a batch pytree of host arrays, an `inputs.Stream`, or any random-access source.
      mesh: the devices (`sharding.make_mesh`).
      batch_size: the global batch.
      data_key: key of the training order (epoch e: `fold_in(data_key, e)`); None for an
        evaluation-only feed.
      input: "auto" (resident when the copies fit with a margin, else streamed; logged),
        "resident" or "stream".
      order: `epoch -> [steps, batch, ...]` example indices instead of the default order
        (a sweep gives each model its own).
      what: how errors name the data.
    """
    if data_key is not None:
        train.check_key(data_key, "data_key")
    sharding.check_batch(mesh, batch_size)
    resolved = inputs.resolve(data, sharding.local_devices(mesh), input)
    streamed = isinstance(resolved, inputs.Stream)
    log.info("input (%s): %s", what, "streamed (Grain)" if streamed else "resident on the devices")
    if streamed:
        return StreamFeed(resolved, mesh, batch_size, data_key, order)
    num_examples(resolved, what)
    inputs.check_finite(resolved, what)
    return ResidentFeed(resolved, mesh, batch_size, data_key, order)
