"""Inference and export: `predict` batched over the mesh, `export` of the trained forward
function with `jax.export` (a file that runs without jaxnets).

Example:
    >>> outputs = predict(objective, state, x, batch_size=256)       # numpy, [n, ...]
    >>> export(objective, state, x[:1], path="model.jax")            # any batch size
    # anywhere, with jax alone (no jaxnets, no Flax, no Python model code):
    >>> from jax import export as jexport
    >>> forward = jexport.deserialize(open("model.jax", "rb").read())
    >>> outputs = forward.call(x)

To predict or export with an EMA of the parameters, pass `ema.swap(state)`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax import export as jax_export  # not imported by `import jax` on jax 0.7

from jaxnets.core.checks import POSITIVE_INT, check_argument
from jaxnets.data.batching import num_examples
from jaxnets.engine import sharding

# (params, model_state, inputs) -> outputs: the forward pass in evaluation mode.
ApplyFn = Callable[[Any, Any, Any], Any]


def forward_fn(objective_or_apply_fn: Any) -> ApplyFn:
    """The forward pass `(params, model_state, inputs) -> outputs` of an adapter's
    `Objective` (its `apply`), or the function itself."""
    apply = getattr(objective_or_apply_fn, "apply", objective_or_apply_fn)
    if not callable(apply):
        raise TypeError(
            "objective_or_apply_fn must be an adapters.Objective or a function "
            f"(params, model_state, inputs) -> outputs; got {type(objective_or_apply_fn).__name__}"
        )
    return apply


def _variables(state: Any) -> tuple[Any, Any]:
    """(params, model_state) of a TrainState, or of a `(params, model_state)` pair."""
    if hasattr(state, "params"):
        return state.params, getattr(state, "model_state", {})
    params, model_state = state
    return params, model_state


def predict(
    objective_or_apply_fn: Any,
    state: Any,
    data: Any,
    *,
    batch_size: int = 256,
    mesh: Any = None,
    rule: sharding.Rule = sharding.replicated,
) -> Any:
    """The model's outputs on every example of `data`, batched and split over the mesh.

    Args:
      objective_or_apply_fn: an adapter's `Objective` (its `apply`, evaluation mode), or a
        function `(params, model_state, inputs) -> outputs`.
      state: a `TrainState` (`ema.swap(state)` for the parameter average), or a
        `(params, model_state)` pair.
      data: the model's inputs, an array or pytree with a leading example axis
        (`batch["image"]`, not the batch).
      batch_size: the global batch of one device call (rounded up to a multiple of the
        device count); the last batch is padded and the padding dropped.
      mesh: the devices (default: all); rule: how the parameters are placed.

    Returns:
      The outputs as numpy arrays (a pytree like the model's), leading axis `n`.
    """
    check_argument("batch_size", batch_size, POSITIVE_INT)
    apply = forward_fn(objective_or_apply_fn)
    mesh = sharding.make_mesh() if mesh is None else mesh
    n = num_examples(data, "data")
    devices = sharding.num_devices(mesh)
    batch = -(-min(batch_size, n) // devices) * devices
    steps = -(-n // batch)
    variables = _variables(state)
    variables = sharding.place(variables, sharding.state_shardings(variables, mesh, rule))

    def pad(x):
        x = np.asarray(x)
        padded = np.concatenate([x, np.repeat(x[-1:], steps * batch - n, axis=0)])
        return padded.reshape(steps, batch, *x.shape[1:])

    chunks = jax.tree.map(pad, data)
    program = jax.jit(lambda v, x: apply(v[0], v[1], x))
    split = sharding.batch_sharding(mesh)

    def put(x, i):
        local = sharding.process_columns(mesh, x[i : i + 1])[0]  # this process's examples
        return jax.make_array_from_process_local_data(split, local)

    outputs = [
        program(variables, jax.tree.map(lambda x, i=i: put(x, i), chunks)) for i in range(steps)
    ]
    host = sharding.to_host(outputs)
    return jax.tree.map(lambda *xs: np.concatenate(xs)[:n], *host)


def export(
    objective_or_apply_fn: Any,
    state: Any,
    sample_inputs: Any,
    *,
    path: str | os.PathLike | None = None,
    polymorphic_batch: bool = True,
    platforms: tuple[str, ...] | None = None,
) -> jax_export.Exported:
    """The trained forward function `inputs -> outputs` as a `jax.export.Exported`.

    The parameters and model state are constants of the exported program, so the file
    (`Exported.serialize()`) is all a server needs: `jax.export.deserialize(blob).call(x)`
    runs it with jax alone (no jaxnets, no Flax, no model code), on the platforms it was
    exported for.

    Args:
      objective_or_apply_fn, state: as `predict` (`ema.swap(state)` exports the average).
      sample_inputs: inputs of the right dtypes and trailing shapes (one example is enough).
      path: where to write the serialized bytes (None: not written).
      polymorphic_batch: the leading axis is symbolic (`b`): any batch size runs; False:
        exactly the sample's batch size (for models whose code compares the batch size
        with a number, e.g. `MnistCNN`'s exported convolutions: a clear error says so).
      platforms: e.g. `("cpu", "cuda", "tpu")` (one file for several); None: this backend.

    Returns:
      The `Exported` (its `.call(x)` runs it here).
    """
    apply = forward_fn(objective_or_apply_fn)
    params, model_state = jax.device_get(_variables(state))
    scope = jax_export.SymbolicScope()

    def spec(x):
        x = np.asarray(x)
        shape = x.shape
        if polymorphic_batch:
            shape = jax_export.symbolic_shape("b, ...", like=x.shape, scope=scope)
        return jax.ShapeDtypeStruct(shape, x.dtype)

    fn = jax.jit(lambda inputs: apply(params, model_state, inputs))
    try:
        exported = jax_export.export(fn, platforms=platforms)(jax.tree.map(spec, sample_inputs))
    except Exception as e:
        if not polymorphic_batch or type(e).__name__ != "InconclusiveDimensionOperation":
            raise
        raise ValueError(
            "the model's forward pass cannot be traced for a symbolic batch size b ("
            + str(e).splitlines()[0]
            + "); export one batch size: export(..., polymorphic_batch=False) with "
            "sample_inputs of the serving batch's size"
        ) from e
    if path is not None:
        Path(path).write_bytes(exported.serialize())
    return exported
