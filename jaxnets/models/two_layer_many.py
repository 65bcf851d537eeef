"""Thousands of the seed's two-layer nets trained at once, near the CPU's vector limit.

The params of a batch of nets are the `jaxnets.models.mlp` dict with a leading nets axis:
``{"w1": [nets, d_in, hidden], "w2": [nets, hidden, out]}`` (biases optional).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxnets.core.types import Array, Params

# Many nets at once. The nets sit on the LAST axis inside the loop, and every contraction over
# the tiny axes (samples, d_in, hidden, out) is an unrolled Python sum of broadcast products:
# XLA fuses a whole step into a few elementwise loops vectorised over the nets. `jnp.sum` over
# a size-3 axis or a batched matmul of 4x3 matrices vectorises badly on CPU (measured 30x and
# 3-10x slower), so neither appears here.


def _small_sum(terms):
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def _step_nets_last(w: dict, x: Array, y: Array, learning_rate: Array) -> dict:
    """One full-batch gradient step of every net; w holds [d_in, hidden, nets]-style arrays."""
    w1, w2 = w["w1"], w["w2"]  # [D, H, N], [H, O, N]
    (n_samples, d_in), hidden, n_out = x.shape, w1.shape[1], w2.shape[1]
    xs = x[:, :, None, None]  # [S, D, 1, 1]
    z1 = _small_sum([xs[:, d] * w1[d] for d in range(d_in)])  # [S, H, N]
    h = jax.nn.sigmoid(z1 + w["b1"] if "b1" in w else z1)
    z2 = _small_sum([h[:, j, None] * w2[j] for j in range(hidden)])  # [S, O, N]
    out = jax.nn.sigmoid(z2 + w["b2"] if "b2" in w else z2)
    delta2 = 2.0 * (out - y[:, :, None]) * out * (1.0 - out)  # [S, O, N]
    dh = _small_sum([delta2[:, k, None] * w2[:, k] for k in range(n_out)])  # [S, H, N]
    delta1 = dh * h * (1.0 - h)
    grads = {
        "w1": _small_sum([xs[s] * delta1[s] for s in range(n_samples)]),  # [D, H, N]
        "w2": _small_sum([h[s][:, None] * delta2[s] for s in range(n_samples)]),  # [H, O, N]
    }
    if "b1" in w:
        grads["b1"] = _small_sum([delta1[s] for s in range(n_samples)])
    if "b2" in w:
        grads["b2"] = _small_sum([delta2[s] for s in range(n_samples)])
    return {k: w[k] - learning_rate * grads[k] for k in w}


def _loss_nets_last(w: dict, x: Array, y: Array) -> Array:
    w1, w2 = w["w1"], w["w2"]
    xs = x[:, :, None, None]
    z1 = _small_sum([xs[:, d] * w1[d] for d in range(x.shape[1])])
    h = jax.nn.sigmoid(z1 + w["b1"] if "b1" in w else z1)
    z2 = _small_sum([h[:, j, None] * w2[j] for j in range(w1.shape[1])])
    out = jax.nn.sigmoid(z2 + w["b2"] if "b2" in w else z2)
    sq = (y[:, :, None] - out) ** 2  # [S, O, N]
    return _small_sum([sq[s, k] for s in range(sq.shape[0]) for k in range(sq.shape[1])])


def _check_many(params: Params, x, y) -> None:
    keys = set(params)
    if not {"w1", "w2"} <= keys <= {"w1", "w2", "b1", "b2"}:
        raise ValueError(
            f"params must have keys w1, w2 (and optionally b1, b2), got {sorted(keys)}; "
            "convert Flax variables with two_layer_params_from_flax"
        )
    w1, w2 = jnp.shape(params["w1"]), jnp.shape(params["w2"])
    if len(w1) != 3 or len(w2) != 3 or w1[0] != w2[0] or w1[2] != w2[1]:
        raise ValueError(
            f"batched params need w1 [nets, d_in, hidden] and w2 [nets, hidden, out] with the "
            f"same nets and hidden, got w1 {w1} and w2 {w2}; stack single-net params with "
            "jax.tree.map(lambda *a: jnp.stack(a), *nets)"
        )
    for name, want in (("b1", (w1[0], w1[2])), ("b2", (w2[0], w2[2]))):
        if name in params and jnp.shape(params[name]) != want:
            got = jnp.shape(params[name])
            raise ValueError(f"{name} must have shape {want} (nets, width), got {got}")
    if jnp.ndim(x) != 2 or jnp.shape(x)[1] != w1[1]:
        raise ValueError(f"x must be [samples, d_in={w1[1]}], got shape {jnp.shape(x)}")
    if jnp.shape(y) != (jnp.shape(x)[0], w2[2]):
        raise ValueError(
            f"y must be [samples, out] = {(jnp.shape(x)[0], w2[2])}, got shape {jnp.shape(y)}"
        )


# Nets per sequential chunk: a chunk's step temporaries ([samples, hidden, nets] arrays) stay in
# L2 cache; one 10,000-net slab spills and measured ~25% more CPU time per net.
_NETS_PER_CHUNK = 2048

# XLA:CPU vectorises 256 bits wide by default. The step is a few elementwise loops over the nets,
# and 512 bits wide they took 0.80x the CPU time on the AVX-512 Xeon (0.25 s against 0.31 s for
# 10,000 nets x 1500 steps, one core; equal to float rounding); LLVM ignores the preference on a
# CPU without AVX-512. Options only for XLA:CPU, and only on a top-level jit (JAX refuses them on
# a jit nested in a user's jit, pmap or shard_map, where the outer compilation decides).
_CPU_COMPILER_OPTIONS = {"xla_cpu_prefer_vector_width": 512}


def _train_many_impl(params, x, y, learning_rate, *, iterations, nets_per_chunk=_NETS_PER_CHUNK):
    dtype = params["w1"].dtype
    x, y, learning_rate = x.astype(dtype), y.astype(dtype), jnp.asarray(learning_rate, dtype)
    nets = params["w1"].shape[0]
    chunks = -(-nets // nets_per_chunk)
    size = -(-nets // chunks)
    pad = chunks * size - nets

    def to_chunks(v):  # [nets, ...] -> [chunks, ..., size]: nets last within a chunk
        v = jnp.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1))
        return jnp.moveaxis(v.reshape((chunks, size) + v.shape[1:]), 1, -1)

    def from_chunks(v):  # inverse of to_chunks
        v = jnp.moveaxis(v, -1, 1)
        return v.reshape((chunks * size,) + v.shape[2:])[:nets]

    def train_chunk(w):
        w = lax.fori_loop(0, iterations, lambda _, w: _step_nets_last(w, x, y, learning_rate), w)
        return w, _loss_nets_last(w, x, y)

    w, loss = lax.map(train_chunk, {k: to_chunks(v) for k, v in params.items()})
    return {k: from_chunks(v) for k, v in w.items()}, loss.reshape(-1)[:nets]


_STATIC = ("iterations", "nets_per_chunk")
_train_many = jax.jit(
    _train_many_impl, static_argnames=_STATIC, compiler_options=_CPU_COMPILER_OPTIONS
)
_train_many_any = jax.jit(_train_many_impl, static_argnames=_STATIC)


@functools.cache
def _train_many_sharded(mesh, axis, iterations: int, on_cpu: bool):
    """`_train_many_impl` on each device's share of the nets (nets sharded over `axis`)."""
    mapped = jax.shard_map(
        lambda p, x, y, lr: _train_many_impl(p, x, y, lr, iterations=iterations),
        mesh=mesh,
        in_specs=(P(axis), P(), P(), P()),
        out_specs=(P(axis), P(axis)),
    )
    return jax.jit(mapped, compiler_options=_CPU_COMPILER_OPTIONS if on_cpu else None)


def _nets_axis(params):
    """The mesh and mesh axis the nets are sharded over, or None (one device, or replicated)."""
    w1 = params["w1"]
    sharding = getattr(w1, "sharding", None)
    if not isinstance(sharding, NamedSharding) or len(w1.devices()) == 1:
        return None
    axis = sharding.spec[0] if len(sharding.spec) else None
    if axis is None or any(a is not None for a in sharding.spec[1:]):
        return None
    return sharding.mesh, axis


def _runs_on_cpu(params) -> bool:
    """Whether the computation runs on CPU: the committed params' devices, else the default."""
    for leaf in jax.tree.leaves(params):
        if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
            return all(d.platform == "cpu" for d in leaf.devices())
    return jax.devices()[0].platform == "cpu"


def two_layer_train_many(
    params: Params, x: Array, y: Array, *, iterations: int, learning_rate: float
) -> tuple[Params, Array]:
    """Full-batch gradient descent on `sum_squared_error` for many independent nets at once.

    One jitted program: ``iterations`` steps of ``w -= learning_rate * grad`` for every net,
    with the gradient by the hand-written chain rule (`two_layer_manual_grads`), evaluated with
    the nets on the fast (vectorised) axis. Equal to ``jax.vmap`` of a single-net ``jax.grad``
    loop to float rounding; compiled once per (shapes, dtype, iterations).

    Args:
      params: batched params dict, every array with a leading nets axis:
        w1 [nets, d_in, hidden], w2 [nets, hidden, out], optional b1 [nets, hidden],
        b2 [nets, out]. Its dtype (float32 or float64) is the compute dtype.
      x: [samples, d_in] inputs, shared by all nets.
      y: [samples, out] targets.
      iterations: number of gradient steps.
      learning_rate: step size (the seed uses 1.0).

    Params sharded over several devices along the nets axis (``jax.device_put(params,
    NamedSharding(mesh, PartitionSpec("nets")))``) train on all of them at once, each device its
    share of the nets (on CPU, ``jax.config.update("jax_num_cpu_devices", 2)`` before JAX starts
    gives one device per core); the result of a net does not depend on the device count.

    Returns:
      ``(params, final_loss)``: the trained params (same layout as the input) and the
      [nets] `sum_squared_error` of each net after the last step.

    Example:
        >>> key = jax.random.key(0)
        >>> params = {"w1": jax.random.uniform(key, (10, 3, 4)),
        ...           "w2": jax.random.uniform(key, (10, 4, 1))}
        >>> x = jnp.array([[0, 0, 1], [0, 1, 1], [1, 0, 1], [1, 1, 1]], jnp.float32)
        >>> y = jnp.array([[0], [1], [1], [0]], jnp.float32)
        >>> params, loss = two_layer_train_many(params, x, y, iterations=1500,
        ...                                     learning_rate=1.0)
        >>> loss.shape
        (10,)
    """
    _check_many(params, x, y)
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    x, y = jnp.asarray(x), jnp.asarray(y)
    if any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves((params, x, y))):
        return _train_many_impl(params, x, y, learning_rate, iterations=iterations)
    on_cpu = _runs_on_cpu(params)
    sharded = _nets_axis(params)
    if sharded is not None:
        mesh, axis = sharded  # JAX itself refuses a nets count that does not divide
        params = jax.device_put(params, NamedSharding(mesh, P(axis)))  # biases like w1
        train = _train_many_sharded(mesh, axis, iterations, on_cpu)
        return train(params, x, y, jnp.asarray(learning_rate, params["w1"].dtype))
    train = _train_many if on_cpu else _train_many_any
    return train(params, x, y, learning_rate, iterations=iterations)
