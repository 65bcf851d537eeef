"""jaxnets.data: IDX files, the bundled sample, TFDS without TF, offline detection, batching."""

import gzip
import logging
import os
import socket
import struct
import time

import jax
import numpy as np
import pytest

from jaxnets import data
from jaxnets.data import idx, sources

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def _write_split(directory, split, images, labels, gz=True):
    names = idx.IDX_FILES[split]
    suffix = ".gz" if gz else ""
    idx.write_idx(os.path.join(directory, names[0] + suffix), images)
    idx.write_idx(os.path.join(directory, names[1] + suffix), labels)


def _mnist_like(n, seed):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, (n,), dtype=np.uint8)
    return images, labels


# ---------------------------------------------------------------- IDX files


def test_read_idx_hand_built_file(tmp_path):
    payload = bytes([0, 0, 0x08, 2]) + struct.pack(">II", 2, 3) + bytes([1, 2, 3, 4, 5, 255])
    (tmp_path / "a").write_bytes(payload)
    (tmp_path / "a.gz").write_bytes(gzip.compress(payload))
    expected = np.array([[1, 2, 3], [4, 5, 255]], np.uint8)
    for name in ("a", "a.gz"):
        got = idx.read_idx(tmp_path / name)
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("name", ["x", "x.gz"])
def test_write_read_idx_round_trip(tmp_path, dtype, name):
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    idx.write_idx(tmp_path / name, array)
    got = idx.read_idx(tmp_path / name)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, array)


def test_write_idx_header_bytes(tmp_path):
    idx.write_idx(tmp_path / "h", np.zeros((60000, 28, 28), np.uint8))
    with open(tmp_path / "h", "rb") as f:
        assert f.read(16) == bytes.fromhex("00000803 0000ea60 0000001c 0000001c")


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"\x00\x00", "fewer than its 4-byte magic"),
        (bytes([0x1F, 0x8B, 8, 3]) + b"\0" * 20, r"bad magic number 0x1F8B0803"),
        (bytes([0, 0, 0x07, 1]) + b"\0" * 8, r"bad magic number 0x00000701"),
        (bytes([0, 0, 8, 3, 0, 0]), "truncated: 6 bytes, shorter than its 16-byte header"),
        (bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\1" * 7, r"truncated.*10 data bytes.*7"),
        (bytes([0, 0, 8, 1]) + struct.pack(">I", 2) + b"\1" * 3, "longer than its header says"),
    ],
)
def test_read_idx_corrupt_files(tmp_path, payload, match):
    (tmp_path / "bad").write_bytes(payload)
    with pytest.raises(ValueError, match=match):
        idx.read_idx(tmp_path / "bad")


def test_read_idx_corrupt_gzip(tmp_path):
    good = gzip.compress(bytes([0, 0, 8, 1]) + struct.pack(">I", 1000) + b"\1" * 1000)
    (tmp_path / "cut.gz").write_bytes(good[: len(good) // 2])
    (tmp_path / "plain.gz").write_bytes(b"not gzip at all")
    for name in ("cut.gz", "plain.gz"):
        with pytest.raises(ValueError, match="not a valid gzip file.*corrupt or truncated"):
            idx.read_idx(tmp_path / name)


# ---------------------------------------------------------------- IDX directories


@pytest.mark.parametrize("gz", [True, False])
def test_load_idx_directory_and_cache(tmp_path, gz):
    train, test = _mnist_like(50, 0), _mnist_like(20, 1)
    _write_split(tmp_path, "train", *train, gz=gz)
    _write_split(tmp_path, "test", *test, gz=gz)
    cache = tmp_path / "cache"
    for split, (images, labels) in (("train", train), ("test", test)):
        first = data.load(f"idx:{tmp_path}", split=split, cache_dir=cache)
        second = data.load(f"idx:{tmp_path}", split=split, cache_dir=cache)
        for ds in (first, second):
            assert ds.images.dtype == np.uint8 and ds.images.shape == (len(labels), 28, 28, 1)
            assert ds.labels.dtype == np.int32
            np.testing.assert_array_equal(ds.images[..., 0], images)
            np.testing.assert_array_equal(ds.labels, labels)
            assert ds.info == data.DatasetInfo(
                f"idx:{tmp_path}", split, 10, f"IDX directory {tmp_path}"
            )
    assert len(list(cache.glob("idx-*.npz"))) == 2


def test_idx_cache_is_invalidated_when_the_files_change(tmp_path):
    _write_split(tmp_path, "train", *_mnist_like(10, 0))
    before = data.load(f"idx:{tmp_path}", cache_dir=tmp_path / "c")
    images, labels = _mnist_like(12, 1)
    time.sleep(0.01)
    _write_split(tmp_path, "train", images, labels)
    after = data.load(f"idx:{tmp_path}", cache_dir=tmp_path / "c")
    assert len(before.labels) == 10
    np.testing.assert_array_equal(after.labels, labels)


def test_idx_missing_directory_and_files(tmp_path):
    with pytest.raises(ValueError, match="IDX directory .*nowhere' does not exist"):
        data.load(f"idx:{tmp_path / 'nowhere'}")
    _write_split(tmp_path, "train", *_mnist_like(5, 0))
    with pytest.raises(
        ValueError, match=r"has no t10k-images-idx3-ubyte or .*\.gz \(split 'test'\)"
    ):
        data.load(f"idx:{tmp_path}", split="test", cache_dir=tmp_path)
    os.remove(tmp_path / "train-labels-idx1-ubyte.gz")
    with pytest.raises(ValueError, match="has no train-labels-idx1-ubyte"):
        data.load(f"idx:{tmp_path}", cache_dir=tmp_path)


@pytest.mark.parametrize(
    "images, labels, match",
    [
        (np.zeros((4, 784), np.uint8), np.zeros(4, np.uint8), r"shape \(4, 784\), expected \[N, h"),
        (np.zeros((4, 28, 28), np.float32), np.zeros(4, np.uint8), "dtype float32, expected uint8"),
        (np.zeros((4, 28, 28), np.uint8), np.array([0, 1, 10, 2], np.uint8), r"label 10 outside"),
        (np.zeros((4, 28, 28), np.uint8), np.array([0, -1, 2, 3], np.int8), r"label -1 outside"),
        (np.zeros((4, 28, 28), np.uint8), np.zeros(3, np.uint8), "4 images but 3 labels"),
    ],
)
def test_idx_bad_content(tmp_path, images, labels, match):
    _write_split(tmp_path, "train", images, labels)
    with pytest.raises(ValueError, match=match):
        data.load(f"idx:{tmp_path}", cache_dir=tmp_path)


def test_cifar_shaped_idx_and_arrays_load(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 1, 2], np.uint8)
    _write_split(tmp_path, "train", images, labels)
    ds = data.load(f"idx:{tmp_path}", cache_dir=tmp_path)
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    arrays = data.load((images[..., 0], labels.astype(np.int64) + 10))  # grey, 20 classes
    assert arrays.images.shape == (6, 32, 32, 1) and arrays.info.num_classes == 20
    assert arrays.labels.dtype == np.int32
    same = data.load({"image": images, "label": labels})
    np.testing.assert_array_equal(same.images, images)
    with pytest.raises(ValueError, match=r"missing \['label'\]"):
        data.load({"image": images})
    with pytest.raises(ValueError, match="dtype float32, expected uint8"):
        data.load((images.astype(np.float32), labels))


def test_unknown_name_and_split(tmp_path):
    with pytest.raises(ValueError, match="unknown data set 'no_such_set'.*a TFDS name, or arrays"):
        data.load("no_such_set")
    with pytest.raises(
        data.DataUnavailableError,
        match=r"TFDS cifar10 is not prepared in .*tfds build cifar10 --file_format=array_record",
    ):
        data.load("cifar10", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        data.load("mnist_sample", split="validation")


# ---------------------------------------------------------------- bundled sample


def test_bundled_sample_offline():
    train, test = data.load("mnist_sample"), data.load("mnist_sample", split="test")
    for ds, n in ((train, 4000), (test, 1000)):
        assert ds.images.shape == (n, 28, 28, 1) and ds.images.dtype == np.uint8
        assert ds.labels.shape == (n,) and ds.labels.dtype == np.int32
        np.testing.assert_array_equal(np.bincount(ds.labels, minlength=10), [n // 10] * 10)
        assert ds.info.source == sources.SAMPLE_SOURCE
        assert ds.info.num_classes == 10
    # Real digits, not noise: mostly black background, bright strokes, no test image in train.
    assert 0.75 < (train.images == 0).mean() < 0.85 and train.images.max() == 255
    train_rows = {img.tobytes() for img in train.images}
    assert not any(img.tobytes() in train_rows for img in test.images)
    # Served shuffled: Keras' "last 20%" validation split and any prefix hold every class.
    _, (_, val_labels) = data.split_validation(train.images, train.labels, 0.2)
    assert np.bincount(val_labels, minlength=10).min() >= 50
    assert np.bincount(train.labels[:200], minlength=10).min() >= 5


def test_bundled_sample_file_is_small():
    assert (
        os.path.getsize(os.path.join(os.path.dirname(sources.__file__), "mnist_sample.npz")) < 1e6
    )


# ---------------------------------------------------------------- TFDS without TensorFlow


def _closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def offline(monkeypatch):
    """Network blocked: every proxy variable points at a closed local port."""
    proxy = f"http://127.0.0.1:{_closed_port()}"
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, proxy)
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)


def test_tfds_mock_data_without_tensorflow(tmp_path, monkeypatch):
    import importlib.util

    import tensorflow_datasets as tfds
    from tensorflow_datasets.testing import mocking

    assert importlib.util.find_spec("tensorflow") is None
    # tfds 4.9.10's mock assigns `__getitems__` on a MagicMock as a plain attribute, so it is
    # called without `self` and fails; give it a function that needs none (the bulk read path).
    monkeypatch.setattr(
        mocking, "_getitems", lambda keys, generator, serialized=False: [generator[k] for k in keys]
    )
    with tfds.testing.mock_data(num_examples=12):
        ds = data.load("mnist", split="train", data_dir=tmp_path, cache_dir=tmp_path)
        reference = tfds.data_source("mnist", split="train")
        expected = [reference[i] for i in range(12)]
    assert ds.images.shape == (12, 28, 28, 1) and ds.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.images, np.stack([e["image"] for e in expected]))
    np.testing.assert_array_equal(ds.labels, [e["label"] for e in expected])
    assert ds.info.name == "mnist" and "TFDS mnist" in ds.info.source


def test_offline_tfds_fails_fast_with_instructions(tmp_path, offline):
    start = time.perf_counter()
    with pytest.raises(data.DataUnavailableError) as err:
        data.load("fashion_mnist", data_dir=tmp_path / "tfds", cache_dir=tmp_path)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, elapsed
    message = str(err.value)
    assert "fashion_mnist is not prepared" in message and "unreachable" in message
    for hint in ("TFDS_DATA_DIR", "idx:DIR", "downloads/manual", "storage.googleapis.com"):
        assert hint in message


def test_auto_falls_back_to_the_sample_loudly(tmp_path, offline, caplog):
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="jaxnets.data"):
        ds = data.load("auto", split="test", data_dir=tmp_path / "tfds", cache_dir=tmp_path)
    assert time.perf_counter() - start < 2.0
    assert ds.info.source == sources.SAMPLE_SOURCE and ds.info.name == "mnist_sample"
    assert ds.images.shape == (1000, 28, 28, 1)
    assert "USING THE BUNDLED SAMPLE" in caplog.text


def test_host_reachable_does_not_wait_for_a_hanging_resolver(monkeypatch):
    from jaxnets.data import tfds_source

    def hang(*args, **kwargs):
        time.sleep(5)
        raise OSError("resolver gave up")

    monkeypatch.setattr(tfds_source.socket, "create_connection", hang)
    start = time.perf_counter()
    assert not data.host_reachable("https://storage.googleapis.com/x", timeout=0.3)
    assert time.perf_counter() - start < 1.0


def test_host_reachable_true_for_a_listening_port():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        port = server.getsockname()[1]
        assert data.host_reachable(f"http://127.0.0.1:{port}/")
    finally:
        server.close()
    assert not data.host_reachable(f"http://127.0.0.1:{_closed_port()}/")


@pytest.mark.slow
def test_tfds_own_builder_prepares_offline_from_manual_dir(tmp_path, offline):
    manual = tmp_path / "tfds" / "downloads" / "manual"
    manual.mkdir(parents=True)
    train, test = _mnist_like(40, 2), _mnist_like(15, 3)
    _write_split(manual, "train", *train)
    _write_split(manual, "test", *test)
    for split, (images, labels) in (("train", train), ("test", test)):
        ds = data.load("mnist", split=split, data_dir=tmp_path / "tfds", cache_dir=tmp_path)
        # IDX file order is kept (no shuffling at preparation), as Keras' load_data gives it.
        np.testing.assert_array_equal(ds.images[..., 0], images)
        np.testing.assert_array_equal(ds.labels, labels)
        assert "TFDS jaxnets_mnist 1.0.0" in ds.info.source
    assert (tmp_path / "tfds" / "jaxnets_mnist" / "1.0.0" / "dataset_info.json").exists()
    start = time.perf_counter()
    again = data.load("mnist", split="train", data_dir=tmp_path / "tfds", cache_dir=tmp_path)
    assert time.perf_counter() - start < 1.0
    np.testing.assert_array_equal(again.labels, train[1])
    assert len(list(tmp_path.glob("tfds-jaxnets_mnist-*.npz"))) == 2


@pytest.mark.slow
@pytest.mark.skipif(
    not os.path.isdir(FASHION_DIR),
    reason=f"{FASHION_DIR} missing: apt-get install dataset-fashion-mnist for full-scale tests",
)
def test_full_fashion_mnist_idx_loads_fast_when_cached(tmp_path):
    first = data.load(f"idx:{FASHION_DIR}", cache_dir=tmp_path)
    start = time.perf_counter()
    train = data.load(f"idx:{FASHION_DIR}", cache_dir=tmp_path)
    test = data.load(f"idx:{FASHION_DIR}", split="test", cache_dir=tmp_path)
    assert time.perf_counter() - start < 1.5
    assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
    np.testing.assert_array_equal(first.images, train.images)


# ---------------------------------------------------------------- batching


def test_epoch_permutation_is_a_pure_function_of_key_and_epoch():
    key = jax.random.key(1024)
    p0 = np.asarray(data.epoch_permutation(key, 0, 1000))
    np.testing.assert_array_equal(np.sort(p0), np.arange(1000))
    np.testing.assert_array_equal(p0, data.epoch_permutation(jax.random.key(1024), 0, 1000))
    jitted = jax.jit(data.epoch_permutation, static_argnums=2)
    np.testing.assert_array_equal(p0, jitted(key, 0, 1000))
    p1 = np.asarray(jitted(key, 1, 1000))
    assert (p0 != p1).mean() > 0.9
    assert (p0 != np.asarray(data.epoch_permutation(jax.random.key(1), 0, 1000))).mean() > 0.9


def test_split_validation_takes_the_last_fraction():
    images, labels = np.arange(10)[:, None] * np.ones((1, 3)), np.arange(10)
    (tx, ty), (vx, vy) = data.split_validation(images, labels, 0.2)
    np.testing.assert_array_equal(ty, np.arange(8))
    np.testing.assert_array_equal(vy, [8, 9])
    np.testing.assert_array_equal(vx, images[8:])
    # Keras: split_at = int(n * (1 - validation_split)).
    (_, ty), (_, vy) = data.split_validation(np.zeros(48000), np.arange(48000), 0.2)
    assert len(ty) == int(48000 * 0.8) and vy[0] == int(48000 * 0.8)
    with pytest.raises(ValueError, match=r"validation fraction 1.0 is outside \[0, 1\)"):
        data.split_validation(images, labels, 1.0)


def test_normalize_scales_uint8_to_unit_float32():
    x = np.array([[0, 1, 128, 255]], np.uint8)
    y = data.normalize(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, x.astype(np.float64) / 255.0, rtol=1e-7)


def test_any_tfds_image_set_loads_and_streams_without_tensorflow(tmp_path, monkeypatch):
    """cifar10 (32x32x3) through TFDS's array_record data source, mocked, without TF."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.testing import mocking

    from jaxnets import inputs

    monkeypatch.setattr(  # tfds 4.9.10's mock bug: see test_tfds_mock_data_without_tensorflow
        mocking, "_getitems", lambda keys, generator, serialized=False: [generator[k] for k in keys]
    )
    with tfds.testing.mock_data(num_examples=10):
        ds = data.load("cifar10", split="train", data_dir=tmp_path, cache_dir=tmp_path)
        source = tfds.data_source("cifar10", split="train")
        stream = inputs.Stream(source, transform=lambda e: {"image": e["image"]})
        batch = stream.read(np.array([[3, 1], [0, 9]]))
        batches = [b for b, _ in stream.batches(np.array([[3, 1], [0, 9]]), 1)]
    assert ds.images.shape == (10, 32, 32, 3) and ds.info.num_classes == 10
    assert batch["image"].shape == (2, 2, 32, 32, 3)
    np.testing.assert_array_equal(batch["image"][1, 0], ds.images[0])
    np.testing.assert_array_equal(batches[0]["image"], ds.images[[0, 9]])  # from step 1 on
    assert len(batches) == 1
