"""The train state, pure train/eval steps built from a user's loss function, and the runners
that put many steps in one device call with the data set resident on the devices.

The contract (what every model, data set and loss goes through):
- a **batch** is any pytree of arrays with a leading example axis, e.g.
  `{"image": [b, 28, 28, 1], "label": [b]}`;
- a **loss function** is `loss_fn(params, model_state, batch, key) -> (loss, (metrics,
  new_model_state))`: it calls the model itself, so weighted means and penalties on params
  are the user's; `loss` is differentiated as returned (never re-averaged); `metrics` is a
  dict of `jaxnets.metrics` values (mergeable sums); `model_state` holds every non-trainable
  collection (BatchNorm statistics; `{}` when none);
- an **eval function** is `eval_fn(params, model_state, batch, mask) -> metrics`, mask
  `[batch]` bool (False for the padding of the last batch).
`jaxnets.adapters` builds both from a Flax Linen or NNX module, a loss and metrics.

Everything a run computes is a pure function of the train state and of `(seed, step)`: the
key of step s is `fold_in(key, s)`, the data order of epoch e is a permutation drawn from
`fold_in(data_key, e)`. That is what makes a resumed run bit-identical to an uninterrupted one.

A complete loop from the public parts (what `jaxnets.loop.fit` does, without logging):

    objective = adapters.linen(model, loss=..., metrics={...}, axis_name=dp.axis_name)
    state = create_train_state(objective.init, tx, sample_batch, key=jax.random.key(0))
    run = make_epoch_runner(make_train_step(objective.loss_fn, tx, axis_name=dp.axis_name), dp)
    state, data = dp.replicate(state), dp.replicate({"image": x, "label": y})
    for epoch in range(epochs):
        idx = epoch_indices(data_key, epoch, len(y), batch_size)
        state, metrics = run(state, data, dp.shard_columns(dp.process_columns(idx)))
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnets import parallel
from jaxnets.regularizers import check_l1_last
from jaxnets.types import Array, Batch, Params, PRNGKey, PyTree

# (params, model_state, batch, key) -> (loss, (metrics, new_model_state))
LossFn = Callable[[Params, PyTree, Batch, PRNGKey], tuple[Array, tuple[dict, PyTree]]]
# (params, model_state, batch, mask) -> metrics
EvalFn = Callable[[Params, PyTree, Batch, Array], dict]
# (key, sample_batch) -> (params, model_state)
InitFn = Callable[[PRNGKey, Batch], tuple[Params, PyTree]]

NO_AXIS = (
    "this train step was built without axis_name but runs on {n} devices, where each replica "
    "would take its own step and the replicas would drift apart; build it with "
    "make_train_step(..., axis_name=dp.axis_name)"
)


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


def example_keys(key: PRNGKey, batch: int, axis_name: str | None = None) -> Array:
    """`[batch]` keys, one per example, from the example's global position in the batch.

    `fold_in(key, position)`, where the position counts across devices (device d of a
    batch split over `axis_name` starts at `d * batch`): the same example gets the same key
    whatever the device count.
    """
    offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * batch
    positions = offset + jnp.arange(batch)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(positions)


def _pmean_floats(tree: PyTree, axis_name: str) -> PyTree:
    """Averages float leaves over devices; other leaves (counters) are equal on all of them."""
    return jax.tree.map(
        lambda x: jax.lax.pmean(x, axis_name) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        tree,
    )


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    axis_name: str | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Builds `train_step(state, batch) -> (state, metrics)`, big_vision's `update_fn`.

    Gradients of `loss_fn`'s loss are taken with respect to `state.params`; with
    `axis_name` they are averaged over devices (`lax.pmean`), metrics summed (`lax.psum`)
    and the new model state averaged (BatchNorm running statistics: the mean of the
    devices'), so every replica takes the same step. N devices with batch B/N each take the
    step of one device with B when the loss is a mean over examples.

    Args:
      loss_fn: `(params, model_state, batch, key) -> (loss, (metrics, new_model_state))`.
      tx: the Optax transformation.
      axis_name: the collective axis when run under `DataParallel.map` (required there on
        more than one device: `make_epoch_runner` checks).
    """

    def step_fn(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, (metrics, model_state)), grads = grad_fn(state.params, state.model_state, batch, key)
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
            metrics = jax.lax.psum(metrics, axis_name)
            model_state = _pmean_floats(model_state, axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, opt_state, model_state, state.key), metrics

    step_fn.axis_name = axis_name
    return step_fn


def make_eval_step(
    eval_fn: EvalFn, *, axis_name: str | None = None
) -> Callable[[TrainState, Batch, Array], dict]:
    """Builds `eval_step(state, batch, mask) -> metrics` (summed over devices with axis_name)."""

    def step_fn(state: TrainState, batch: Batch, mask: Array) -> dict:
        metrics = eval_fn(state.params, state.model_state, batch, mask)
        if axis_name is not None:
            metrics = jax.lax.psum(metrics, axis_name)
        return metrics

    step_fn.axis_name = axis_name
    return step_fn


def check_axis(step: Callable, dp: parallel.DataParallel) -> None:
    """Raises when a step built without `dp`'s collective axis would run on several devices."""
    axis = getattr(step, "axis_name", None)
    if dp.num_devices > 1 and axis != dp.axis_name:
        if axis is None:
            raise ValueError(NO_AXIS.format(n=dp.num_devices))
        raise ValueError(
            f"the step reduces over axis {axis!r} but the data-parallel plan's axis is "
            f"{dp.axis_name!r}; build it with axis_name=dp.axis_name"
        )


def gather(data: Batch, ix: Array) -> Batch:
    """The examples `ix` of a resident data set (every leaf indexed along axis 0)."""
    return jax.tree.map(lambda x: x[ix], data)


def make_epoch_runner(train_step: Callable, dp: parallel.DataParallel) -> Callable:
    """Runs many train steps per device call, the data set resident on every device.

    Returns `run(state, data, idx) -> (state, metrics)` where `state` and `data` (a batch
    pytree of the whole data set) come from `dp.replicate`, `idx` is `[steps, global_batch]`
    example indices from `dp.shard_columns`, and `metrics` are the per-step metrics with a
    leading `[steps]` axis (replicated). With one step per call the step is called
    directly; with more it runs inside `lax.scan`. The state buffer is donated.

    Raises:
      ValueError: on several devices, for a step built without `axis_name=dp.axis_name`.
    """
    check_axis(train_step, dp)

    def run_fn(state, data, idx):
        def body(state, ix):
            return train_step(state, gather(data, ix))

        if idx.shape[0] == 1:
            state, metrics = body(state, idx[0])
            return state, jax.tree.map(lambda m: m[None], metrics)
        return jax.lax.scan(body, state, idx)

    return dp.map(
        run_fn,
        in_specs=(parallel.REPLICATED, parallel.REPLICATED, parallel.COLUMNS),
        out_specs=(parallel.REPLICATED, parallel.REPLICATED),
        donate_argnums=(0,),
    )


def make_stream_runner(train_step: Callable, dp: parallel.DataParallel) -> Callable:
    """Runs many train steps per device call on batches streamed from the host.

    Returns `run(state, batches) -> (state, metrics)` where `batches` is a batch pytree with
    a leading `[steps, global_batch, ...]` (from `dp.shard_columns`, split over devices along
    axis 1): the same steps as `make_epoch_runner` on the batches it would gather. The state
    buffer is donated.

    Raises:
      ValueError: on several devices, for a step built without `axis_name=dp.axis_name`.
    """
    check_axis(train_step, dp)

    def run_fn(state, batches):
        if jax.tree.leaves(batches)[0].shape[0] == 1:
            state, metrics = train_step(state, jax.tree.map(lambda x: x[0], batches))
            return state, jax.tree.map(lambda m: m[None], metrics)
        return jax.lax.scan(train_step, state, batches)

    return dp.map(
        run_fn,
        in_specs=(parallel.REPLICATED, parallel.COLUMNS),
        out_specs=(parallel.REPLICATED, parallel.REPLICATED),
        donate_argnums=(0,),
    )


def make_eval_runner(eval_step: Callable, dp: parallel.DataParallel) -> Callable:
    """`run(state, data, idx) -> metrics` summed over all of `idx` ([steps, batch]; -1 = pad)."""
    check_axis(eval_step, dp)

    def run_fn(state, data, idx):
        def metrics_of(ix):
            return eval_step(state, gather(data, jnp.maximum(ix, 0)), ix >= 0)

        def body(total, ix):
            return jax.tree.map(jnp.add, total, metrics_of(ix)), None

        zero = jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(metrics_of, idx[0])
        )
        total, _ = jax.lax.scan(body, zero, idx)
        return total

    return dp.map(
        run_fn,
        in_specs=(parallel.REPLICATED, parallel.REPLICATED, parallel.COLUMNS),
        out_specs=parallel.REPLICATED,
    )


def make_stream_eval_runner(eval_step: Callable, dp: parallel.DataParallel) -> Callable:
    """`run(state, batches, mask) -> metrics` summed over streamed `[steps, batch, ...]`.

    The batches come from the host (`dp.shard_columns`); `mask` ([steps, batch] bool) is
    False on the padding of the last batch. The streamed twin of `make_eval_runner`.
    """
    check_axis(eval_step, dp)

    def run_fn(state, batches, mask):
        def body(total, xs):
            return jax.tree.map(jnp.add, total, eval_step(state, *xs)), None

        first = (jax.tree.map(lambda x: x[0], batches), mask[0])
        zero = jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(eval_step, state, *first)
        )
        total, _ = jax.lax.scan(body, zero, (batches, mask))
        return total

    return dp.map(
        run_fn,
        in_specs=(parallel.REPLICATED, parallel.COLUMNS, parallel.COLUMNS),
        out_specs=parallel.REPLICATED,
    )


def num_examples(data: Batch, what: str = "data") -> int:
    """The common leading size of a batch pytree; a clear error when the leaves disagree."""
    leaves = jax.tree_util.tree_leaves_with_path(data)
    if not leaves:
        raise ValueError(
            f"{what} is empty: give a pytree of arrays, e.g. {{'image': x, 'label': y}}"
        )
    sizes = {jax.tree_util.keystr(p): (np.shape(x)[0] if np.ndim(x) else None) for p, x in leaves}
    if None in sizes.values() or len(set(sizes.values())) != 1:
        shown = ", ".join(f"{p or 'data'}: {s}" for p, s in sizes.items())
        raise ValueError(
            f"{what}: every array needs the same leading example axis, got leading sizes "
            f"{shown}; pass the same examples' arrays, e.g. {{'image': x[:n], 'label': y[:n]}}"
        )
    return next(iter(sizes.values()))


def epoch_indices(data_key: PRNGKey, epoch: int, num_examples: int, batch_size: int) -> np.ndarray:
    """Example indices of every step of an epoch: `[num_examples // batch_size, batch_size]`.

    The permutation is a pure function of `(data_key, epoch)`; the last partial batch is
    dropped (a different remainder is dropped each epoch).
    """
    steps = num_examples // batch_size
    if num_examples == 0:
        raise ValueError(
            "the training set has 0 examples: nothing to train on; give at least batch_size "
            f"({batch_size}) examples (check the data's source and any limit or split applied)"
        )
    if steps == 0:
        raise ValueError(
            f"batch size {batch_size} is larger than the {num_examples} training examples; "
            f"use a batch size of {num_examples} or less"
        )
    if num_examples % batch_size:
        _warn_dropped(num_examples, batch_size)
    perm = jax.random.permutation(jax.random.fold_in(data_key, epoch), num_examples)
    return np.asarray(perm[: steps * batch_size], np.int32).reshape(steps, batch_size)


def _warn_dropped(num_examples: int, batch_size: int) -> None:
    """Says once per process (per data size and batch size) what the partial batch drops."""
    if (num_examples, batch_size) in _WARNED_DROPPED:
        return
    _WARNED_DROPPED.add((num_examples, batch_size))
    left = num_examples % batch_size
    small = [d for d in range(1, math.isqrt(num_examples) + 1) if num_examples % d == 0]
    divisors = small + [num_examples // d for d in small]
    near = sorted(
        {max(d for d in divisors if d <= batch_size), min(d for d in divisors if d >= batch_size)}
    )
    warnings.warn(
        f"each epoch trains on {num_examples - left} of the {num_examples} training examples: "
        f"the last {left} ({100 * left / num_examples:.0f}%) of each epoch's shuffled order do "
        f"not fill a batch of {batch_size} and are left out (others each epoch). For every "
        f"example every epoch, use a batch_size that divides {num_examples} (e.g. "
        f"{' or '.join(map(str, near))})",
        UserWarning,
        stacklevel=3,
    )


_WARNED_DROPPED: set[tuple[int, int]] = set()


def eval_indices(num_examples: int, batch_size: int) -> np.ndarray:
    """`[steps, batch_size]` indices covering every example once, padded with -1."""
    steps = math.ceil(num_examples / batch_size)
    idx = np.full(steps * batch_size, -1, np.int32)
    idx[:num_examples] = np.arange(num_examples, dtype=np.int32)
    return idx.reshape(steps, batch_size)


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
