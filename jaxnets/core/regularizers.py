"""L1/L2 regularisation: loss penalties, decoupled weight decay and the L1 proximal step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnets.core.types import Params, PyTree

Mask = PyTree | Callable[[Params], PyTree] | bool | None
"""Which leaves a regulariser touches.

`None`: every kernel (`kernel_mask`); `True`: every leaf; otherwise a pytree of bools with the
structure of (a prefix of) the params, or a callable returning one (as in `optax.masked`).
"""

_NO_PARAMS = (
    "{name} needs the current parameters: call `tx.update(grads, opt_state, params)`, "
    "not `tx.update(grads, opt_state)`."
)


class ScheduleCountState(NamedTuple):
    """Step count of a transform whose learning rate is a schedule."""

    count: jax.Array  # type: ignore[assignment]  # shape=(), dtype=int32: updates so far


class L1ProximalState(NamedTuple):
    """State of `l1_proximal` with a constant learning rate (none); marks its place in a chain."""


class L1ProximalScheduleState(NamedTuple):
    """State of `l1_proximal` with a scheduled learning rate; marks its place in a chain."""

    count: jax.Array  # type: ignore[assignment]  # shape=(), dtype=int32: updates so far


L1_NOT_LAST = (
    "l1_proximal is followed by {n} transform(s) in the optimiser chain (their states: "
    "{after}); it must be the last "
    "transform (it thresholds the finished step, and anything after it moves the weights off "
    "the exact zeros): e.g. optax.chain(optax.sgd(lr), l1_proximal(strength, lr))"
)


def _transform_states(state: Any) -> list[Any]:
    """The states of a transform's atomic parts, in the order their updates run."""
    if isinstance(state, tuple) and not hasattr(state, "_fields"):  # optax.chain
        return [part for s in state for part in _transform_states(s)]
    for wrapped in ("inner_state", "inner_opt_state"):  # masked, apply_if_finite, inject...
        if hasattr(state, wrapped):
            return _transform_states(getattr(state, wrapped))
    return [state]


def check_l1_last(opt_state: Any) -> None:
    """Raises ValueError when an `l1_proximal` in the optimiser is not its last transform.

    Checked from the initial optimiser state (`create_train_state` does), so a misplaced
    `l1_proximal` is refused before training rather than silently losing its zeros.
    """
    parts = _transform_states(opt_state)
    marks = (L1ProximalState, L1ProximalScheduleState)
    for i, part in enumerate(parts):
        if isinstance(part, marks) and i + 1 < len(parts):
            after = ", ".join(type(p).__name__ for p in parts[i + 1 :])
            raise ValueError(L1_NOT_LAST.format(n=len(parts) - i - 1, after=after))


def check_nonnegative(name: str, value: Any) -> None:
    """Raises ValueError if a concrete hyperparameter is negative or not finite.

    Traced values (under `jit`/`vmap`, e.g. from `optax.inject_hyperparams`) and schedules
    are not checked: they are only known inside the computation.
    """
    if callable(value) or isinstance(value, jax.core.Tracer):
        return
    array = np.asarray(value)
    if not (np.all(np.isfinite(array)) and np.all(array >= 0)):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}; pass e.g. {name}=1e-4")


def kernel_mask(params: Params) -> PyTree:
    """Marks the kernels of `params`: leaves with `ndim >= 2` or whose key is `'kernel'`.

    Biases, norm scales and other vectors are left out, the usual choice for weight decay.

    Args:
      params: a pytree of arrays (e.g. Flax `{'Dense_0': {'kernel': [m, n], 'bias': [n]}}`).

    Returns:
      A pytree of Python bools with the structure of `params`.
    """

    def is_kernel(path, leaf) -> bool:
        name = _key_name(path[-1]) if path else None
        return name == "kernel" or np.ndim(leaf) >= 2

    return jax.tree_util.tree_map_with_path(is_kernel, params)


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _mask_tree(params: Params, mask: Mask) -> PyTree:
    if mask is None:
        return kernel_mask(params)
    return mask(params) if callable(mask) else mask


def _selected_leaves(params: Params, mask: Mask) -> list[jax.Array]:
    kept = jax.tree.map(lambda m, sub: sub if m else None, _mask_tree(params, mask), params)
    return jax.tree.leaves(kept)


def _masked(tx: optax.GradientTransformation, mask: Mask) -> optax.GradientTransformation:
    return optax.masked(tx, kernel_mask if mask is None else mask)


def l2_penalty(params: Params, rate: float | jax.Array, mask: Mask = None) -> jax.Array:
    """Coupled L2 penalty `0.5 * rate * sum(p**2)` over the masked leaves, to add to a loss.

    Its gradient is `rate * p`, so with plain SGD it is the same step as
    `add_decoupled_weight_decay(rate, lr)` (`p <- p * (1 - lr*rate) - lr*grad`); with momentum
    it differs, because this term passes through the velocity. (Keras' `l2(rate)` is
    `rate * sum(p**2)`, without the 0.5: `l2_penalty(p, 2 * keras_rate)` matches it.)

    Args:
      params: pytree of float arrays.
      rate: the L2 coefficient, >= 0.
      mask: which leaves are penalised (see `Mask`); default every kernel.

    Returns:
      A float32 scalar (0.0 if no leaf is selected).
    """
    check_nonnegative("rate", rate)
    leaves = _selected_leaves(params, mask)
    total = sum((jnp.sum(jnp.square(p)) for p in leaves), jnp.zeros([], jnp.float32))
    return 0.5 * rate * total


def l1_penalty(params: Params, rate: float | jax.Array, mask: Mask = None) -> jax.Array:
    """Coupled L1 penalty `rate * sum(|p|)` over the masked leaves, to add to a loss.

    Trained by (sub)gradient descent this shrinks weights towards zero but leaves them
    oscillating around it, never exactly 0; use `l1_proximal` for exact zeros.

    Args:
      params: pytree of float arrays.
      rate: the L1 coefficient, >= 0.
      mask: which leaves are penalised (see `Mask`); default every kernel.

    Returns:
      A float32 scalar (0.0 if no leaf is selected).
    """
    check_nonnegative("rate", rate)
    leaves = _selected_leaves(params, mask)
    return rate * sum((jnp.sum(jnp.abs(p)) for p in leaves), jnp.zeros([], jnp.float32))


def _count_init(learning_rate):
    def init_fn(params):
        del params
        if callable(learning_rate):
            return ScheduleCountState(count=jnp.zeros([], jnp.int32))
        return optax.EmptyState()

    return init_fn


def _learning_rate_at(learning_rate, state):
    """The learning rate of this step and the state for the next one."""
    if callable(learning_rate):
        return learning_rate(state.count), ScheduleCountState(optax.safe_increment(state.count))
    return learning_rate, state


def add_decoupled_weight_decay(
    rate: float | jax.Array,
    learning_rate: optax.ScalarOrSchedule,
    *,
    mask: Mask = None,
) -> optax.GradientTransformation:
    """Decoupled L2 weight decay: adds `-lr_t * rate * p` to the (final) update.

    Placed after the momentum transform, the decay never enters the velocity
    [Loshchilov & Hutter, 2019, "Decoupled Weight Decay Regularization"]: the step is
    `p <- p + u - lr_t * rate * p` where `u` is the incoming update (already scaled by the
    negative learning rate). Unlike `optax.add_decayed_weights`, which comes before the
    learning-rate scaling, this one scales by `lr_t` itself, so it goes after `trace`.

    Args:
      rate: decay per unit learning rate, >= 0 (the `lambda` of `0.5*lambda*||p||^2`).
      learning_rate: the float learning rate or the same schedule (`count -> lr`) as the
        chain's, so the decay follows its decay.
      mask: which leaves decay (see `Mask`); default every kernel, not biases.

    Returns:
      An `optax.GradientTransformation`; its `update` needs `params`.

    Example:
      >>> tx = optax.chain(optax.sgd(0.1, momentum=0.9),
      ...                  add_decoupled_weight_decay(1e-4, 0.1))
    """
    check_nonnegative("rate", rate)
    check_nonnegative("learning_rate", learning_rate)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(_NO_PARAMS.format(name="add_decoupled_weight_decay"))
        lr, state = _learning_rate_at(learning_rate, state)
        updates = jax.tree.map(
            lambda u, p: u - jnp.asarray(lr * rate, u.dtype) * p, updates, params
        )
        return updates, state

    return _masked(optax.GradientTransformation(_count_init(learning_rate), update_fn), mask)


def l1_proximal(
    strength: float | jax.Array,
    learning_rate: optax.ScalarOrSchedule,
    *,
    mask: Mask = None,
) -> optax.GradientTransformation:
    """Proximal step of `strength * ||p||_1`: soft-thresholds each weight after the step.

    With `x = p + u` the point the incoming update `u` leads to, the new weight is
    `prox(x) = sign(x) * max(|x| - lr_t * strength, 0)` (ISTA; [Parikh & Boyd, 2014,
    "Proximal Algorithms", 6.5.2]). The returned update is `prox(x) - p`, which
    `optax.apply_updates` adds back to `p`.

    Exact zeros: where `|x| <= lr_t * strength` the target is +0.0 and the update is `-p`
    exactly (negation is exact), so `p + (-p)` is exactly +0.0 (IEEE round-to-nearest,
    finite `p`). Where the weight survives, `p + (prox(x) - p)` equals `prox(x)` bit for bit
    whenever `prox(x)` is within a factor 2 of `p` (Sterbenz: the subtraction is exact), and
    otherwise within one rounding of `p`: an additive update cannot hit every float.

    It must be the last element of a chain: it maps the finished step `x` to its proximal
    point, so it needs the complete update (momentum, learning rate and weight decay applied
    before it), and anything after it would move the weights off `prox(x)` and lose the
    zeros (a `scale(c)` after it gives `p - c*p`, not 0). For the same reason it sits after
    the momentum `trace`: the thresholding jump never enters the velocity.

    Args:
      strength: the L1 coefficient `lambda`, >= 0.
      learning_rate: the chain's float learning rate or schedule (`count -> lr`).
      mask: which leaves are thresholded (see `Mask`); default every kernel. Other leaves
        get the incoming update unchanged, bit for bit.

    Returns:
      An `optax.GradientTransformation`; its `update` needs `params`.

    Example:
      >>> tx = optax.chain(optax.sgd(0.1), l1_proximal(1e-3, 0.1))
    """
    check_nonnegative("strength", strength)
    check_nonnegative("learning_rate", learning_rate)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(_NO_PARAMS.format(name="l1_proximal"))
        lr, count = _learning_rate_at(learning_rate, state)
        if callable(learning_rate):  # the same state type out as in (its marker)
            state = L1ProximalScheduleState(count.count)

        def prox_update(u, p):
            # The same sum as optax.apply_updates, so x is the point the step would reach.
            x = jnp.asarray(p + u).astype(p.dtype)
            shrunk = jnp.abs(x) - jnp.asarray(lr * strength, x.dtype)
            target = jnp.where(shrunk > 0, jnp.sign(x) * shrunk, jnp.zeros_like(x))
            return (target - p).astype(u.dtype)

        return jax.tree.map(prox_update, updates, params), state

    def init_fn(params):
        del params
        if callable(learning_rate):
            return L1ProximalScheduleState(count=jnp.zeros([], jnp.int32))
        return L1ProximalState()

    return _masked(optax.GradientTransformation(init_fn, update_fn), mask)


def sparsity(params: Params) -> dict[str, float]:
    """Fraction of exactly-zero entries of each leaf, keyed by its path (`'Dense_0/kernel'`).

    A host-side report (it reads the arrays back), e.g. per layer after L1 training.

    Args:
      params: pytree of arrays.

    Returns:
      `{path: zeros / size}` with Python floats in [0, 1]; empty leaves report 0.0.
    """
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        array = np.asarray(jax.device_get(leaf))
        name = "/".join(_key_name(k) for k in path)
        out[name] = float(np.count_nonzero(array == 0) / array.size) if array.size else 0.0
    return out
