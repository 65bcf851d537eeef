"""The `jax.pmap` adapter: the mission's pmapped train step, with the numbers of the jit path.

`jaxnets.fit` trains with global arrays under `jax.jit` (`jaxnets.engine.sharding`). Code in
the pmap programming model (per-device functions with `lax.pmean` over a named axis, as most
TPU tutorials write it) runs through this module, the only place in jaxnets where an axis
name lives. For a loss that is a mean over examples, equal shards and a model without
batch statistics, `pmapped_steps` gives the steps of the jitted step on the global batch:
gradients are the mean of the devices' (`pmean`), metrics their sum (`psum`), and
per-example keys follow global positions (`train.example_keys`).

Example:
    >>> program = pmapped_steps(make_train_step(objective.loss_fn, tx), devices=jax.devices())
    >>> state, metrics = program(state, batches)   # batches: [steps, global_batch, ...] on the host
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnets.core.types import Batch
from jaxnets.engine import train

AXIS = "batch"


def _pmean_floats(tree: Any, axis_name: str) -> Any:
    """Averages float leaves over devices; other leaves (counters) are equal on all of them."""
    return jax.tree.map(
        lambda x: jax.lax.pmean(x, axis_name) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        tree,
    )


def make_train_step(
    loss_fn: train.LossFn, tx: optax.GradientTransformation, *, axis_name: str = AXIS
) -> Callable[[train.TrainState, Batch], tuple[train.TrainState, dict]]:
    """The per-device `train_step(state, shard) -> (state, metrics)` under `jax.pmap`.

    Gradients are averaged over `axis_name` (`lax.pmean`), metrics summed (`lax.psum`), the
    new model state averaged, so every replica takes the same step.
    """

    def step_fn(state: train.TrainState, batch: Batch) -> tuple[train.TrainState, dict]:
        offset = lambda n: jax.lax.axis_index(axis_name) * n
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        with train.per_device(offset):
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
            (_, (metrics, model_state)), grads = grad_fn(
                state.params, state.model_state, batch, key
            )
        grads = jax.lax.pmean(grads, axis_name)
        metrics = jax.lax.psum(metrics, axis_name)
        model_state = _pmean_floats(model_state, axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = train.TrainState(state.step + 1, params, opt_state, model_state, state.key)
        return new, metrics

    return step_fn


def pmapped_steps(
    per_device_step: Callable,
    *,
    devices: Sequence[Any] | None = None,
    axis_name: str = AXIS,
) -> Callable[[train.TrainState, Batch], tuple[train.TrainState, dict]]:
    """`program(state, batches) -> (state, metrics)` with `jax.pmap` over `devices` (one process).

    Args:
      per_device_step: `make_train_step(loss_fn, tx, axis_name=axis_name)`.
      devices: the devices (default: all local ones).

    Returns:
      `run`: takes the plain train state and host batches `[steps, global_batch, ...]`
      (device d gets a contiguous block of every batch), scans the steps on every device,
      and returns the plain state (device 0's copy) and the per-step metrics `[steps]`.
    """
    devices = list(devices or jax.local_devices())
    n = len(devices)

    def body(state, batches):
        return jax.lax.scan(per_device_step, state, batches)

    mapped = jax.pmap(body, axis_name=axis_name, in_axes=(None, 1), devices=devices)

    def program(state: train.TrainState, batches: Batch) -> tuple[train.TrainState, dict]:
        def split(x):
            x = np.asarray(x)
            if x.shape[1] % n:
                raise ValueError(
                    f"global batch {x.shape[1]} is not divisible by {n} devices; use a "
                    f"multiple of {n}"
                )
            return x.reshape(x.shape[0], n, x.shape[1] // n, *x.shape[2:])

        state, metrics = mapped(jax.device_get(state), jax.tree.map(split, batches))
        first = lambda x: np.asarray(x)[0]
        return jax.tree.map(first, state), jax.tree.map(first, metrics)

    return program
