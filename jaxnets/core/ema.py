"""An exponential moving average of the parameters, as an Optax transformation.

`with_ema(tx, decay)` is `tx` whose state also holds the average of the parameters after
each update: `ema <- decay * ema + (1 - decay) * params_new`, starting from the initial
parameters (`ema_0 = params_0`). The average lives in the optimiser
state, so it is checkpointed, resumed, sharded and swept with the rest of the train state,
and the step needs no change. `ema_params(opt_state)` reads it; `swap(state)` gives the
train state with the average in place of the parameters, for evaluation (`eval_step` with
`swap`), `serving.predict` and `serving.export`. Only the parameters are averaged: the
model state (BatchNorm's statistics, already running averages) is used as it is.

Example:
    >>> tx = with_ema(optax.adam(1e-3), decay=0.999)
    >>> state = train.create_train_state(objective.init, tx, sample, key=jax.random.key(0))
    >>> result = loop.fit(state, train.make_train_step(objective.loss_fn, tx), data, ...,
    ...                   hooks=[hooks.Evaluate(ema_eval_step(eval_step), val, batch_size=256,
    ...                                         prefix="val_ema_")])
    >>> predictions = serving.predict(objective, swap(result.state), x)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxnets.core.checks import Rule, check_argument

DECAY = Rule(float, low=0, high=1, high_open=True)


class EmaState(NamedTuple):
    """The wrapped transform's state and the average of the parameters."""

    inner: optax.OptState
    count: jax.Array  # type: ignore[assignment]  # int32 [], updates averaged (optax's name)
    ema: optax.Params  # the average, the parameters' dtypes and shapes


def with_ema(tx: optax.GradientTransformation, decay: float) -> optax.GradientTransformation:
    """`tx`, keeping an exponential moving average of the parameters it updates.

    After update t (t = 1, 2, ...), with `p_t` the parameters it produces,
    `ema_t = decay * ema_{t-1} + (1 - decay) * p_t`, starting from `ema_0 = p_0` (the
    initial parameters, as timm's and big_vision's averages do: no bias correction needed).

    Args:
      tx: the optimiser; its updates are unchanged (its state becomes `EmaState.inner`).
      decay: in [0, 1); 0 keeps the latest parameters; 0.999 averages ~1000 updates.

    Returns:
      An `optax.GradientTransformation` whose `update` needs `params`; its state is
      `EmaState(inner, count, ema)`.
    """
    check_argument("decay", decay, DECAY)

    def init_fn(params):
        return EmaState(tx.init(params), jnp.zeros((), jnp.int32), jax.tree.map(jnp.array, params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("with_ema's update needs params: tx.update(grads, state, params)")
        updates, inner = tx.update(updates, state.inner, params)
        new_params = optax.apply_updates(params, updates)
        ema = jax.tree.map(
            lambda e, p: (decay * e + (1 - decay) * p).astype(e.dtype), state.ema, new_params
        )
        return updates, EmaState(inner, optax.safe_int32_increment(state.count), ema)

    return optax.GradientTransformation(init_fn, update_fn)


def _is_ema(x: Any) -> bool:
    return isinstance(x, EmaState)


def ema_params(opt_state: optax.OptState) -> optax.Params:
    """The parameter average held by an optimiser state built with `with_ema`.

    Works on any state that contains one `EmaState` (e.g. inside `optax.chain`, or a
    sweep's stacked states: the average then has the leading model axis too).
    """
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_ema) if _is_ema(s)]
    if len(found) != 1:
        raise ValueError(
            f"the optimiser state holds {len(found)} parameter averages; build the optimiser "
            "with jaxnets.core.ema.with_ema(tx, decay=...) (once)"
        )
    return found[0].ema


def swap(state: Any) -> Any:
    """The train state with the parameter average in place of the parameters (a copy of
    nothing: the same arrays), for evaluation, prediction and export."""
    return state._replace(params=ema_params(state.opt_state))


def ema_eval_step(eval_step: Callable) -> Callable:
    """`eval_step(state, batch, mask)` evaluated on the averaged parameters (`swap`)."""

    def step_fn(state, batch, mask):
        return eval_step(swap(state), batch, mask)

    return step_fn
