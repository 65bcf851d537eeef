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
    if len(labels):
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"{source}: label {bad} outside [0, {num_classes}) (labels span [{lo}, {hi}]); "
                "the label file is corrupt, or num_classes is wrong for this data set"
            )
