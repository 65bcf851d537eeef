"""PyTorch on the seed CNN workload (bench/workload.py): eager, or `torch.compile` with --compile.

Run: .venv-bench/bin/python bench/torch_cnn.py [--compile] [--threads 2]   (default: the faster
of 1 and 2 threads, measured on a copy of the model before training)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workload  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--threads", type=int, default=0, help="0: the faster of 1 and 2")
    parser.add_argument("--epochs", type=int, default=workload.EPOCHS)
    parser.add_argument("--num-train", type=int, default=workload.NUM_TRAIN)
    parser.add_argument("--num-val", type=int, default=workload.NUM_VAL)
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    from torch import nn

    torch.manual_seed(workload.SEED)
    train_x, train_y, val_x, val_y, source = workload.load_cnn_data(args.num_train, args.num_val)
    # NCHW float32 in [0, 1]: PyTorch's native layout.
    to_x = lambda x: torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    train_x, val_x = to_x(train_x), to_x(val_x)
    train_y, val_y = torch.from_numpy(train_y).long(), torch.from_numpy(val_y).long()

    model = nn.Sequential(
        nn.Conv2d(1, 4, 5),
        nn.Tanh(),
        nn.Conv2d(4, 8, 3),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(256, 128),
        nn.Tanh(),
        nn.Linear(128, 10),
    )
    for layer in model:
        if isinstance(layer, nn.Conv2d):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=0.05)
            nn.init.zeros_(layer.bias)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=workload.LEARNING_RATE, momentum=workload.MOMENTUM, nesterov=True
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1 / (1 + workload.DECAY * t))
    loss_fn = nn.CrossEntropyLoss()
    threads = args.threads
    if threads:
        torch.set_num_threads(threads)
    else:
        batch = slice(0, workload.BATCH)
        threads = workload.choose_torch_threads(
            torch, model, loss_fn, train_x[batch], train_y[batch]
        )
    forward = torch.compile(model) if args.compile else model

    epoch_seconds = []
    steps = len(train_y) // workload.BATCH
    for _ in range(args.epochs):
        model.train()
        start = time.perf_counter()
        perm = torch.randperm(len(train_y))
        for i in range(steps):
            ix = perm[i * workload.BATCH : (i + 1) * workload.BATCH]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(forward(train_x[ix]), train_y[ix])
            loss.backward()
            optimizer.step()
            schedule.step()
        epoch_seconds.append(time.perf_counter() - start)
    model.eval()
    with torch.no_grad():
        correct = 0
        for i in range(0, len(val_y), workload.BATCH):
            logits = forward(val_x[i : i + workload.BATCH])
            correct += int((logits.argmax(1) == val_y[i : i + workload.BATCH]).sum())
    result = workload.cnn_result(
        epoch_seconds,
        len(train_y),
        correct / len(val_y),
        data=source,
        torch_version=torch.__version__,
        compiled=args.compile,
        threads=threads,
    )
    workload.emit(result)
    return result


if __name__ == "__main__":
    main()
