"""The jitted programs that put many steps in one device call: the train steps of an epoch on
resident data or on streamed batches, and the summed evaluation of either, on a mesh."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxnets.core.types import Array, Batch


def gather(data: Batch, ix: Array) -> Batch:
    """The examples `ix` of a resident data set (every leaf indexed along axis 0)."""
    return jax.tree.map(lambda x: x[ix], data)


def _scan_or_call(step: Callable, state: Any, xs: Any) -> tuple[Any, Any]:
    """`lax.scan(step, state, xs)`, or one direct call for a chunk of one step."""
    if jax.tree.leaves(xs)[0].shape[0] == 1:
        state, metrics = step(state, jax.tree.map(lambda x: x[0], xs))
        return state, jax.tree.map(lambda m: m[None], metrics)
    return jax.lax.scan(step, state, xs)


def _jit_program(body: Callable, mesh: Mesh, state_shardings: Any) -> Callable:
    """`body(state, ...) -> (state, metrics)` jitted: the state stays on its shardings
    (donated), the per-step metrics come back replicated."""
    replicated = NamedSharding(mesh, P())
    return jax.jit(
        in_mesh(body, mesh), out_shardings=(state_shardings, replicated), donate_argnums=(0,)
    )


def in_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """`fn` traced with `mesh` as the abstract mesh in context, so per-device code inside a
    model (`shard_map` over the data axis) finds the devices the batch is split over."""

    def fn_in_mesh(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    return fn_in_mesh


def make_epoch_program(train_step: Callable, mesh: Mesh, state_shardings: Any) -> Callable:
    """Runs many train steps per device call, the data set resident on the devices.

    Returns `program(state, data, idx) -> (state, metrics)` where `state` is placed on
    `state_shardings`, `data` (a batch pytree of the whole data set) is replicated, `idx`
    is `[steps, global_batch]` example indices split over the data axis along axis 1, and
    `metrics` are the per-step metrics with a leading `[steps]` axis. The state is donated.
    """

    def body(state, data, idx):
        return _scan_or_call(lambda s, ix: train_step(s, gather(data, ix)), state, idx)

    return _jit_program(body, mesh, state_shardings)


def make_stream_program(train_step: Callable, mesh: Mesh, state_shardings: Any) -> Callable:
    """Runs many train steps per device call on batches streamed from the host.

    Returns `program(state, batches) -> (state, metrics)` where `batches` has a leading
    `[steps, global_batch, ...]` (split over the data axis along axis 1): the same steps as
    `make_epoch_program` on the batches it would gather. The state is donated.
    """
    return _jit_program(
        lambda state, batches: _scan_or_call(train_step, state, batches), mesh, state_shardings
    )


def _summed(eval_step: Callable, state: Any, xs: Any) -> dict:
    def body(total, x):
        return jax.tree.map(jnp.add, total, eval_step(state, *x)), None

    first = jax.tree.map(lambda x: x[0], xs)
    zero = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(eval_step, state, *first)
    )
    return jax.lax.scan(body, zero, xs)[0]


def make_eval_program(eval_step: Callable, mesh: Mesh) -> Callable:
    """`program(state, data, idx) -> metrics` summed over all of `idx` ([steps, batch]; -1:
    padding)."""

    def body(state, data, idx):
        return _summed(
            lambda s, ix: eval_step(s, gather(data, jnp.maximum(ix, 0)), ix >= 0), state, (idx,)
        )

    return jax.jit(in_mesh(body, mesh), out_shardings=NamedSharding(mesh, P()))


def make_stream_eval_program(eval_step: Callable, mesh: Mesh) -> Callable:
    """`program(state, batches, mask) -> metrics` summed over streamed `[steps, batch, ...]`.

    `mask` ([steps, batch] bool) is False on the padding of the last batch.
    """
    return jax.jit(
        in_mesh(lambda state, batches, mask: _summed(eval_step, state, (batches, mask)), mesh),
        out_shardings=NamedSharding(mesh, P()),
    )
