"""The seed's two-layer sigmoid net (3-4-1, no biases) trained from scratch on the XOR-like set.

Full-batch gradient descent with step 1 on the sum of squared errors, the gradient by the
tutorial's hand-written chain rule (a custom VJP, so the engine's own train step runs it);
`--check` asserts at every step that it equals `jax.grad`.
`--nets N` also trains N random initialisations at once in one jitted program.

Run:
    python -m experiments.two_layer_sigmoid                # the seed: one net, 1500 steps
    python -m experiments.two_layer_sigmoid --check        # + jax.grad == hand backprop, every step
    python -m experiments.two_layer_sigmoid --nets 10000   # + 10,000 nets at once

Expected (init numpy, seed 1, the tutorial's np.random.seed(1)): final loss 0.0033558,
predictions [0.0097, 0.9689, 0.9689, 0.0365], the loss falling monotonically. With
--nets 10000: 9996 of the 10,000 nets reach loss < 0.01, in about 0.3 s on a 2-core CPU.
Writes loss.png, summary.json (and final_loss_hist.png with --nets > 1) to --workdir.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxnets import metrics, programs, sharding, train
from jaxnets.core.checks import POSITIVE, POSITIVE_INT, Rule
from jaxnets.models import two_layer_train_many
from jaxnets.models.mlp import (
    sum_squared_error,
    sum_squared_error_by_hand,
    two_layer_forward,
    uniform_01,
)
from jaxnets.runs.config import check_config, config_to_dict, errors_in_flags, parse_config
from jaxnets.runs.workdir import check_workdir_writable

INITS = ("numpy", "jax")
# Largest allowed |hand-written - jax.grad| per step, relative to 1 + max|jax.grad|: float32
# rounding of the two evaluation orders measures ~1e-7 here.
GRAD_TOLERANCE = 1e-5


@dataclasses.dataclass(frozen=True)
class Config:
    iterations: int = dataclasses.field(default=1500, metadata={"help": "gradient steps"})
    learning_rate: float = dataclasses.field(default=1.0, metadata={"help": "step size"})
    seed: int = dataclasses.field(default=1, metadata={"help": "seed of the initialisation"})
    init: str = dataclasses.field(
        default="numpy",
        metadata={
            "help": "numpy: the tutorial's np.random.seed(seed); W1=rand(3,4); W2=rand(4,1) "
            "(net k takes the k-th such draw); jax: uniform [0,1) from jax.random.key(seed)"
        },
    )
    nets: int = dataclasses.field(default=1, metadata={"help": "random initialisations"})
    devices: int | None = dataclasses.field(
        default=1, metadata={"help": "split --nets over this many devices (none: all)"}
    )
    check: bool = dataclasses.field(
        default=False, metadata={"help": "assert jax.grad == hand backprop at every step"}
    )
    workdir: str = dataclasses.field(default="runs/two_layer_sigmoid")
    threshold: float = dataclasses.field(
        default=0.01, metadata={"help": "a net 'reaches' the target below this final loss"}
    )

    CHECKS: ClassVar[dict] = {
        "iterations": POSITIVE_INT,
        "learning_rate": POSITIVE,
        "init": Rule(str, choices=INITS),
        "nets": POSITIVE_INT,
        "devices": Rule(int, low=1, optional=True),
        "threshold": POSITIVE,
    }

    def __post_init__(self):
        check_config(self)


def get_config() -> Config:
    return Config()


# The tutorial's data: the third input is a constant 1 (a bias in disguise); y = x0 XOR x1.
X = np.array([[0, 0, 1], [0, 1, 1], [1, 0, 1], [1, 1, 1]], np.float32)
Y = np.array([[0], [1], [1], [0]], np.float32)


def init_params(config: Config) -> dict:
    """Batched params {"w1": [nets, 3, 4], "w2": [nets, 4, 1]} float32, uniform on [0, 1).

    "numpy" draws exactly as the tutorial: ``np.random.seed(seed)`` then, net after net,
    ``W1 = rand(3, 4); W2 = rand(4, 1)`` (net 0 is the tutorial's net); "jax" draws with
    `uniform_01` (the default ``kernel_init`` of `TwoLayerSigmoid`) from ``jax.random.key(seed)``.
    """
    if config.init == "numpy":
        # RandomState(seed) is the stream of np.random.seed(seed), without the global state.
        draws = np.random.RandomState(config.seed).rand(config.nets, 3 * 4 + 4 * 1)
        w1 = draws[:, :12].reshape(config.nets, 3, 4)
        w2 = draws[:, 12:].reshape(config.nets, 4, 1)
        return {"w1": jnp.asarray(w1, jnp.float32), "w2": jnp.asarray(w2, jnp.float32)}
    key_w1, key_w2 = jax.random.split(jax.random.key(config.seed))
    return {
        "w1": uniform_01(key_w1, (config.nets, 3, 4), jnp.float32),
        "w2": uniform_01(key_w2, (config.nets, 4, 1), jnp.float32),
    }


def make_loss_fn(*, check: bool) -> train.LossFn:
    """The engine's loss function of the seed net: the sum of squared errors, differentiated
    by the tutorial's hand-written backprop (`sum_squared_error_by_hand`).

    Reports `loss` (before the step) and, with `check`, `grad_error`: max|hand - jax.grad|
    / (1 + max|jax.grad|) of that step.
    """

    def loss_fn(params, model_state, batch, key):
        x, y = batch["x"], batch["y"]
        loss = sum_squared_error_by_hand(params, x, y)
        reported = {"loss": metrics.Mean.from_scalar(loss)}
        if check:  # the gradient the step takes against JAX's own
            hand = jax.grad(sum_squared_error_by_hand)(params, x, y)
            auto = jax.grad(sum_squared_error)(params, x, y)
            diff = jnp.max(jnp.stack([jnp.max(jnp.abs(hand[k] - auto[k])) for k in auto]))
            scale = 1.0 + jnp.max(jnp.stack([jnp.max(jnp.abs(auto[k])) for k in auto]))
            reported["grad_error"] = metrics.Mean.from_scalar(lax.stop_gradient(diff / scale))
        return loss, (reported, model_state)

    return loss_fn


def make_train_one(config: Config, x, y):
    """The tutorial's loop on the engine: `iterations` full-batch steps of plain gradient
    descent (`optax.sgd(learning_rate)`: ``w -= lr * hand_written_grad``) in one device call.

    Returns `(compiled, args)`: `compiled(*args) -> (state, per-step metrics)`.
    """
    tx = optax.sgd(config.learning_rate)
    mesh = sharding.make_mesh(1)
    step = train.make_train_step(make_loss_fn(check=config.check), tx)
    every_example = np.tile(np.arange(len(x), dtype=np.int32), (config.iterations, 1))
    data = {"x": x, "y": y}

    def start(params):
        state = train.create_train_state(params, tx, key=jax.random.key(0))
        shardings = sharding.state_shardings(state, mesh)
        return (
            sharding.place(state, shardings),
            sharding.place(data, sharding.state_shardings(data, mesh)),
            sharding.place_columns(mesh, every_example),
        )

    run = programs.make_epoch_program(step, mesh, sharding.replicated_sharding(mesh))
    return run, start


def train_one(config: Config, params) -> tuple[dict, np.ndarray, np.ndarray]:
    """`(final params, [iterations] losses before each step, [iterations] grad errors)`."""
    run, start_fn = make_train_one(config, X, Y)
    state, per_step = jax.device_get(run(*start_fn(params)))
    errors = per_step["grad_error"].total if config.check else np.zeros(config.iterations)
    return state.params, np.asarray(per_step["loss"].total), np.asarray(errors)


def _timed(fn, *args):
    """(result, seconds) of fn(*args), waiting for the device."""
    start = time.perf_counter()
    result = jax.block_until_ready(fn(*args))
    return result, time.perf_counter() - start


def _plot_loss(path: str, losses: np.ndarray) -> None:
    from matplotlib.figure import Figure  # lazy: plotting is optional for the library

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.semilogy(np.arange(len(losses)), losses)
    ax.set(xlabel="iteration", ylabel="sum of squared errors", title="two-layer sigmoid net")
    ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=100, bbox_inches="tight")


def _plot_hist(path: str, final_loss: np.ndarray, threshold: float) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    positive = final_loss[final_loss > 0]
    bins = np.geomspace(positive.min(), positive.max(), 60) if positive.size > 1 else 60
    ax.hist(final_loss, bins=bins)
    ax.set_xscale("log")
    ax.set_yscale("log")  # the few nets stuck near loss 0.5 or 1 stay visible
    ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:g}")
    ax.set(xlabel="final loss", ylabel="nets", title=f"{len(final_loss)} random initialisations")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")


def make_train_many_on_devices(config: Config):
    """`(params, x, y) -> (params, final_loss)` host arrays, the nets split over the devices.

    Each device trains its share of the nets with `two_layer_train_many`; with one device
    (or `--devices 1`) this is the plain call. The nets are independent, so the result of a
    net does not depend on the device count.
    """
    mesh = sharding.make_mesh(config.devices)
    many = dict(iterations=config.iterations, learning_rate=config.learning_rate)
    n = sharding.num_devices(mesh)
    if n == 1:
        return lambda p, x, y: jax.device_get(two_layer_train_many(p, x, y, **many))
    if config.nets % n:
        divisor = max(d for d in range(1, n + 1) if config.nets % d == 0 and n % d == 0)
        raise ValueError(
            f"--nets {config.nets} does not split over {n} devices; use --nets "
            f"{max(n, round(config.nets / n) * n)} (a multiple of {n}) or --devices {divisor}"
        )
    # Per-device code (each device runs the many-nets kernel on its share): shard_map.
    run = jax.jit(
        jax.shard_map(
            lambda p, x, y: two_layer_train_many(p, x, y, **many),
            mesh=mesh,
            in_specs=(P(sharding.DATA), P(), P()),
            out_specs=P(sharding.DATA),
            check_vma=False,
        )
    )
    return lambda p, x, y: jax.device_get(run(p, x, y))


@errors_in_flags
def main(config: Config) -> dict:
    """Trains the seed net (and `config.nets` nets at once); returns the numbers it reports."""
    # The nets' device split is checked now, not after the seed net has trained.
    train_many = make_train_many_on_devices(config) if config.nets > 1 else None
    check_workdir_writable(config.workdir)  # creates it, or says why it cannot hold results
    x, y = jnp.asarray(X), jnp.asarray(Y)
    params = init_params(config)

    # The seed: one net (net 0), hand-written backprop, loss recorded at every step.
    one = jax.tree.map(lambda v: v[0], params)
    run, start_fn = make_train_one(config, x, y)
    args = start_fn(one)
    start = time.perf_counter()
    compiled = run.lower(*args).compile()
    one_compile_s = time.perf_counter() - start
    (state, per_step), one_run_s = _timed(compiled, *args)
    per_step = jax.device_get(per_step)
    final = jax.device_get(state.params)
    losses = np.asarray(per_step["loss"].total)
    errors = np.asarray(per_step["grad_error"].total) if config.check else np.zeros(0)
    if config.check:
        bad = np.flatnonzero(~(errors <= GRAD_TOLERANCE))
        if bad.size:
            i = int(bad[0])
            raise RuntimeError(
                f"iteration {i}: the hand-written backprop differs from jax.grad by "
                f"{errors[i]:.3g} (relative to 1 + max|grad|; tolerance {GRAD_TOLERANCE:g}); "
                f"{bad.size} of {config.iterations} steps differ"
            )
    final_loss = float(sum_squared_error(final, x, y))
    curve = np.append(losses, final_loss)
    if not np.all(np.isfinite(curve)):
        first = int(np.flatnonzero(~np.isfinite(curve))[0])
        raise FloatingPointError(f"loss is not finite from iteration {first}; lower the step")
    predictions = np.asarray(two_layer_forward(final, x))[:, 0]
    results = {
        "final_loss": final_loss,
        "predictions": predictions.tolist(),
        "monotone": bool(np.all(np.diff(curve) <= 0)),
        "max_grad_error": float(errors.max()) if config.check else None,
        "timings": {"one_net_compile_s": one_compile_s, "one_net_run_s": one_run_s},
    }
    print(f"final loss {final_loss:.7f} after {config.iterations} steps")
    print(f"predictions {np.array2string(predictions, precision=4)}  (targets {Y[:, 0]})")
    print(f"loss monotone: {results['monotone']}")
    if config.check:
        print(f"jax.grad == hand backprop at every step (max error {errors.max():.2g})")
    _plot_loss(os.path.join(config.workdir, "loss.png"), curve)

    if train_many is not None:
        _, first_s = _timed(lambda: train_many(params, x, y))
        (_, nets_loss), run_s = _timed(lambda: train_many(params, x, y))
        reached = int(np.sum(nets_loss < config.threshold))
        results["nets"] = {
            "count": config.nets,
            "reached_threshold": reached,
            "fraction": reached / config.nets,
            "final_loss_min": float(nets_loss.min()),
            "final_loss_median": float(np.median(nets_loss)),
            "final_loss_max": float(nets_loss.max()),
            "net0_final_loss": float(nets_loss[0]),
        }
        results["timings"].update(many_nets_first_call_s=first_s, many_nets_run_s=run_s)
        print(
            f"{reached} of {config.nets} nets reach loss < {config.threshold:g} "
            f"(median {np.median(nets_loss):.3g}); {run_s:.3f} s after compile"
        )
        _plot_hist(os.path.join(config.workdir, "final_loss_hist.png"), nets_loss, config.threshold)

    results["config"] = config_to_dict(config)
    with open(os.path.join(config.workdir, "summary.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main(parse_config(get_config(), description=__doc__))
