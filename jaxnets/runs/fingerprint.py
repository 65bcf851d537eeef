"""Fingerprints: of a pytree's leaves on the device (checkpoints), and of a data set's content.

`fingerprints`: a 64-bit fingerprint per leaf from wrapping uint32 sums: exact and
associative, so the value does not depend on how an array is sharded. Orbax does not checksum
array data (a flipped byte in a data file restores silently); `jaxnets.runs.checkpoint` stores
these and checks them.

`data_fingerprint`: the identity of a training set's content, recorded with a run and checked
when it resumes (`check_data_fingerprint`), so that other examples of the same length are not
trained on as if nothing changed. Cheap for large data: up to `WHOLE_BYTES` per array or file
are hashed whole, a larger one by its size and `SAMPLES` blocks spread over it (a file is read
only there).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _fmix32(h: jax.Array) -> jax.Array:
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: Any) -> jax.Array:
    x = jnp.asarray(x)
    if jnp.iscomplexobj(x):
        x = jnp.stack([x.real, x.imag], axis=-1)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


@jax.jit
def fingerprints(leaves: list[Any]) -> jax.Array:
    """uint32[len(leaves), 2]: (sum of words, sum of position-mixed words) per leaf."""
    rows = []
    for x in leaves:
        w = _words(x)
        i = jnp.arange(w.size, dtype=jnp.uint32)
        mixed = _fmix32(w ^ _fmix32(i + jnp.uint32(0x9E3779B9)))
        rows.append(jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(mixed, dtype=jnp.uint32)]))
    return jnp.stack(rows) if rows else jnp.zeros((0, 2), jnp.uint32)


WHOLE_BYTES = 64 * 2**20  # an array or file up to this size is hashed whole
SAMPLES = 256  # blocks hashed of a larger one, spread evenly, first and last included
BLOCK = 4096

DATA_CHANGED = (
    "cannot resume: the training data is not the checkpointed run's (content fingerprint "
    "{saved} when it was saved, {now} now{lengths}): the examples were replaced or changed, "
    "so resuming would continue on other data. Give the run the data it was saved with, or "
    "start fresh (restart=True, or a new work directory)"
)


def _offsets(size: int) -> list[int]:
    if size <= WHOLE_BYTES:
        return [0]
    return [(size - BLOCK) * i // (SAMPLES - 1) for i in range(SAMPLES)]


def _hash_buffer(h: Any, buf: memoryview) -> None:
    size = buf.nbytes
    h.update(f"bytes {size}\n".encode())
    if size <= WHOLE_BYTES:
        h.update(buf)
        return
    for offset in _offsets(size):
        h.update(buf[offset : offset + BLOCK])


def _hash_file(h: Any, path: str, offset: int = 0, size: int | None = None) -> None:
    size = os.path.getsize(path) - offset if size is None else size
    h.update(f"bytes {size}\n".encode())
    with open(path, "rb") as f:
        if size <= WHOLE_BYTES:
            f.seek(offset)
            h.update(f.read(size))
            return
        for start in _offsets(size):
            h.update(os.pread(f.fileno(), BLOCK, offset + start))


def _hash_array(h: Any, x: Any) -> None:
    if hasattr(x, "path") and hasattr(x, "offset") and hasattr(x, "nbytes"):  # a RowFile
        h.update(f"rows {tuple(x.shape)} {np.dtype(x.dtype).str}\n".encode())
        _hash_file(h, x.path, x.offset, x.nbytes)
        return
    x = np.asarray(x)  # a memory map stays one: only the sampled pages are read
    h.update(f"array {x.shape} {x.dtype.str}\n".encode())
    if x.dtype.hasobject:
        raise TypeError(f"an array of Python objects ({x.dtype}) has no content fingerprint")
    _hash_buffer(h, np.ascontiguousarray(x).reshape(-1).view(np.uint8).data)


def data_fingerprint(data: Any) -> str:
    """A short hex digest of a data set's content, cheap for large data.

    Args:
      data: what a run trains on: a batch pytree of arrays (numpy, jax, memory-mapped), an
        `inputs.Stream` or `ArraySource` (its arrays or record files: `.npy`, IDX), a file or
        directory path (its files, by name), or another random-access source (its length and
        `SAMPLES` examples spread over it).

    Returns:
      32 hex digits; equal content gives equal digits on any machine.
    """
    h = hashlib.sha256(b"jaxnets data v1\n")
    _hash_data(h, data)
    return h.hexdigest()[:32]


def _hash_data(h: Any, data: Any) -> None:
    if hasattr(data, "source") and hasattr(data, "batches"):  # an inputs.Stream
        _hash_data(h, data.source)
    elif hasattr(data, "tree") and hasattr(data, "read_batch"):  # an ArraySource
        _hash_data(h, data.tree)
    elif isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        if os.path.isdir(path):
            for name in sorted(os.listdir(path)):
                h.update(f"file {name}\n".encode())
                _hash_data(h, os.path.join(path, name))
        else:
            _hash_file(h, path)
    elif isinstance(data, Mapping | list | tuple) or _is_leaf_array(data):
        paths_leaves = jax.tree_util.tree_flatten_with_path(data, is_leaf=_is_leaf_array)[0]
        for path, leaf in paths_leaves:
            h.update(f"leaf {jax.tree_util.keystr(path)}\n".encode())
            _hash_array(h, leaf)
    elif hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        n = len(data)
        h.update(f"source {type(data).__name__} {n}\n".encode())
        for i in sorted({(n - 1) * k // max(SAMPLES - 1, 1) for k in range(SAMPLES)} if n else ()):
            _hash_data(h, data[i])
    else:
        _hash_array(h, data)


def _is_leaf_array(x: Any) -> bool:
    return isinstance(x, np.ndarray | jax.Array) or (hasattr(x, "path") and hasattr(x, "nbytes"))


def check_data_fingerprint(
    saved: str | None, now: str, *, saved_examples: int | None = None, examples: int | None = None
) -> None:
    """Raises ValueError when a resumed run's data differs from the data it was saved with
    (`saved`: the checkpoint's `data_fingerprint`, None for a run saved before they were)."""
    if saved is None or saved == now:
        return
    lengths = ""
    if saved_examples is not None and examples is not None:
        same = "the same length" if saved_examples == examples else "another length"
        lengths = f"; {saved_examples} examples then, {examples} now: {same}"
    raise ValueError(DATA_CHANGED.format(saved=saved, now=now, lengths=lengths))
