"""Keras 3 `fit` (JAX backend) and PyTorch (eager, `torch.compile`) on the users' models.

The same two models as bench/fit_vs_loop.py, layer for layer (a Conv-BatchNorm-ReLU-pool x 2,
Dropout 0.3, Dense 64, Dense 10 CNN on 32x32x3 images with 'same' padding and no conv bias; an
MLP 784-512-256-10), on the same synthetic data (`workload.users_data`), batch 100, SGD 0.05
momentum 0.9, shuffled each epoch. BatchNorm momentum 0.9 (PyTorch's 0.1 is the same running
average) and epsilon 1e-5 as Flax. Reports the steady s/epoch and the last epoch's mean
training accuracy per model.

Run: KERAS_BACKEND=jax .venv-bench/bin/python bench/users_peers.py --framework keras
     .venv-bench/bin/python bench/users_peers.py --framework torch [--compile] [--threads 2]
(PyTorch default: the faster of 1 and 2 threads, measured per model on a copy before training)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workload  # noqa: E402

os.environ.setdefault("KERAS_BACKEND", "jax")


def keras_model(keras, name: str, shape):
    layers = keras.layers
    if name.startswith("conv"):
        body = []
        for features in (16, 32):
            body += [
                layers.Conv2D(features, 3, padding="same", use_bias=False),
                layers.BatchNormalization(momentum=0.9, epsilon=1e-5),
                layers.ReLU(),
                layers.MaxPooling2D(2),
            ]
        body += [layers.Flatten(), layers.Dropout(0.3), layers.Dense(64, activation="relu")]
    else:
        body = [
            layers.Flatten(),
            layers.Dense(512, activation="relu"),
            layers.Dense(256, activation="relu"),
        ]
    return keras.Sequential([keras.Input(shape), *body, layers.Dense(10)])


def run_keras(name: str, data: dict, epochs: int) -> dict:
    import keras

    keras.utils.set_random_seed(0)
    model = keras_model(keras, name, data["image"].shape[1:])
    model.compile(
        optimizer=keras.optimizers.SGD(
            workload.USERS_LEARNING_RATE, momentum=workload.USERS_MOMENTUM
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )

    timer = workload.keras_epoch_timer(keras)
    history = model.fit(
        data["image"],
        data["label"],
        batch_size=workload.USERS_BATCH,
        epochs=epochs,
        shuffle=True,
        verbose=0,
        callbacks=[timer],
    )
    return workload.users_result(timer.seconds, float(history.history["accuracy"][-1]))


def torch_model(nn, name: str, shape):
    if name.startswith("conv"):
        layers, channels = [], shape[2]
        for features in (16, 32):
            layers += [
                nn.Conv2d(channels, features, 3, padding=1, bias=False),
                nn.BatchNorm2d(features, momentum=0.1, eps=1e-5),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels = features
        flat = channels * (shape[0] // 4) * (shape[1] // 4)
        layers += [nn.Flatten(), nn.Dropout(0.3), nn.Linear(flat, 64), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(64, 10))
    size = shape[0] * shape[1] * shape[2]
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(size, 512),
        nn.ReLU(),
        nn.Linear(512, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


def run_torch(name: str, data: dict, epochs: int, compile_: bool, threads: int) -> dict:
    import torch
    from torch import nn

    torch.manual_seed(0)
    # NCHW: PyTorch's native layout, converted once before training.
    x = torch.from_numpy(data["image"].transpose(0, 3, 1, 2).copy())
    y = torch.from_numpy(data["label"]).long()
    model = torch_model(nn, name, data["image"].shape[1:])
    optimizer = torch.optim.SGD(
        model.parameters(), lr=workload.USERS_LEARNING_RATE, momentum=workload.USERS_MOMENTUM
    )
    loss_fn = nn.CrossEntropyLoss()
    if threads:
        torch.set_num_threads(threads)
    else:
        batch = slice(0, workload.USERS_BATCH)
        threads = workload.choose_torch_threads(torch, model, loss_fn, x[batch], y[batch])
    forward = torch.compile(model) if compile_ else model
    steps = len(y) // workload.USERS_BATCH
    seconds, accuracy = [], 0.0
    model.train()
    for _ in range(epochs):
        start = time.perf_counter()
        perm = torch.randperm(len(y))
        correct = torch.zeros(())
        for i in range(steps):
            ix = perm[i * workload.USERS_BATCH : (i + 1) * workload.USERS_BATCH]
            optimizer.zero_grad(set_to_none=True)
            logits = forward(x[ix])
            loss = loss_fn(logits, y[ix])
            loss.backward()
            optimizer.step()
            correct += (logits.detach().argmax(1) == y[ix]).sum()
        seconds.append(time.perf_counter() - start)
        accuracy = float(correct) / (steps * workload.USERS_BATCH)
    return {**workload.users_result(seconds, accuracy), "threads": threads}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--framework", choices=("keras", "torch"), required=True)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument(
        "--threads", type=int, default=0, help="PyTorch threads; 0: the faster of 1 and 2"
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--num-train", type=int, default=6400)
    args = parser.parse_args(argv)
    out: dict = {}
    if args.framework == "torch":
        import torch

        out["torch_version"] = torch.__version__
    else:
        import keras

        out["keras_version"] = keras.__version__
        out["keras_backend"] = keras.backend.backend()
    for name, shape in workload.USERS_MODELS.items():
        data = workload.users_data(shape, args.num_train)
        if args.framework == "keras":
            out[name] = run_keras(name, data, args.epochs)
        else:
            out[name] = run_torch(name, data, args.epochs, args.compile, args.threads)
    workload.emit(out)
    return out


if __name__ == "__main__":
    main()
