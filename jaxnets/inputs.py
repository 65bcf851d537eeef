"""Training input: the resident path and the streamed (Grain) path behind one interface.

- **Resident**: the whole training set is put on every device once and each step gathers
  its batch by index inside the scanned steps. The fastest path, for data that fits: a
  memory check runs before anything is placed.
- **Streamed**: a Grain pipeline over a random-access source (numpy arrays, `.npy` files
  memory-mapped, a TFDS `data_source`, any object with `__len__` and `__getitem__`). The
  order is the resident path's (`train.epoch_indices`, a pure function of the data key and
  the epoch), each process reads only its columns of every global batch, worker threads
  read ahead a bounded number of batches, and the next chunk of batches is put on the
  devices while the current one runs. The steps are the resident path's on the same
  batches, so the numbers are the same; memory is bounded by the read-ahead, not the data.

`loop.fit(..., input="auto")` keeps the data resident when it fits with a margin and
streams otherwise, saying which.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grain
import jax
import numpy as np

from jaxnets import parallel, train
from jaxnets.data.records import ArraySource, RowFile, open_idx, open_npy
from jaxnets.types import Batch, PRNGKey

__all__ = ["ArraySource", "RowFile", "Stream", "open_idx", "open_npy", "resolve"]

log = logging.getLogger("jaxnets.inputs")

INPUTS = ("auto", "resident", "stream")
# `auto` keeps a data set resident when its copies take at most this share of free memory.
RESIDENT_SHARE = 0.5
STREAM_HINT = (
    "stream it instead: loop.fit(..., input='stream') or the experiments' --input stream "
    "(the data is then read from the host while training, in bounded memory)"
)


def _check_source(source: Any) -> None:
    if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
        raise TypeError(
            f"a streamed source needs __len__ and __getitem__ (random access), got "
            f"{type(source).__name__}; wrap arrays in inputs.ArraySource, files in "
            "inputs.open_npy, a TFDS set in tfds.data_source(name, split=...)"
        )


class Stream:
    """A training set streamed from a random-access source while training.

    `loop.fit` drives it: epoch `e` reads the batches of `train.epoch_indices(data_key, e,
    len(source), batch_size)`, this process's columns only, in Grain worker threads that
    read `prefetch` batches ahead. Its position (`get_state`) is saved in checkpoints
    beside the train state (`run.Run` does it), so a resumed run reads on from there.

    Args:
      source: `len(source)` examples, `source[i]` one example (a pytree of arrays); an
        `ArraySource` (or any source with `read_batch(indices)`) is read a batch at a time,
        any other (a TFDS `data_source`, a user's class) an example at a time.
      transform: `example -> example` applied on the host, in the worker threads, before
        batching (decoding, resizing). Deterministic: random augmentation belongs on the
        device, keyed by the step (`jaxnets.data.augment`).
      num_threads: Grain's reading threads (0: read on the training thread).
      prefetch: batches read ahead (host memory holds at most this many, plus one chunk).

    Example:
      >>> train_input = Stream(open_npy({"image": "x.npy", "label": "y.npy"}))
      >>> loop.fit(state, step, dp, train_input, data_key=key, epochs=1, batch_size=128)
    """

    def __init__(
        self,
        source: Any,
        *,
        transform: Callable[[Any], Any] | None = None,
        num_threads: int = 1,
        prefetch: int = 16,
    ):
        _check_source(source)
        for name, value, low in (("num_threads", num_threads, 0), ("prefetch", prefetch, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Stream({name}={value!r}): must be an int >= {low}")
        self.source = source
        self.transform = transform
        self.num_threads = num_threads
        self.prefetch = prefetch
        self._state: dict | None = None
        self._restored = False  # `_state` came from `set_state` (a checkpoint), not from fit

    def __len__(self) -> int:
        return len(self.source)

    def get_state(self) -> dict | None:
        """The position of the last batch the training state has seen (JSON), or None."""
        return None if self._state is None else dict(self._state)

    def set_state(self, state: Mapping[str, Any] | None) -> None:
        """Where to read on (a `get_state` of the run being resumed)."""
        self._state = None if state is None else dict(state)
        self._restored = state is not None

    def _record(self, state: dict) -> None:
        self._state, self._restored = state, False

    def read(self, rows: np.ndarray) -> Batch:
        """The examples `rows` (an index array, e.g. [batch]) as one host batch of its shape."""
        rows = np.asarray(rows)
        if self.transform is None and hasattr(self.source, "read_batch"):
            return self.source.read_batch(rows)
        examples = [self.source[int(i)] for i in rows.reshape(-1)]
        if self.transform is not None:
            examples = [self.transform(e) for e in examples]
        return jax.tree.map(
            lambda *xs: np.stack([np.asarray(x) for x in xs]).reshape(
                *rows.shape, *np.shape(xs[0])
            ),
            *examples,
        )

    def batches(self, rows: np.ndarray, start: int | dict) -> Iterator[tuple[Batch, dict]]:
        """`(batch, grain_state)` of the steps `rows[start:]` (`[steps, batch]` indices);
        `start` is a step of the epoch or a Grain iterator state (a restored position).

        The Grain pipeline: the epoch's steps as a `MapDataset`, each element one step's
        batch read from the source, read ahead by `num_threads` threads into a buffer of
        `prefetch` batches; `grain_state` is Grain's iterator state after that batch.
        """
        ds = grain.MapDataset.range(len(rows)).map(lambda s: self.read(rows[s]))
        options = grain.ReadOptions(
            num_threads=self.num_threads, prefetch_buffer_size=self.prefetch
        )
        it = iter(ds.to_iter_dataset(options))
        it.set_state({"next_index": start} if isinstance(start, int) else dict(start))
        try:
            for batch in it:
                yield batch, it.get_state()
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()


def data_bytes(data: Batch) -> int:
    return sum(np.asarray(x).nbytes for x in jax.tree.leaves(data))


def free_bytes(devices) -> int:
    """Memory free for a resident copy on one of `devices` (host memory for CPU devices)."""
    stats = None
    try:
        stats = devices[0].memory_stats()
    except Exception:  # not every platform reports memory
        stats = None
    if stats and devices[0].platform != "cpu" and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return _host_available_bytes() // max(len(devices), 1)  # CPU devices share the host


def _host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_resident(data: Batch, dp: parallel.DataParallel, *, share: float = 0.9) -> None:
    """Raises MemoryError, pointing at streaming, when `data` cannot be put on every device.

    Each local device holds a whole copy; it must take at most `share` of the memory
    free for one device (host memory divided among CPU devices).
    """
    need, free = data_bytes(data), free_bytes(dp.local_devices)
    if need > share * free:
        raise MemoryError(
            f"the training set takes {_gib(need)} per device ({dp.num_local_devices} local "
            f"{dp.local_devices[0].platform} devices, one copy each) but only {_gib(free)} "
            f"is free per device: {STREAM_HINT}"
        )


def resolve(train_data: Any, dp: parallel.DataParallel, input: str = "auto") -> Stream | Batch:
    """What `fit` trains from: the resident batch pytree, or a `Stream`.

    Args:
      train_data: a batch pytree of host arrays, a `Stream`, or any random-access source
        (streamed).
      dp: the data-parallel plan (the devices whose memory decides `auto`).
      input: "resident", "stream", or "auto" (resident when the copies take at most
        `RESIDENT_SHARE` of free memory, streamed otherwise; logged).
    """
    if input not in INPUTS:
        raise ValueError(f"input={input!r}; use one of {INPUTS}")
    if isinstance(train_data, Stream):
        if input == "resident":
            raise ValueError(
                "input='resident' but the training data is a Stream; pass the arrays "
                "themselves to keep them resident"
            )
        return train_data
    if not _is_batch(train_data):
        _check_source(train_data)
        if input == "resident":
            raise ValueError(
                f"input='resident' needs the training set as arrays, got a "
                f"{type(train_data).__name__} source; use input='stream'"
            )
        return Stream(train_data)
    if input == "stream":
        return Stream(ArraySource(train_data))
    if input == "resident":
        check_resident(train_data, dp)
        return train_data
    need, free = data_bytes(train_data), free_bytes(dp.local_devices)
    if need <= RESIDENT_SHARE * free:
        log.info("input: resident (%s per device, %s free)", _gib(need), _gib(free))
        return train_data
    log.info(
        "input: streaming the training set (%s per device would exceed %d%% of the %s free)",
        _gib(need),
        int(100 * RESIDENT_SHARE),
        _gib(free),
    )
    return Stream(ArraySource(train_data))


def _is_batch(tree: Any) -> bool:
    if not isinstance(tree, (Mapping, tuple, list, np.ndarray, jax.Array)):
        return False  # a source object (or a mistake `_check_source` names)
    leaves = jax.tree.leaves(tree)
    return bool(leaves) and all(isinstance(x, (np.ndarray, jax.Array)) for x in leaves)


class _ResidentFeed:
    """The resident path for `fit`: chunk arguments `(data, idx)` of `make_epoch_runner`."""

    def __init__(self, data: Batch, dp: parallel.DataParallel):
        self.dp = dp
        self.data = dp.replicate(data)

    def runner(self, train_step: Callable) -> Callable:
        return train.make_epoch_runner(train_step, self.dp)

    def args(self, rows: np.ndarray) -> tuple:
        return (self.data, self.dp.shard_columns(rows))

    def chunks(self, rows: np.ndarray, start: int, plan: list[int]) -> Iterator[tuple]:
        pos = start
        for c in plan:
            yield self.args(rows[pos : pos + c])
            pos += c

    def consumed(self, step: int, epoch: int) -> None:
        """Called after each chunk: nothing to remember (the step says where it is)."""


class _StreamFeed:
    """The streamed path for `fit`: chunk arguments `(batches,)` of `make_stream_runner`."""

    def __init__(self, stream: Stream, dp: parallel.DataParallel, order_id: dict):
        self.stream, self.dp, self.order_id = stream, dp, order_id
        self._pending: list[dict] = []  # grain state after each yielded chunk, oldest first
        self._resume: dict | None = None  # the restored Grain state, for the first epoch

    def runner(self, train_step: Callable) -> Callable:
        return train.make_stream_runner(train_step, self.dp)

    def args(self, rows: np.ndarray) -> tuple:
        batches = [self.stream.read(r) for r in rows]
        return (self.dp.shard_columns(_stack(batches)),)

    def chunks(self, rows: np.ndarray, start: int, plan: list[int]) -> Iterator[tuple]:
        position: int | dict = start
        if self._resume is not None:  # the first epoch of a resumed run: Grain's own state
            position, self._resume = self._resume, None
        it = self.stream.batches(rows, position)
        try:
            for c in plan:
                got = [next(it) for _ in range(c)]
                self._pending.append(got[-1][1])
                yield (self.dp.shard_columns(_stack([b for b, _ in got])),)
        finally:
            it.close()

    def consumed(self, step: int, epoch: int) -> None:
        grain_state = self._pending.pop(0)
        self.stream._record({"step": step, "epoch": epoch, "grain": grain_state, **self.order_id})

    def check_position(self, step: int, steps_per_epoch: int) -> None:
        """A restored stream must be where the restored train state is; mid-epoch, its Grain
        state then starts the epoch (at an epoch's end the next epoch starts afresh)."""
        saved = self.stream.get_state()
        if saved is None or not self.stream._restored:
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


def _stack(batches: list[Batch]) -> Batch:
    return jax.tree.map(lambda *xs: np.stack(xs), *batches)


def make_feed(
    data: Stream | Batch, dp: parallel.DataParallel, *, data_key: PRNGKey, batch_size: int
):
    """The feed `fit` runs for `resolve`'s answer (a resident batch is put on the devices)."""
    if isinstance(data, Stream):
        order_id = {
            "examples": len(data),
            "batch_size": int(batch_size),
            "data_key": np.asarray(train.raw_key(data_key)).ravel().tolist(),
        }
        return _StreamFeed(data, dp, order_id)
    return _ResidentFeed(data, dp)
