"""The seed's two-layer sigmoid network: a Flax module, the same net as pure functions, and
its hand-written backprop (thousands of nets at once: `jaxnets.models.two_layer_many`).

The params dict of the pure functions (one net)::

    {"w1": [d_in, hidden], "w2": [hidden, out]}            # the seed: no biases
    {"w1": ..., "b1": [hidden], "w2": ..., "b2": [out]}      # use_bias=True

It is the Flax module's ``variables["params"]`` with the layers ``hidden``/``output`` and
their ``kernel``/``bias`` renamed; `two_layer_params_from_flax` and `two_layer_params_to_flax`
convert both ways. A batch of nets (`two_layer_train_many`) is the same dict with a leading
nets axis on every array: ``{"w1": [nets, d_in, hidden], "w2": [nets, hidden, out]}``.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype, Initializer

from jaxnets.core.types import Array, Params

uniform_01: Initializer = nn.initializers.uniform(scale=1.0)
"""Uniform on [0, 1): the seed's ``np.random.rand`` initialisation, drawn from a JAX key."""


class TwoLayerSigmoid(nn.Module):
    """d_in -> hidden (sigmoid) -> out (sigmoid), the seed's 3-4-1 net by default.

    Attributes:
      hidden: width of the hidden layer.
      out: number of outputs.
      use_bias: the seed has no biases (b = 0).
      kernel_init: weight initialiser; `uniform_01` reproduces the seed's ``np.random.rand``.
      bias_init: bias initialiser (used only with ``use_bias``).
      dtype: the compute dtype (None: promoted from inputs and parameters); the output comes
        out in at least float32.
      param_dtype: the parameters' dtype.

    Example:
        >>> model = TwoLayerSigmoid()
        >>> variables = model.init(jax.random.key(0), jnp.zeros((4, 3)))
        >>> model.apply(variables, jnp.ones((4, 3))).shape
        (4, 1)
    """

    hidden: int = 4
    out: int = 1
    use_bias: bool = False
    kernel_init: Initializer = uniform_01
    bias_init: Initializer = nn.initializers.zeros_init()
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Args: x: [batch, d_in] float. Returns: [batch, out] probabilities in (0, 1)."""
        dense = functools.partial(
            nn.Dense,
            use_bias=self.use_bias,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        h = nn.sigmoid(dense(self.hidden, name="hidden")(x))
        y = nn.sigmoid(dense(self.out, name="output")(h))
        return y.astype(jnp.promote_types(y.dtype, jnp.float32))


_FLAX_NAMES = {"w1": ("hidden", "kernel"), "b1": ("hidden", "bias"),
               "w2": ("output", "kernel"), "b2": ("output", "bias")}  # fmt: skip


def two_layer_params_from_flax(variables: Params) -> Params:
    """The pure-function params dict of a `TwoLayerSigmoid`'s ``variables`` (or its params)."""
    tree = variables.get("params", variables)
    return {
        name: tree[layer][leaf]
        for name, (layer, leaf) in _FLAX_NAMES.items()
        if leaf in tree.get(layer, {})
    }


def two_layer_params_to_flax(params: Params) -> Params:
    """The ``variables`` of a `TwoLayerSigmoid` holding the pure-function `params`."""
    tree: dict = {}
    for name, value in params.items():
        layer, leaf = _FLAX_NAMES[name]
        tree.setdefault(layer, {})[leaf] = value
    return {"params": tree}


def _layers(params: Params, x: Array) -> tuple[Array, Array]:
    h = jax.nn.sigmoid(x @ params["w1"] + params.get("b1", 0.0))
    return h, jax.nn.sigmoid(h @ params["w2"] + params.get("b2", 0.0))


def two_layer_forward(params: Params, x: Array) -> Array:
    """sigmoid(sigmoid(x @ w1 + b1) @ w2 + b2).

    Args:
      params: the params dict (module docstring); biases optional.
      x: [batch, d_in] inputs.

    Returns:
      [batch, out] outputs in (0, 1).
    """
    return _layers(params, x)[1]


def sum_squared_error(params: Params, x: Array, y: Array) -> Array:
    """The seed's loss, sum((y - y_hat)^2) over the batch and the outputs (not a mean).

    Args:
      params: the params dict.
      x: [batch, d_in] inputs.
      y: [batch, out] targets.

    Returns:
      A scalar.
    """
    return jnp.sum((y - two_layer_forward(params, x)) ** 2)


def two_layer_manual_grads(params: Params, x: Array, y: Array) -> Params:
    """The gradient of `sum_squared_error` by the seed's hand-written chain rule.

    The tutorial writes the update as ``W += dW`` with the negative gradient::

        d_w2 = layer1.T @ (2*(y - out) * out*(1 - out))
        d_w1 = X.T @ (((2*(y - out) * out*(1 - out)) @ W2.T) * layer1*(1 - layer1))

    This function returns the true gradient, ``-d_w2`` and ``-d_w1``, so that it equals
    ``jax.grad(sum_squared_error)(params, x, y)``; the tutorial's step is ``W -= lr * grad``.

    Args:
      params: the params dict; biases optional (their gradients are added when present).
      x: [batch, d_in] inputs.
      y: [batch, out] targets.

    Returns:
      A dict with the keys and shapes of `params`.
    """
    h, out = _layers(params, x)
    delta2 = 2.0 * (out - y) * out * (1.0 - out)  # [batch, out]: dL/d(pre-activation 2)
    delta1 = (delta2 @ params["w2"].T) * h * (1.0 - h)  # [batch, hidden]
    grads = {"w1": x.T @ delta1, "w2": h.T @ delta2}
    if "b1" in params:
        grads["b1"] = jnp.sum(delta1, axis=0)
    if "b2" in params:
        grads["b2"] = jnp.sum(delta2, axis=0)
    return grads


@jax.custom_vjp
def sum_squared_error_by_hand(params: Params, x: Array, y: Array) -> Array:
    """`sum_squared_error` whose derivative is the seed's hand-written backprop.

    `jax.grad` of this function (as the train step takes it) runs `two_layer_manual_grads`,
    the tutorial's chain rule, instead of JAX's own reverse pass: the same value, and the
    gradient the tutorial computes. Inputs and targets get zero cotangents.
    """
    return sum_squared_error(params, x, y)


def _sse_fwd(params, x, y):
    return sum_squared_error(params, x, y), (params, x, y)


def _sse_bwd(residuals, g):
    params, x, y = residuals
    grads = jax.tree.map(lambda d: g * d, two_layer_manual_grads(params, x, y))
    return grads, jnp.zeros_like(x), jnp.zeros_like(y)


sum_squared_error_by_hand.defvjp(_sse_fwd, _sse_bwd)
