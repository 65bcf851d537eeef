"""The train state and the pure train/eval steps built from a user's loss function (the
programs that run many of them per device call are in `jaxnets.engine.programs`).

The contract (what every model, data set and loss goes through):
- a **batch** is any pytree of arrays with a leading example axis, e.g.
  `{"image": [b, 28, 28, 1], "label": [b]}`;
- a **loss function** is `loss_fn(params, model_state, batch, key) -> (loss, (metrics,
  new_model_state))`: it calls the model itself, so weighted means and penalties on params
  are the user's; `loss` is differentiated as returned (never re-averaged); `metrics` is a
  dict of `jaxnets.core.metrics` values (mergeable sums); `model_state` holds every non-trainable
  collection (BatchNorm statistics; `{}` when none);
- an **eval function** is `eval_fn(params, model_state, batch, mask) -> metrics`, mask
  `[batch]` bool (False for the padding of the last batch).
`jaxnets.engine.adapters` builds both from a Flax Linen or NNX module, a loss and metrics.

Everything a run computes is a pure function of the train state and of `(seed, step)`: the
key of step s is `fold_in(key, s)`, the data order of epoch e is a permutation drawn from
`fold_in(data_key, e)`. That is what makes a resumed run bit-identical to an uninterrupted one.

A complete loop from the public parts (what `jaxnets.engine.loop.fit` does, without logging):

    mesh = sharding.make_mesh()
    objective = adapters.linen(model, loss=..., metrics={...})
    state = create_train_state(objective.init, tx, sample_batch, key=jax.random.key(0))
    shardings = sharding.state_shardings(state, mesh)    # or rule=sharding.fsdp()
    program = programs.make_epoch_program(make_train_step(objective.loss_fn, tx), mesh, shardings)
    state = sharding.place(state, shardings)
    data = sharding.place(train_set, sharding.state_shardings(train_set, mesh))
    for epoch in range(epochs):
        idx = indices.epoch_indices(data_key, epoch, batching.num_examples(train_set), batch_size)
        state, metrics = program(state, data, sharding.place_columns(mesh, idx))
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnets.core import metrics as jmetrics
from jaxnets.core.accumulation import microbatch_grad
from jaxnets.core.regularizers import check_l1_last
from jaxnets.core.types import Array, Batch, Params, PRNGKey, PyTree

# (params, model_state, batch, key) -> (loss, (metrics, new_model_state))
LossFn = Callable[[Params, PyTree, Batch, PRNGKey], tuple[Array, tuple[dict, PyTree]]]
# (params, model_state, batch, mask) -> metrics
EvalFn = Callable[[Params, PyTree, Batch, Array], dict]
# (key, sample_batch) -> (params, model_state)
InitFn = Callable[[PRNGKey, Batch], tuple[Params, PyTree]]


class TrainState(NamedTuple):
    """Everything training changes, as one pytree (checkpointed whole)."""

    step: Array  # int32 [], number of optimiser steps taken
    params: Params
    opt_state: optax.OptState
    model_state: PyTree  # non-trainable model variables (BatchNorm statistics); {} if none
    key: Array  # uint32 [2] raw key data; randomness of step s is fold_in(key, s)


def raw_key(key: PRNGKey) -> Array:
    """uint32 key data of a typed or raw key (what the state stores: plain arrays only)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def check_key(key: Any, name: str = "key") -> None:
    """Raises a clear error when `key` is not a JAX PRNG key (an int is the usual mistake)."""
    if not isinstance(key, jax.Array) or not (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or key.dtype == jnp.uint32
    ):
        raise TypeError(
            f"{name} must be a PRNG key, e.g. {name}=jax.random.key(0), not "
            f"{type(key).__name__} {key!r:.40}"
        )


def create_train_state(
    init_fn: InitFn | Params,
    tx: optax.GradientTransformation,
    sample_batch: Batch | None = None,
    *,
    key: PRNGKey,
    model_state: PyTree | None = None,
) -> TrainState:
    """The initial train state of a model.

    Args:
      init_fn: `(key, sample_batch) -> (params, model_state)` (an adapter's `init`), or the
        params pytree itself (a model written as plain functions).
      tx: the Optax transformation.
      sample_batch: a batch of the right shapes and dtypes (one example is enough); only
        with an `init_fn`.
      key: a PRNG key (`jax.random.key(seed)`); split into the init key and the state key.
      model_state: with params given directly: their non-trainable state (default `{}`).
    """
    check_key(key)
    init_key, state_key = jax.random.split(key)
    if callable(init_fn):
        if sample_batch is None:
            raise ValueError("create_train_state(init_fn, tx, sample_batch, key=...): give a batch")
        if any(np.ndim(x) and not np.shape(x)[0] for x in jax.tree.leaves(sample_batch)):
            raise ValueError(
                "create_train_state: sample_batch has 0 examples; give at least one (x[:1]), "
                "e.g. of the training set, after checking that it is not empty"
            )
        params, model_state = init_fn(init_key, sample_batch)
    else:
        params, model_state = init_fn, ({} if model_state is None else model_state)
    opt_state = tx.init(params)
    check_l1_last(opt_state)
    return TrainState(jnp.zeros((), jnp.int32), params, opt_state, model_state, raw_key(state_key))


# The pmap adapter (`jaxnets.engine.pmap`) sets this while tracing its per-device step
# (`per_device`): the offset of the device's first example in the global batch. Under
# `jax.jit` the batch is global and the offset is 0.
_device_offset: Callable[[int], Array] | None = None


@contextlib.contextmanager
def per_device(offset: Callable[[int], Array]):
    """While tracing a per-device step (pmap): `offset(local_batch)` is the device's first
    example's global position, so `example_keys` stays a function of global positions."""
    global _device_offset
    previous, _device_offset = _device_offset, offset
    try:
        yield
    finally:
        _device_offset = previous


def example_keys(key: PRNGKey, batch: int) -> Array:
    """`[batch]` keys, one per example, from the example's global position in the batch.

    `fold_in(key, position)`: the same example gets the same key whatever the device count.
    """
    offset = 0 if _device_offset is None else _device_offset(batch)
    positions = offset + jnp.arange(batch)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(positions)


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    microbatches: int = 1,
    health: bool = False,
    learning_rate: optax.ScalarOrSchedule | None = None,
    skip_nonfinite: bool = False,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Builds `train_step(state, batch) -> (state, metrics)`, big_vision's `update_fn`.

    A function of the **global** batch: jitted over a mesh (`jaxnets.engine.sharding`), the
    gradient of a mean over the batch is the global mean and BatchNorm statistics are the
    global batch's; XLA inserts the collectives. Gradients of `loss_fn`'s loss are taken
    with respect to `state.params`; the key of step s is `fold_in(state.key, s)`.

    Args:
      loss_fn: `(params, model_state, batch, key) -> (loss, (metrics, new_model_state))`.
      tx: the Optax transformation.
      microbatches: gradient accumulation: the batch's gradient as the mean over k
        micro-batches scanned inside the step (the memory of one micro-batch; one optimiser
        step per batch). Semantics, BatchNorm's included: `jaxnets.core.accumulation`.
      health: also report `grad_norm` (the global L2 norm of the gradient), `param_norm`
        (of the parameters after the update) and, when found, `learning_rate` (the step's:
        from `optax.inject_hyperparams` state, else `learning_rate` at the optimiser's
        count), as `metrics.Mean` per step (logs show window means).
      learning_rate: the schedule (or constant) `tx` was built with, for `health` when
        `tx` does not inject it into its state.
      skip_nonfinite: a step whose gradient norm is not finite leaves params, optimiser
        state and model state as they were (the step count and data move on), and reports
        `skipped` (the fraction of such steps). Like `optax.apply_if_finite`, without its
        limit on consecutive skips; use it with `hooks.NonFinite("warn")`.
    """
    grad_fn = microbatch_grad(loss_fn, microbatches)

    def step_fn(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        (_, (metrics, model_state)), grads = grad_fn(state.params, state.model_state, batch, key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if health or skip_nonfinite:
            grad_norm = optax.tree.norm(grads)
            metrics = dict(metrics)
        if skip_nonfinite:
            ok = jnp.isfinite(grad_norm)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
            params = keep(params, state.params)
            opt_state = keep(opt_state, state.opt_state)
            model_state = keep(model_state, state.model_state)
            metrics["skipped"] = jmetrics.Mean.from_scalar(1.0 - ok.astype(jnp.float32))
        if health:
            metrics["grad_norm"] = jmetrics.Mean.from_scalar(grad_norm)
            metrics["param_norm"] = jmetrics.Mean.from_scalar(optax.tree.norm(params))
            lr = current_learning_rate(opt_state, state.opt_state, learning_rate)
            if lr is not None:
                metrics["learning_rate"] = jmetrics.Mean.from_scalar(lr)
        return TrainState(state.step + 1, params, opt_state, model_state, state.key), metrics

    return step_fn


def current_learning_rate(
    opt_state: optax.OptState,
    previous: optax.OptState | None = None,
    schedule: optax.ScalarOrSchedule | None = None,
) -> Array | None:
    """The learning rate of the update that produced `opt_state`.

    The first `learning_rate` in an `optax.inject_hyperparams` state; else `schedule`
    at the count of the first `ScaleByScheduleState` (or any state with a `count`) in
    `previous` (the state before the update, whose count the schedule was called with);
    else a constant `schedule`; else None.
    """
    is_injected = lambda x: hasattr(x, "hyperparams") and isinstance(x.hyperparams, dict)
    for node in jax.tree.leaves(opt_state, is_leaf=is_injected):
        if is_injected(node) and "learning_rate" in node.hyperparams:
            return jnp.asarray(node.hyperparams["learning_rate"], jnp.float32)
    if schedule is None:
        return None
    if not callable(schedule):
        return jnp.asarray(schedule, jnp.float32)
    has_count = lambda x: "count" in getattr(x, "_fields", ())
    counts = [
        n.count
        for n in jax.tree.leaves(previous if previous is not None else opt_state, is_leaf=has_count)
        if has_count(n)
    ]
    if not counts:
        return None
    return jnp.asarray(schedule(counts[0]), jnp.float32)


def make_eval_step(eval_fn: EvalFn) -> Callable[[TrainState, Batch, Array], dict]:
    """Builds `eval_step(state, batch, mask) -> metrics` (sums over the global batch)."""

    def step_fn(state: TrainState, batch: Batch, mask: Array) -> dict:
        return eval_fn(state.params, state.model_state, batch, mask)

    return step_fn


def params_sha256(params: PyTree) -> str:
    """A fingerprint of every parameter byte, leaves in `jax.tree` order (with paths)."""
    import hashlib

    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]:
        arr = np.ascontiguousarray(np.asarray(leaf))
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(f"{arr.dtype.str}{arr.shape}".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()
