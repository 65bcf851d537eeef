"""Gradient accumulation: the gradient of a batch as k micro-batches scanned inside the step.

`microbatch_grad(loss_fn, k)` has the signature and result of
`jax.value_and_grad(loss_fn, has_aux=True)`; `train.make_train_step(..., microbatches=k)`
uses it, so one optimiser step sees the mean gradient of the k micro-batches.

Semantics (what equals what):
- **The gradient and loss** are the means over the k micro-batches of each micro-batch's
  gradient and loss. For a loss that is a mean over examples and a model without
  batch-dependent layers this is the gradient of the whole batch (to float rounding): k
  micro-batches of b equal one step on the batch of k*b.
- **Memory**: `lax.scan` over the micro-batches, so the activations alive at once are
  those of one micro-batch (plus one accumulated gradient); the batch itself is an input.
- **Micro-batch j** is the examples `j, j + k, j + 2k, ...` of the global batch (a strided
  split): every device holds an equal share of every micro-batch, so it works on any mesh
  whose device count divides `batch / k`, with no data moving between devices.
- **Metrics** are merged (summed) over the micro-batches: the batch's metrics.
- **BatchNorm** (and any `model_state`) is threaded through the micro-batches in order:
  each micro-batch is normalised with its own statistics and updates the running averages
  once, so a step makes k running-average updates with momentum m (the big batch makes one
  with the whole batch's statistics). Normalising by micro-batch statistics is the usual
  accumulation semantics (Keras, PyTorch); it is *not* the big-batch step.
- **Randomness**: micro-batch j's key is `fold_in(step_key, j)` (dropout masks differ from
  the big batch's); per-example keys are by position within the micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxnets.core.checks import POSITIVE_INT, check_argument

MICROBATCH_NOT_DIVISIBLE = (
    "a batch of {batch} examples does not split into microbatches={k}; use a batch size "
    "that is a multiple of {k} (e.g. {suggestion}) or microbatches dividing {batch}"
)


def split_microbatches(batch, k: int):
    """`[batch, ...]` leaves as `[k, batch // k, ...]`: micro-batch j = examples j, j+k, ..."""
    n = jax.tree.leaves(batch)[0].shape[0]
    if n % k:
        suggestion = max(k, round(n / k) * k)
        raise ValueError(MICROBATCH_NOT_DIVISIBLE.format(batch=n, k=k, suggestion=suggestion))
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(n // k, k, *x.shape[1:]), 0, 1), batch)


def microbatch_grad(loss_fn: Callable, microbatches: int) -> Callable:
    """`jax.value_and_grad(loss_fn, has_aux=True)` computed over `microbatches` micro-batches.

    Args:
      loss_fn: `(params, model_state, batch, key) -> (loss, (metrics, model_state))`.
      microbatches: k >= 1; the batch's leading size must be a multiple of k.

    Returns:
      `fn(params, model_state, batch, key) -> ((loss, (metrics, model_state)), grads)`:
      loss and grads the means over micro-batches, metrics their merged sums, model_state
      after the last micro-batch (module docstring).
    """
    check_argument("microbatches", microbatches, POSITIVE_INT)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if microbatches == 1:
        return grad_fn
    k = microbatches

    def fn(params, model_state, batch, key):
        micro = split_microbatches(batch, k)

        def one(model_state, xs):
            part, j = xs
            return grad_fn(params, model_state, part, jax.random.fold_in(key, j))

        first = jax.tree.map(lambda x: x[0], micro)
        (loss0, (metrics0, _)), grads0 = jax.eval_shape(
            lambda ms: one(ms, (first, jnp.int32(0))), model_state
        )
        zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)

        def body(carry, xs):
            loss, metrics, grads, model_state = carry
            (part_loss, (m, model_state)), g = one(model_state, xs)
            add = lambda a, b: jax.tree.map(jnp.add, a, b)
            return (loss + part_loss, add(metrics, m), add(grads, g), model_state), None

        init = (zeros(loss0), zeros(metrics0), zeros(grads0), model_state)
        (loss, metrics, grads, model_state), _ = jax.lax.scan(
            body, init, (micro, jnp.arange(k, dtype=jnp.int32))
        )
        grads = jax.tree.map(lambda g: g / k, grads)
        return (loss / k, (metrics, model_state)), grads

    return fn
