"""Random-access sources of examples: host arrays, and record files read by row (`.npy`, IDX)."""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import numpy as np

from jaxnets.core.types import Batch
from jaxnets.data.batching import num_examples


class ArraySource:
    """Random access to a batch pytree of host arrays (numpy or memory-mapped `.npy`).

    A batch of examples is read with one fancy index per leaf, not one Python call per
    example; memory-mapped leaves are read from the file only where indexed.

    Args:
      tree: a pytree of arrays with the same leading example axis, e.g.
        `{"image": uint8 [N, 28, 28, 1], "label": int32 [N]}`.
    """

    def __init__(self, tree: Batch):
        self.tree = tree
        self._len = num_examples(tree, "the streamed source")

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> Batch:
        return jax.tree.map(lambda x: np.asarray(x[i]), self.tree)

    def read_batch(self, indices: np.ndarray) -> Batch:
        """The examples `indices` as one batch (leading axis `len(indices)`)."""
        return jax.tree.map(lambda x: np.asarray(x[indices]), self.tree)

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self.tree))


class RowFile:
    """Rows of a file of fixed-size records, read on demand with `os.pread`: an array-like
    for `ArraySource` (`.npy` files: `open_npy`; plain IDX files: `open_idx`).

    Unlike a memory map, reading does not map the file into the process: pages the kernel
    reads ahead stay in its page cache, and the process's memory holds only what was asked
    for, however large the file and however long the run.

    Args:
      path: the file.
      shape: `[rows, ...]` of the stored array (C order).
      dtype: the stored element type (read values come back in native byte order).
      offset: where the first row starts.
      row_shape: the shape of one row as served (default: `shape[1:]`), e.g. with a
        channel axis added.
    """

    def __init__(self, path, shape, dtype, offset, row_shape=None):
        self.path, self._stored, self.offset = os.fspath(path), np.dtype(dtype), int(offset)
        row_shape = tuple(shape[1:]) if row_shape is None else tuple(row_shape)
        self.shape = (int(shape[0]), *row_shape)
        self.dtype, self.ndim = self._stored.newbyteorder("="), len(self.shape)
        self._row = int(np.prod(shape[1:], dtype=np.int64)) * self._stored.itemsize
        self.nbytes = self._row * self.shape[0]
        need = self.offset + self.nbytes
        if os.path.getsize(self.path) < need:
            raise OSError(
                f"{self.path} is truncated: {os.path.getsize(self.path)} bytes, its header "
                f"announces {need}"
            )
        self._fd = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        rows = np.asarray(index)
        out = np.empty((rows.size, *self.shape[1:]), self._stored)
        flat = out.reshape(rows.size, -1).view(np.uint8)
        for j, i in enumerate(rows.reshape(-1).tolist()):
            if not 0 <= i < self.shape[0]:
                raise IndexError(f"row {i} of {self.path} ({self.shape[0]} rows)")
            if os.preadv(self._fd, [flat[j]], self.offset + i * self._row) != self._row:
                raise OSError(f"{self.path} is truncated: row {i} is incomplete")
        return out.astype(self.dtype, copy=False).reshape(*rows.shape, *self.shape[1:])

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)


def _npy_rows(path: str | os.PathLike) -> RowFile:
    """The rows of a `.npy` file (C order, numbers), read on demand (`RowFile`)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        header = {(1, 0): np.lib.format.read_array_header_1_0}.get(
            version, np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = header(f)
        offset = f.tell()
    if fortran or dtype.hasobject or not shape:
        raise ValueError(
            f"{path}: a streamed .npy needs a C-ordered array of numbers with an "
            f"example axis, got shape {shape}, dtype {dtype}, fortran_order={fortran}"
        )
    return RowFile(path, shape, dtype, offset)


def open_idx(images: str | os.PathLike, labels: str | os.PathLike) -> ArraySource:
    """A source over a pair of plain IDX files (`{"image": uint8 [H, W, C], "label"}`).

    Grey-scale `[N, H, W]` images get a channel axis, as `jaxnets.data.load` gives them.
    """
    from jaxnets.data import idx

    shape, dtype, offset = idx.read_header(images)
    row = (*shape[1:], 1) if len(shape) == 3 else shape[1:]
    image_file = RowFile(images, shape, dtype, offset, row_shape=row)
    label_file = RowFile(labels, *idx.read_header(labels))
    if len(image_file) != len(label_file):
        raise ValueError(
            f"{images} has {len(image_file)} images but {labels} has {len(label_file)} "
            "labels; the files must be of the same split and complete"
        )
    return ArraySource({"image": image_file, "label": label_file})


def open_npy(paths: Mapping[str, str | os.PathLike], *, mmap: bool = False) -> ArraySource:
    """A source over `.npy` files (one per field, same length), read without loading them.

    Args:
      paths: field name -> `.npy` path.
      mmap: memory-map the files (`np.load(mmap_mode="r")`) instead of reading rows with
        `os.pread` (`RowFile`): the same values, but pages touched stay mapped, so the
        process's resident memory grows towards the file's size over an epoch.

    Example:
      >>> source = open_npy({"image": "train_images.npy", "label": "train_labels.npy"})
    """
    read = (lambda p: np.load(p, mmap_mode="r")) if mmap else _npy_rows
    return ArraySource({name: read(path) for name, path in paths.items()})
