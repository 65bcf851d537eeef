"""A user's own models under `loop.fit` against a plain Python loop of jitted steps.

Run: python bench/fit_vs_loop.py [--epochs 3] [--repeats 3] [--forced-steps 10]
Models (not the seed CNN): a Linen CNN of `nn.Conv` layers (XLA's `lax.conv`) with BatchNorm
and Dropout on 32x32x3 images, and an MLP on flattened 28x28 inputs. Each trains the same
epochs, interleaved: `loop.fit` with the steps per call it measures (the default), with
`--forced-steps 10` also `loop.fit` forced to 10 scanned steps per call (the old CPU default,
about 9x slower for `lax.conv` models on XLA:CPU), and the plain
loop a user would write (`jax.jit(train_step, donate_argnums=0)` called per batch, batches
indexed on the host). Prints s/epoch (median of the epochs after the first, min and median
over repeats) and ratios against the plain loop; the goal is fit <= plain loop.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import optax

from jaxnets import adapters, indices, loop, losses, metrics, sharding, train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workload  # noqa: E402

BATCH = workload.USERS_BATCH


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


def _objective(module):
    return adapters.linen(
        module,
        loss=lambda z, y: losses.softmax_cross_entropy(z, y, reduction="none"),
        metrics={"accuracy": metrics.accuracy},
    )


def _sgd():
    return optax.sgd(workload.USERS_LEARNING_RATE, momentum=workload.USERS_MOMENTUM)


def _fit(module, data, epochs, k):
    objective, tx = (
        _objective(module),
        _sgd(),
    )
    state = train.create_train_state(objective.init, tx, data, key=jax.random.key(0))
    result = loop.fit(
        state,
        train.make_train_step(objective.loss_fn, tx),
        data,
        data_key=jax.random.key(1),
        epochs=epochs,
        batch_size=BATCH,
        mesh=sharding.make_mesh(1),
        steps_per_call=k,
    )
    seconds = [r["epoch_seconds"] for r in result.history]
    return seconds, result.history[-1]["accuracy"], result.steps_per_call


@contextlib.contextmanager
def _count_compiles():
    """XLA compilations (backend compiles) while the block runs."""
    events = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _plain_loop(module, data, epochs):
    objective, tx = (
        _objective(module),
        _sgd(),
    )
    state = train.create_train_state(objective.init, tx, data, key=jax.random.key(0))
    step = jax.jit(train.make_train_step(objective.loss_fn, tx), donate_argnums=0)
    n = len(data["label"])
    seconds, correct = [], 0.0
    for epoch in range(epochs):
        idx = indices.epoch_indices(jax.random.key(1), epoch, n, BATCH)
        t0 = time.perf_counter()
        sums = []
        for ix in idx:
            state, m = step(state, {k: v[ix] for k, v in data.items()})
            sums.append(m["accuracy"])
        jax.block_until_ready(state)
        seconds.append(time.perf_counter() - t0)
        correct = float(np.mean([float(s.compute()) for s in sums]))
    return seconds, correct, 1


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-train", type=int, default=6400)
    parser.add_argument(
        "--forced-steps", type=int, default=0, help="also fit with this many scanned steps per call"
    )
    args = parser.parse_args(argv)
    modules = {"conv_bn_dropout_32x32x3": ConvBnDrop, "mlp_784_512_256_10": Mlp}
    ways = {"fit (measured steps/call)": lambda m, d: _fit(m, d, args.epochs, None)}
    if args.forced_steps:
        k = args.forced_steps
        ways[f"fit ({k} steps/call)"] = lambda m, d: _fit(m, d, args.epochs, k)
    ways["plain loop of jitted steps"] = lambda m, d: _plain_loop(m, d, args.epochs)
    out = {}
    for name, shape in workload.USERS_MODELS.items():
        data = workload.users_data(shape, args.num_train)
        runs = {w: [] for w in ways}
        for _ in range(args.repeats):  # interleaved: the machine's noise hits every way
            for way, fn in ways.items():
                runs[way].append(workload.users_result(*fn(modules[name](), data)))
        out[name] = runs
    # A second fit call (the steps per call now recorded): it compiles only what it runs.
    second = {}
    for name, shape in workload.USERS_MODELS.items():
        data = workload.users_data(shape, args.num_train)
        _fit(modules[name](), data, 1, None)  # the first call: measures and records k
        with _count_compiles() as compiles:
            _, _, k = _fit(modules[name](), data, 1, None)
        lengths = set(loop.chunk_plan(0, args.num_train // BATCH, k))
        second[name] = {"compiles": len(compiles), "programs_run": len(lengths), "k": k}
    out["second_fit_call"] = second
    workload.emit(out)
    for name, c in second.items():
        runs_ = c["programs_run"]
        print(f"{name}: a second fit call compiled {c['compiles']} program(s), ran {runs_}")
    for name, runs in ((n, r) for n, r in out.items() if n != "second_fit_call"):
        plain = statistics.median(r["steady_epoch_s"] for r in runs["plain loop of jitted steps"])
        print(f"\n{name} ({args.num_train} examples, batch {BATCH}, {args.epochs} epochs)")
        print("| way | s/epoch min | median | / plain loop | steps/call | train acc |")
        print("|---|---|---|---|---|---|")
        for way, rs in runs.items():
            steady = [r["steady_epoch_s"] for r in rs]
            print(
                f"| {way} | {min(steady):.3f} | {statistics.median(steady):.3f} | "
                f"{statistics.median(steady) / plain:.2f} | {rs[-1]['steps_per_call']} | "
                f"{rs[-1]['train_accuracy']:.3f} |"
            )
    return out


if __name__ == "__main__":
    main()
