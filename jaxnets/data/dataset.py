"""A data set as the loaders return it: arrays, what they are, where they came from."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10

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
      images: uint8 [N, height, width, channels] (MNIST: [N, 28, 28, 1]).
      labels: int32 [N], in ``[0, info.num_classes)``.
      info: a ``DatasetInfo``.
    """

    images: np.ndarray
    labels: np.ndarray
    info: DatasetInfo


def check_arrays(images: np.ndarray, labels: np.ndarray, num_classes: int, source: str) -> None:
    """Raises ValueError naming ``source`` unless images/labels form a valid data set.

    Args:
      images: must be uint8 [N, height, width, channels] (any size and channel count).
      labels: must be integer [N] with values in ``[0, num_classes)``.
      num_classes: number of classes.
      source: where the arrays came from, for the message.
    """
    if images.ndim != 4:
        raise ValueError(
            f"{source}: images have shape {images.shape}, expected [N, height, width, channels] "
            "(channels last; grey-scale [N, height, width] gets a channel axis when loaded)"
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
    check_labels(labels, num_classes, what=source)


def check_labels(labels: np.ndarray, num_classes: int, *, what: str = "labels") -> None:
    """Raises ValueError saying what is wrong with classification labels, once, on the host.

    A label outside the classes would otherwise reach the loss as a NaN (read as a
    learning-rate problem), and float labels of the wrong shape as a broadcasting error
    deep inside the step.

    Args:
      labels: int class ids [N] in `[0, num_classes)`, or one-hot / probability rows
        [N, num_classes] (floats in [0, 1], each row summing to 1).
      num_classes: the model's number of outputs.
      what: names the data in the message (e.g. "training labels").
    """
    labels = np.asarray(labels)
    if not len(labels):
        return
    if np.issubdtype(labels.dtype, np.integer):
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            count = int(np.sum((labels < 0) | (labels >= num_classes)))
            raise ValueError(
                f"{what}: label {bad} outside [0, {num_classes}) ({count} of {labels.size} "
                f"labels; they span [{lo}, {hi}]): the labels are corrupt or not 0-based, or "
                "num_classes is wrong for this data set"
            )
        return
    if not np.issubdtype(labels.dtype, np.floating):
        raise ValueError(f"{what}: labels of dtype {labels.dtype}; use int class ids or floats")
    if labels.ndim < 2 or labels.shape[-1] != num_classes:
        integral = bool(np.all(labels == np.round(labels)))
        hint = " (class ids stored as floats: use labels.astype(np.int32))" if integral else ""
        raise ValueError(
            f"{what}: float labels of shape {labels.shape} for {num_classes} classes; float "
            f"labels are one-hot or probability rows [N, {num_classes}]{hint}"
        )
    sums = labels.sum(-1)
    if labels.min() < 0 or labels.max() > 1 or not np.allclose(sums, 1.0, atol=1e-3):
        row = int(np.argmax(np.abs(sums - 1.0)))
        raise ValueError(
            f"{what}: one-hot / probability labels must be in [0, 1] and sum to 1 per row; "
            f"row {row} sums to {float(sums.flat[row]):.4g} (values span "
            f"[{float(labels.min()):.4g}, {float(labels.max()):.4g}])"
        )
