"""A user's own models under `loop.fit` against a plain Python loop of jitted steps.

Run: python bench/fit_vs_loop.py [--epochs 3] [--repeats 3]
Models (not the seed CNN): a Linen CNN of `nn.Conv` layers (XLA's `lax.conv`) with BatchNorm
and Dropout on 32x32x3 images, and an MLP on flattened 28x28 inputs. Each trains the same
epochs three ways, interleaved: `loop.fit` with the steps per call it measures (the
default), `loop.fit` forced to 10 scanned steps per call (the old CPU default), and the plain
loop a user would write (`jax.jit(train_step, donate_argnums=0)` called per batch, batches
indexed on the host). Prints s/epoch (median of the epochs after the first, min and median
over repeats) and ratios against the plain loop; the goal is fit <= plain loop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import flax.linen as nn
import jax
import numpy as np
import optax

from jaxnets import adapters, loop, losses, metrics, parallel, train

BATCH = 100


class ConvBnDrop(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        for features in (16, 32):
            x = nn.Conv(features, (3, 3), use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
        x = nn.Dropout(0.3, deterministic=not train)(x.reshape(x.shape[0], -1))
        return nn.Dense(10)(nn.relu(nn.Dense(64)(x)))


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(10)(nn.relu(nn.Dense(256)(nn.relu(nn.Dense(512)(x)))))


def _data(shape, n, seed=0):
    """Noise plus a bright horizontal band whose position is the class: learnable by both."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n).astype(np.int32)
    x = rng.normal(size=(n, *shape)).astype(np.float32) * 0.5
    band = np.arange(shape[0]) * 10 // shape[0]  # row -> band 0..9
    x += (band[None, :] == y[:, None])[:, :, None, None].astype(np.float32)
    return {"image": x, "label": y}


def _objective(module):
    return adapters.linen(
        module,
        loss=lambda z, y: losses.softmax_cross_entropy(z, y, reduction="none"),
        metrics={"accuracy": metrics.accuracy},
    )


def _fit(module, data, epochs, k):
    objective, tx = _objective(module), optax.sgd(0.05, momentum=0.9)
    dp = parallel.make_data_parallel(devices=1)
    state = train.create_train_state(objective.init, tx, data, key=jax.random.key(0))
    result = loop.fit(
        state,
        train.make_train_step(objective.loss_fn, tx, axis_name=dp.axis_name),
        dp,
        data,
        data_key=jax.random.key(1),
        epochs=epochs,
        batch_size=BATCH,
        steps_per_dispatch=k,
    )
    seconds = [r["epoch_seconds"] for r in result.history]
    return seconds, result.history[-1]["accuracy"], result.steps_per_call


def _plain_loop(module, data, epochs):
    objective, tx = _objective(module), optax.sgd(0.05, momentum=0.9)
    state = train.create_train_state(objective.init, tx, data, key=jax.random.key(0))
    step = jax.jit(train.make_train_step(objective.loss_fn, tx), donate_argnums=0)
    n = len(data["label"])
    seconds, correct = [], 0.0
    for epoch in range(epochs):
        idx = train.epoch_indices(jax.random.key(1), epoch, n, BATCH)
        t0 = time.perf_counter()
        sums = []
        for ix in idx:
            state, m = step(state, {k: v[ix] for k, v in data.items()})
            sums.append(m["accuracy"])
        jax.block_until_ready(state)
        seconds.append(time.perf_counter() - t0)
        correct = float(np.mean([float(s.compute()) for s in sums]))
    return seconds, correct, 1


def _steady(seconds):
    return statistics.median(seconds[1:] or seconds)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-train", type=int, default=6400)
    args = parser.parse_args(argv)
    models = {
        "conv_bn_dropout_32x32x3": (ConvBnDrop, (32, 32, 3)),
        "mlp_784_512_256_10": (Mlp, (28, 28, 1)),
    }
    ways = {
        "fit (measured steps/call)": lambda m, d: _fit(m, d, args.epochs, None),
        "fit (10 steps/call)": lambda m, d: _fit(m, d, args.epochs, 10),
        "plain loop of jitted steps": lambda m, d: _plain_loop(m, d, args.epochs),
    }
    out = {}
    for name, (cls, shape) in models.items():
        data = _data(shape, args.num_train)
        runs = {w: [] for w in ways}
        for _ in range(args.repeats):  # interleaved: the machine's noise hits every way
            for way, fn in ways.items():
                seconds, accuracy, k = fn(cls(), data)
                runs[way].append((_steady(seconds), accuracy, k))
        plain = statistics.median(r[0] for r in runs["plain loop of jitted steps"])
        out[name] = {
            way: {
                "s_per_epoch_min": min(r[0] for r in rs),
                "s_per_epoch_median": statistics.median(r[0] for r in rs),
                "vs_plain_loop": statistics.median(r[0] for r in rs) / plain,
                "last_epoch_train_accuracy": rs[-1][1],
                "steps_per_call": rs[-1][2],
            }
            for way, rs in runs.items()
        }
    print("RESULT " + json.dumps(out))
    for name, rows in out.items():
        print(f"\n{name} ({args.num_train} examples, batch {BATCH}, {args.epochs} epochs)")
        print("| way | s/epoch min | median | / plain loop | steps/call | train acc |")
        print("|---|---|---|---|---|---|")
        for way, r in rows.items():
            print(
                f"| {way} | {r['s_per_epoch_min']:.3f} | {r['s_per_epoch_median']:.3f} | "
                f"{r['vs_plain_loop']:.2f} | {r['steps_per_call']} | "
                f"{r['last_epoch_train_accuracy']:.3f} |"
            )
    return out


if __name__ == "__main__":
    main()
