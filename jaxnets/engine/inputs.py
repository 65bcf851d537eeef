"""Training input: the resident path and the streamed (Grain) path behind one interface.

- **Resident**: the whole training set is put on every device once and each step gathers
  its batch by index inside the scanned steps. The fastest path, for data that fits: a
  memory check runs before anything is placed.
- **Streamed**: a Grain pipeline over a random-access source (numpy arrays, `.npy` files
  memory-mapped, a TFDS `data_source`, any object with `__len__` and `__getitem__`). The
  order is the resident path's (`indices.epoch_indices`, a pure function of the data key and
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
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

from jaxnets.core.types import Batch
from jaxnets.data.records import ArraySource, RowFile, open_idx, open_npy

__all__ = ["ArraySource", "RowFile", "Stream", "open_idx", "open_npy", "resolve"]

log = logging.getLogger("jaxnets.engine.inputs")

INPUTS = ("auto", "resident", "stream")
# `auto` keeps a data set resident when its copies take at most this share of free memory.
RESIDENT_SHARE = 0.5
STREAM_HINT = (
    "stream it instead: input='stream' (the data is then read from the host while training, "
    "in bounded memory)"
)


def _check_source(source: Any) -> None:
    if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
        raise TypeError(
            f"a streamed source needs __len__ and __getitem__ (random access), got "
            f"{type(source).__name__}; wrap arrays in inputs.ArraySource, files in "
            "inputs.open_npy, a TFDS set in tfds.data_source(name, split=...)"
        )


NOT_THREAD_SAFE = (
    "the streamed source {source} {why}: it is not safe to read from several threads at once "
    "(e.g. one file object's seek and read shared by every call), and Stream(num_threads="
    "{num_threads}) would train on torn examples. Read it on one thread: Stream(source, "
    "num_threads=0), or mark the source with `thread_safe = False`; or make `__getitem__` "
    "thread-safe (os.pread, a lock, or a file opened per thread)"
)
PROBE_EXAMPLES = 32  # examples a source of unknown thread safety is read twice to check it
PROBE_ROUNDS = 16


def _example_bytes(example: Any) -> bytes:
    return b"".join(np.asarray(x).tobytes() for x in jax.tree.leaves(example))


def _check_thread_safe(source: Any, num_threads: int) -> None:
    """Refuses a source that is not thread-safe for `num_threads` reading threads: one that
    says so (`thread_safe = False`), or one whose examples differ when read concurrently
    (a probe of `PROBE_EXAMPLES` examples; arrays and `RowFile`s are safe and not probed)."""
    name = type(source).__name__
    declared = getattr(source, "thread_safe", None)
    if num_threads == 0 or declared is True:
        return
    if declared is False:
        why = "says it is not thread-safe (thread_safe = False)"
        raise ValueError(NOT_THREAD_SAFE.format(source=name, why=why, num_threads=num_threads))
    if num_threads == 1 or isinstance(source, ArraySource) or len(source) == 0:
        return  # one reading thread; numpy fancy indexing and os.pread are thread-safe
    from concurrent.futures import ThreadPoolExecutor

    n = len(source)
    probe = sorted({i * n // PROBE_EXAMPLES for i in range(min(n, PROBE_EXAMPLES))})
    want = {i: _example_bytes(source[i]) for i in probe}
    with ThreadPoolExecutor(max(num_threads, 4)) as pool:
        for _ in range(PROBE_ROUNDS):
            order = probe * 4
            for i, got in zip(order, pool.map(lambda i: _example_bytes(source[i]), order)):
                if got != want[i]:
                    why = f"returned another example {i} when read from several threads at once"
                    raise ValueError(
                        NOT_THREAD_SAFE.format(source=name, why=why, num_threads=num_threads)
                    )


class Stream:
    """A training set streamed from a random-access source while training.

    `loop.fit` drives it: epoch `e` reads the batches of `indices.epoch_indices(data_key, e,
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
      num_threads: Grain's reading threads (0: read on the training thread). The contract:
        with `num_threads >= 1`, `source[i]` (and `transform`) are called from several
        threads at once and must be thread-safe. Arrays, `open_npy`, `open_idx` (`os.pread`)
        and TFDS `data_source`s are; a reader sharing one file object's position
        (`f.seek(); f.read()`) is not. A source with `thread_safe = False` gets
        `num_threads=0` by default; with 2 or more threads, one of unknown safety is probed
        (its examples read alone and from several threads must agree) and refused when
        they differ.
        Default: 1, or 0 for a source with `thread_safe = False`.
      prefetch: batches read ahead (host memory holds at most this many, plus one chunk).

    Example:
      >>> train_input = Stream(open_npy({"image": "x.npy", "label": "y.npy"}))
      >>> loop.fit(state, step, train_input, data_key=key, epochs=1, batch_size=128)
    """

    def __init__(
        self,
        source: Any,
        *,
        transform: Callable[[Any], Any] | None = None,
        num_threads: int | None = None,
        prefetch: int = 16,
    ):
        _check_source(source)
        if num_threads is None:
            num_threads = 0 if getattr(source, "thread_safe", None) is False else 1
        for name, value, low in (("num_threads", num_threads, 0), ("prefetch", prefetch, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Stream({name}={value!r}): must be an int >= {low}")
        _check_thread_safe(source, num_threads)
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

    @property
    def restored(self) -> bool:
        """Whether the position came from `set_state` (a checkpoint), not from a `fit`."""
        return self._restored

    def record(self, state: dict) -> None:
        """Called by the feed after each chunk: the position the train state has reached."""
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

    def batches(
        self, rows: np.ndarray, start: int | dict
    ) -> Generator[tuple[Batch, dict], None, None]:
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


def check_resident(data: Batch, devices: Sequence[Any], *, share: float = 0.9) -> None:
    """Raises MemoryError, pointing at streaming, when `data` cannot be put on every device.

    Each local device holds a whole copy; it must take at most `share` of the memory
    free for one device (host memory divided among CPU devices).
    """
    need, free = data_bytes(data), free_bytes(devices)
    if need > share * free:
        raise MemoryError(
            f"the training set takes {_gib(need)} per device ({len(devices)} local "
            f"{devices[0].platform} devices, one copy each) but only {_gib(free)} "
            f"is free per device: {STREAM_HINT}"
        )


def resolve(train_data: Any, devices: Sequence[Any], input: str = "auto") -> Stream | Batch:
    """What `fit` trains from: the resident batch pytree, or a `Stream`.

    Args:
      train_data: a batch pytree of host arrays, a `Stream`, or any random-access source
        (streamed).
      devices: this process's devices (whose memory decides `auto`).
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
        check_resident(train_data, devices)
        return train_data
    need, free = data_bytes(train_data), free_bytes(devices)
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


def check_finite(data: Batch, what: str) -> None:
    """Once, on the host: NaN or Inf in float inputs would show up as a non-finite loss."""
    for path, x in jax.tree_util.tree_flatten_with_path(data)[0]:
        x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.inexact) or np.isfinite(x.sum()):
            continue  # the sum is finite only if every value is (2x faster than isfinite)
        if not np.all(np.isfinite(x)):  # else the sum merely overflowed
            bad = ~np.isfinite(x.reshape(len(x), -1)).all(-1)
            raise ValueError(
                f"{what}{jax.tree_util.keystr(path)}: {int(bad.sum())} of {len(x)} examples "
                f"hold NaN or Inf (the first is example {int(np.argmax(bad))}); fix or drop "
                "them before training"
            )
