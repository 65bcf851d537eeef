"""The workloads every contender runs: data, hyperparameters, and how a result is printed.

Kept free of jax, torch and keras imports so that each contender process pays only for its own
framework. The seed CNN workload (SEEDS.md section 2): the first 60,000 Fashion-MNIST training
images, 48,000 to train on and the last 12,000 (validation_split 0.2) held out, batch 100,
SGD lr 0.05 momentum 0.9 Nesterov with inverse-time decay 1e-6, categorical cross-entropy.
"""

from __future__ import annotations

import gzip
import json
import os
import sys

import numpy as np

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
NUM_TRAIN, NUM_VAL = 48_000, 12_000
BATCH = 100
LEARNING_RATE, MOMENTUM, DECAY = 0.05, 0.9, 1e-6
EPOCHS = 3
SEED = 1024


def _read_idx_gz(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_cnn_data(
    num_train: int = NUM_TRAIN, num_val: int = NUM_VAL
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """(train images, train labels, val images, val labels, source).

    Images are uint8 [N, 28, 28, 1], labels int32 [N]. Fashion-MNIST when the Debian package
    `dataset-fashion-mnist` is installed, else synthetic uint8 data of the same shape
    (timings do not depend on content; accuracies then mean nothing).
    """
    images_path = os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz")
    labels_path = os.path.join(FASHION_DIR, "train-labels-idx1-ubyte.gz")
    if os.path.exists(images_path) and os.path.exists(labels_path):
        images = _read_idx_gz(images_path)[..., None]
        labels = _read_idx_gz(labels_path).astype(np.int32)
        source = f"Fashion-MNIST ({FASHION_DIR})"
    else:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (NUM_TRAIN + NUM_VAL, 28, 28, 1), dtype=np.uint8)
        labels = rng.integers(0, 10, NUM_TRAIN + NUM_VAL).astype(np.int32)
        source = "synthetic uint8 (Fashion-MNIST not installed; accuracy is meaningless)"
    # validation_split 0.2 of the first 60,000: the last 12,000 are held out.
    train_x, train_y = images[:num_train], labels[:num_train]
    val_x, val_y = images[NUM_TRAIN : NUM_TRAIN + num_val], labels[NUM_TRAIN : NUM_TRAIN + num_val]
    return train_x, train_y, val_x, val_y, source


def cnn_result(epoch_seconds: list[float], num_train: int, val_accuracy: float, **extra) -> dict:
    """The record of one CNN run: the first epoch (with compilation) apart from the rest."""
    steady = epoch_seconds[1:] or epoch_seconds
    return {
        "first_epoch_s": epoch_seconds[0],
        "epoch_s": epoch_seconds,
        "steady_epoch_s": float(np.median(steady)),
        "images_per_s": num_train / float(np.median(steady)),
        "val_accuracy": val_accuracy,
        **extra,
    }


# Users' models (bench/fit_vs_loop.py, bench/users_peers.py): not the seed CNN, a synthetic task
# every framework learns, the same optimiser (SGD 0.05, momentum 0.9) and batch everywhere.
USERS_BATCH = 100
USERS_LEARNING_RATE, USERS_MOMENTUM = 0.05, 0.9
USERS_MODELS = {  # name -> image shape (height, width, channels)
    "conv_bn_dropout_32x32x3": (32, 32, 3),
    "mlp_784_512_256_10": (28, 28, 1),
}


def users_data(shape: tuple[int, int, int], n: int, seed: int = 0) -> dict:
    """Noise plus a bright horizontal band whose row position is the class (10 classes).

    Returns {"image": float32 [n, height, width, channels], "label": int32 [n]}.
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n).astype(np.int32)
    x = rng.normal(size=(n, *shape)).astype(np.float32) * 0.5
    band = np.arange(shape[0]) * 10 // shape[0]  # row -> band 0..9
    x += (band[None, :] == y[:, None])[:, :, None, None].astype(np.float32)
    return {"image": x, "label": y}


def users_result(epoch_seconds: list[float], accuracy: float, steps_per_call: int = 1) -> dict:
    """One users'-model run: steady s/epoch (median after the first epoch), last-epoch accuracy."""
    steady = epoch_seconds[1:] or epoch_seconds
    return {
        "epoch_s": epoch_seconds,
        "steady_epoch_s": float(np.median(steady)),
        "train_accuracy": accuracy,
        "steps_per_call": steps_per_call,
    }


def keras_epoch_timer(keras):
    """A Keras callback whose `seconds` lists the wall time of every epoch."""
    import time

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.start)

    return EpochTimer()


def choose_torch_threads(torch, model, loss_fn, x, y, steps: int = 8) -> int:
    """The faster of 1 and 2 PyTorch threads for training `model`, measured on a copy of it.

    On a quiet 2-core machine 2 threads are faster; with a busy neighbour on the other core 1
    thread measured up to 5x faster (OpenMP barriers wait for a descheduled thread). A user
    picks the faster, so the bench does too; the choice is recorded with the result.
    """
    import copy
    import time

    times = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        trial = copy.deepcopy(model)
        optimizer = torch.optim.SGD(trial.parameters(), lr=0.01)
        for i in range(steps + 2):  # the first two warm up
            if i == 2:
                start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss_fn(trial(x), y).backward()
            optimizer.step()
        times[threads] = time.perf_counter() - start
    best = min(times, key=times.get)
    torch.set_num_threads(best)
    return best


def emit(result: dict) -> None:
    """Prints the result as the last stdout line, the one `bench/run.py` parses."""
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
