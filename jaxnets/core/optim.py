"""Optax chains and schedules: Keras-exact SGD with momentum/Nesterov, inverse-time decay."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnets.core.regularizers import (
    Mask,
    add_decoupled_weight_decay,
    check_nonnegative,
    l1_proximal,
)


def inverse_time_decay(init_value: float | jax.Array, decay: float | jax.Array) -> optax.Schedule:
    """Keras 1 learning-rate decay: `lr_t = init_value / (1 + decay * t)`.

    `t` is the number of updates applied before this one, so the first update uses
    `init_value` (Keras 1 read `iterations` before incrementing it in the same step).

    Args:
      init_value: the learning rate of the first update, >= 0.
      decay: Keras' `decay` argument, >= 0 (per update, not per epoch).

    Returns:
      A schedule `count -> lr_t`: an int32 count in, a float32 scalar out.

    Example:
      >>> inverse_time_decay(0.05, 1e-6)(jnp.asarray(0, jnp.int32))
      Array(0.05, dtype=float32)
    """
    check_nonnegative("init_value", init_value)
    check_nonnegative("decay", decay)

    def schedule(count):
        t = jnp.asarray(count).astype(jnp.result_type(float))
        return init_value / (1 + decay * t)

    return schedule


def _is_python_zero(value) -> bool:
    # Only a literal 0 drops a component: an array (maybe traced, e.g. from
    # optax.inject_hyperparams) keeps the state structure the same in init and update.
    return isinstance(value, (int, float)) and value == 0


def sgd(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float | jax.Array = 0.0,
    nesterov: bool = False,
    weight_decay: float | jax.Array = 0.0,
    l1: float | jax.Array = 0.0,
    weight_decay_mask: Mask = None,
    l1_mask: Mask = None,
) -> optax.GradientTransformation:
    """Keras SGD (momentum, Nesterov, any lr schedule) with decoupled L2 and proximal L1.

    Exactly the Keras update, also when the learning rate changes:
    `v <- momentum * v - lr_t * g`, then `p <- p + v`, or with Nesterov
    `p <- p + momentum * v - lr_t * g`. The chain scales by `-lr_t` *before* the momentum
    trace, so each step's own `lr_t` is inside the velocity (`optax.sgd` traces first and
    scales the whole velocity by the current lr, which differs once the lr decays).
    Then, in this order: decoupled weight decay `p <- p - lr_t * weight_decay * p`
    (outside the velocity; `add_decoupled_weight_decay`), and the L1 proximal step
    `p <- sign(p) * max(|p| - lr_t * l1, 0)` (exact zeros; `l1_proximal`). Using both
    gives the elastic net.

    Strength under momentum: the velocity multiplies a steady gradient step by
    `1 / (1 - momentum)`, the decay and proximal steps are applied once, so the fixed points
    of `sgd(l1=a, weight_decay=b)` are those of `loss + (1 - momentum) * (a * ||p||_1 +
    0.5 * b * ||p||^2)`. To match coupled penalties of strength `a`, `b` (or a run without
    momentum), pass `a / (1 - momentum)`, `b / (1 - momentum)`.

    Works inside `jit` and under `vmap` over hyperparameters, directly or through
    `optax.inject_hyperparams(sgd)` (pass callable masks there as `static_args`).

    Args:
      learning_rate: a float, or a schedule `count -> lr` such as `inverse_time_decay`.
      momentum: velocity decay in [0, 1); 0 gives plain SGD.
      nesterov: Keras' Nesterov form above.
      weight_decay: decoupled L2 rate, >= 0 (0: off).
      l1: proximal L1 strength, >= 0 (0: off).
      weight_decay_mask: leaves that decay (see `Mask`); default every kernel.
      l1_mask: leaves that are thresholded (see `Mask`); default every kernel.

    Returns:
      An `optax.GradientTransformation`; `update` needs `params` when weight decay or L1 is on.

    Example:
      >>> tx = sgd(inverse_time_decay(0.05, 1e-6), momentum=0.9, nesterov=True)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)
    """
    check_nonnegative("learning_rate", learning_rate)
    check_nonnegative("momentum", momentum)
    if not isinstance(momentum, jax.core.Tracer) and np.any(np.asarray(momentum) >= 1):
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}; Keras' usual is 0.9")
    if not isinstance(nesterov, bool):
        raise ValueError(f"nesterov must be a bool, got {nesterov!r}")
    parts = [optax.scale_by_learning_rate(learning_rate)]
    if not _is_python_zero(momentum):
        parts.append(optax.trace(decay=momentum, nesterov=nesterov))
    if not _is_python_zero(weight_decay):
        parts.append(
            add_decoupled_weight_decay(weight_decay, learning_rate, mask=weight_decay_mask)
        )
    if not _is_python_zero(l1):
        parts.append(l1_proximal(l1, learning_rate, mask=l1_mask))
    return optax.chain(*parts)
