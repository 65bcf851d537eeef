"""IDX files, the format MNIST ships in: a reader that checks every byte, and a writer."""

from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np

# The third byte of the magic number names the element type (big-endian on disk).
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_DTYPE_CODES = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}

# The four files of an MNIST-style IDX directory, by split.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_bytes(path: str) -> bytes:
    if not path.endswith(".gz"):
        with open(path, "rb") as f:
            return f.read()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(
            f"IDX file {path} is not a valid gzip file ({e}); it is corrupt or truncated: "
            "download it again (or gunzip it and pass the plain file)"
        ) from e


def read_header(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype, int]:
    """`(shape, dtype, data offset)` of a plain (not gzipped) IDX file, for reading rows."""
    path = os.fspath(path)
    if path.endswith(".gz"):
        raise ValueError(
            f"IDX file {path} is gzip-compressed, which cannot be read by row; gunzip it "
            "first (or load() it whole)"
        )
    with open(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in _IDX_DTYPES or not head[3]:
            raise ValueError(f"{path} is not an IDX file (magic {head.hex()})")
        shape = struct.unpack(f">{head[3]}I", f.read(4 * head[3]))
    return shape, _IDX_DTYPES[head[2]], 4 + 4 * len(shape)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file (plain or ``.gz``) into a numpy array.

    The format: two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), a byte with the number of dimensions ``d``, ``d`` big-endian
    uint32 sizes, then the data in C order.

    Args:
      path: the file; a name ending in ``.gz`` is decompressed.

    Returns:
      An array of the stored shape, in native byte order (``uint8`` for MNIST files).

    Raises:
      ValueError: the file is shorter than its header, has a bad magic number, or holds more
        or fewer bytes than its header announces; the message names the file and the numbers.
    """
    path = os.fspath(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"IDX file {path} has {len(raw)} bytes, fewer than its 4-byte magic")
    zero0, zero1, code, ndim = raw[:4]
    magic = int.from_bytes(raw[:4], "big")
    if zero0 != 0 or zero1 != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"IDX file {path} has bad magic number 0x{magic:08X}; an IDX file starts with "
            "0x0000TTDD (TT: 08 uint8 .. 0E float64, DD: number of dimensions), e.g. "
            "0x00000803 for MNIST images and 0x00000801 for labels. Is it an IDX file "
            "(gzip-compressed files must end in .gz)?"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"IDX file {path} is truncated: {len(raw)} bytes, shorter than its "
            f"{header}-byte header for {ndim} dimensions"
        )
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        kind = "truncated" if got < expected else "longer than its header says"
        raise ValueError(
            f"IDX file {path} is {kind}: header says shape {shape} of {dtype.name} "
            f"({expected} data bytes) but the file holds {got} data bytes; download it again"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=False)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Writes ``array`` as an IDX file (gzip-compressed when ``path`` ends in ``.gz``).

    Args:
      path: the file to write.
      array: any array of uint8, int8, int16, int32, float32 or float64.
    """
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    if native not in _DTYPE_CODES:
        raise ValueError(f"IDX cannot store dtype {array.dtype}; use one of {list(_DTYPE_CODES)}")
    code = _DTYPE_CODES[native]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    path = os.fspath(path)
    if path.endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)
    with open(path, "wb") as f:
        f.write(payload)


def find_idx_files(directory: str | os.PathLike, split: str) -> tuple[str, str]:
    """Returns the (images, labels) paths of ``split`` in an MNIST-style IDX directory.

    Args:
      directory: holds ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
        ``t10k-images-idx3-ubyte[.gz]`` and ``t10k-labels-idx1-ubyte[.gz]``.
      split: ``"train"`` or ``"test"``.

    Raises:
      ValueError: the directory or one of the split's two files is missing.
    """
    directory = os.fspath(directory)
    if split not in IDX_FILES:
        raise ValueError(
            f"unknown split {split!r} for an IDX directory; use one of {list(IDX_FILES)}"
        )
    if not os.path.isdir(directory):
        raise ValueError(
            f"IDX directory {directory!r} does not exist; pass 'idx:DIR' with a directory "
            f"holding {', '.join(n + '[.gz]' for pair in IDX_FILES.values() for n in pair)}"
        )
    paths = []
    for stem in IDX_FILES[split]:
        for name in (stem, stem + ".gz"):
            if os.path.isfile(os.path.join(directory, name)):
                paths.append(os.path.join(directory, name))
                break
        else:
            present = sorted(os.listdir(directory))
            raise ValueError(
                f"IDX directory {directory!r} has no {stem} or {stem}.gz (split {split!r}); "
                f"it holds {present[:10]}. Put the four MNIST-format files there "
                "(e.g. apt-get install dataset-fashion-mnist: /usr/share/datasets/fashion-mnist)"
            )
    return paths[0], paths[1]
