"""MNIST and Fashion-MNIST through tensorflow_datasets without TensorFlow, offline-safe."""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import socket
import threading
import urllib.parse
import urllib.request

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from jaxnets.data import cache, dataset, idx

logger = logging.getLogger("jaxnets.data")

URLS = {
    "mnist": "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}
REACHABILITY_TIMEOUT_S = 1.0
_READ_CHUNK = 10_000


class DataUnavailableError(RuntimeError):
    """The data set is neither prepared nor downloadable; ``reason`` says why in one line."""

    def __init__(self, reason: str, how: str = dataset.HOW_TO_GET_DATA):
        super().__init__(f"{reason}. {how}" if how else reason)
        self.reason = reason


def host_reachable(url: str, timeout: float = REACHABILITY_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host (or its proxy) opens within ``timeout`` s.

    Honours ``http(s)_proxy``/``all_proxy``/``no_proxy``. DNS resolution runs in a daemon thread
    so that a resolver stuck in retries cannot hold the caller past ``timeout``.
    """
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme) or urllib.request.getproxies().get("all")
    if proxy and not urllib.request.proxy_bypass(host or ""):
        proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        host, port = proxy_parts.hostname, proxy_parts.port or 80
    result = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


class _IdxBuilder:
    """TFDS builder body for MNIST-format IDX files: Tensor images, so no TF and no PNG codec.

    Examples keep the IDX file order (no shuffling at preparation), the order Keras'
    ``mnist.load_data`` gives, so a "last 20%" validation split is the same one.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "uint8 Tensor features in array_record, IDX file order."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz "
        "and t10k-labels-idx1-ubyte.gz (or their un-gzipped versions) in the manual directory."
    )
    SOURCE_NAME = ""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # tfds 4.9.10 resolves the code path of builders inside packages through
        # `importlib_resources`, which it only requires on Python < 3.9: say it directly.
        return epath.Path(inspect.getfile(cls))

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{self.SOURCE_NAME} from its IDX files, stored as uint8 arrays.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=dataset.IMAGE_SHAPE, dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=dataset.NUM_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
            homepage=URLS[self.SOURCE_NAME],
        )

    def _split_generators(self, dl_manager):
        try:
            directory = str(dl_manager.manual_dir)
        except AssertionError:  # no manual directory: download the four files
            names = [n + ".gz" for pair in idx.IDX_FILES.values() for n in pair]
            paths = dl_manager.download({n: URLS[self.SOURCE_NAME] + n for n in names})
            directory = None
        splits = {}
        for split, (images_name, labels_name) in idx.IDX_FILES.items():
            if directory is not None:
                pair = idx.find_idx_files(directory, split)
            else:
                pair = (str(paths[images_name + ".gz"]), str(paths[labels_name + ".gz"]))
            splits[split] = self._generate_examples(*pair)
        return splits

    def _generate_examples(self, images_path, labels_path):
        images, labels = idx.read_idx(images_path), idx.read_idx(labels_path)
        if images.ndim == 3:
            images = images[..., None]
        dataset.check_arrays(images, labels, dataset.NUM_CLASSES, f"{images_path}, {labels_path}")
        for i in range(len(labels)):
            yield i, {"image": images[i], "label": int(labels[i])}


class JaxnetsMnist(_IdxBuilder, tfds.core.GeneratorBasedBuilder):
    """MNIST (Y. LeCun, C. Cortes, C. J. C. Burges) as uint8 Tensors, prepared without TF."""

    SOURCE_NAME = "mnist"


class JaxnetsFashionMnist(_IdxBuilder, tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST (H. Xiao, K. Rasul, R. Vollgraf) as uint8 Tensors, prepared without TF."""

    SOURCE_NAME = "fashion_mnist"


_BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    "mnist": JaxnetsMnist,
    "fashion_mnist": JaxnetsFashionMnist,
}


def read_data_source(source) -> tuple[np.ndarray, np.ndarray]:
    """Reads a whole TFDS data source of ``{"image", "label"}`` records in chunks.

    Returns:
      (images uint8 [N, height, width, channels], labels int32 [N]); the shape is the first
      record's (a grey-scale [height, width] image gets a channel axis).
    """
    n = len(source)
    if n == 0:
        return np.zeros((0, *dataset.IMAGE_SHAPE), np.uint8), np.zeros((0,), np.int32)
    shape = np.shape(source[0]["image"])
    shape = (*shape, 1) if len(shape) == 2 else shape
    images = np.empty((n, *shape), np.uint8)
    labels = np.empty((n,), np.int32)
    for start in range(0, n, _READ_CHUNK):
        records = source.__getitems__(list(range(start, min(n, start + _READ_CHUNK))))
        for i, record in enumerate(records, start):
            images[i] = np.asarray(record["image"]).reshape(shape)
            labels[i] = record["label"]
    return images, labels


def _split_files(data_dir: str, split: str) -> list[str]:
    if not os.path.isdir(data_dir):
        return []
    return [os.path.join(data_dir, f) for f in os.listdir(data_dir) if f"-{split}." in f]


def _read(builder, split: str, cache_dir: str | None) -> tuple[np.ndarray, np.ndarray, str, int]:
    features = builder.info.features
    if not all(name in features for name in ("image", "label")):
        raise ValueError(
            f"TFDS {builder.name} has features {sorted(features)}; jaxnets.data.load reads "
            "image classification sets ('image' and 'label'). Stream any other set with "
            f"inputs.Stream(tfds.data_source({builder.name!r}, split=...), transform=...)"
        )
    num_classes = getattr(features["label"], "num_classes", None) or dataset.NUM_CLASSES
    source = builder.as_data_source(split=split)
    files = _split_files(str(builder.data_dir), split)
    where = f"TFDS {builder.name} {builder.version} at {builder.data_dir}"
    if not files:  # nothing on disk to key a cache on (e.g. tfds.testing.mock_data)
        images, labels = read_data_source(source)
    else:
        key = f"tfds-{builder.name}-{split}-{cache.fingerprint(files)}"
        images, labels, _ = cache.cached(cache_dir, key, lambda: read_data_source(source))
    dataset.check_arrays(images, labels, num_classes, where)
    return images, labels, where, num_classes


@contextlib.contextmanager
def _quiet_absl():
    """Silences absl warnings TFDS prints while probing a data dir that holds nothing yet."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(level)


def load_tfds(
    name: str, split: str, data_dir: str | None, cache_dir: str | None
) -> dataset.Dataset:
    """A TFDS image classification split as arrays, read without TensorFlow.

    Order: the official TFDS builder if it is prepared in a random-access format (array_record,
    e.g. on Colab); else, for ``mnist`` and ``fashion_mnist``, jaxnets' own TF-free builder
    ``jaxnets_<name>``, prepared if needed from ``DATA_DIR/downloads/manual`` or, when the
    download host answers within 1 s, by download. Any other set must be prepared in
    array_record format (preparing most sets needs TensorFlow: the error says how).

    Raises:
      DataUnavailableError: not prepared (readably) and no way to prepare it here.
    """
    with _quiet_absl():  # TFDS warns "Variant folder ... has no dataset_info.json" when probing
        return _load_tfds(name, split, data_dir, cache_dir)


def _load_tfds(
    name: str, split: str, data_dir: str | None, cache_dir: str | None
) -> dataset.Dataset:
    if name in _BUILDERS and split not in idx.IDX_FILES:
        raise ValueError(f"unknown split {split!r} for {name}; use 'train' or 'test'")
    data_dir = data_dir or tfds.core.constants.get_default_data_dir()
    try:
        official = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f"unknown data set {name!r}: not a TFDS data set ({str(e).splitlines()[0]}); use "
            "'auto', 'mnist', 'fashion_mnist', 'mnist_sample', 'idx:DIR', a TFDS name, or "
            "arrays ((images, labels) or {'image': ..., 'label': ...})"
        ) from e
    try:
        images, labels, where, classes = _read(official, split, cache_dir)
        return dataset.Dataset(images, labels, dataset.DatasetInfo(name, split, classes, where))
    except (NotImplementedError, AssertionError, FileNotFoundError, ValueError) as e:
        if name not in _BUILDERS:
            raise _not_prepared(name, data_dir, official, e) from e
        if official.is_prepared():
            logger.info(
                "TFDS %s in %s is not readable without TF (%s); using jaxnets_%s",
                name,
                data_dir,
                str(e).splitlines()[0],
                name,
            )
    builder = _BUILDERS[name](data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        manual_dir = os.path.join(data_dir, "downloads", "manual")
        has_manual = os.path.isdir(manual_dir) and any(
            f.startswith(("train-images", "t10k-images")) for f in os.listdir(manual_dir)
        )
        if not has_manual and not host_reachable(URLS[name]):
            raise DataUnavailableError(
                f"{name} is not prepared in {data_dir} and {URLS[name]} is unreachable "
                f"(no network within {REACHABILITY_TIMEOUT_S:g} s)"
            )
        config = tfds.download.DownloadConfig(manual_dir=manual_dir if has_manual else None)
        logger.info("preparing TFDS jaxnets_%s in %s (once)", name, data_dir)
        builder.download_and_prepare(download_config=config)
    images, labels, where, classes = _read(builder, split, cache_dir)
    return dataset.Dataset(images, labels, dataset.DatasetInfo(name, split, classes, where))


def _not_prepared(name: str, data_dir: str, builder, error: BaseException) -> Exception:
    """The error for a TFDS set other than MNIST's that cannot be read without TensorFlow."""
    if isinstance(error, ValueError) and "jaxnets.data.load reads" in str(error):
        return error
    how = (
        f"prepare it once where TensorFlow is installed (`pip install tensorflow "
        f"tensorflow-datasets && tfds build {name} --file_format=array_record --data_dir "
        f"{data_dir}`) and copy the directory here; jaxnets reads array_record without "
        "TensorFlow"
    )
    if builder.is_prepared():
        return DataUnavailableError(
            f"TFDS {name} in {data_dir} is prepared in a format that needs TensorFlow to read "
            f"({str(error).splitlines()[0]}); {how}",
            how="",
        )
    return DataUnavailableError(f"TFDS {name} is not prepared in {data_dir}: {how}", how="")
