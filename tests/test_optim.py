"""Tests of jaxnets.core.optim and jaxnets.core.regularizers against numpy transcriptions of
the maths."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnets.core.optim import inverse_time_decay, sgd
from jaxnets.core.regularizers import (
    add_decoupled_weight_decay,
    kernel_mask,
    l1_penalty,
    l1_proximal,
    l2_penalty,
    sparsity,
)

# A small least-squares problem: its gradient is easy to write in numpy.
_RNG = np.random.default_rng(0)
_X = _RNG.normal(size=(16, 3)).astype(np.float32)
_Y = _RNG.normal(size=(16, 2)).astype(np.float32)
_P0 = {
    "kernel": _RNG.normal(size=(3, 2)).astype(np.float32),
    "bias": _RNG.normal(size=(2,)).astype(np.float32),
}


def _loss(params):
    r = _X @ params["kernel"] + params["bias"] - _Y
    return 0.5 * jnp.mean(jnp.sum(r**2, axis=1))


def _numpy_grad(params):
    r = _X.astype(np.float64) @ params["kernel"] + params["bias"] - _Y
    n = _X.shape[0]
    return {"kernel": _X.T.astype(np.float64) @ r / n, "bias": r.sum(0) / n}


def _run(tx, steps, params=None, grad_fn=None):
    """Trains `params` (default _P0) with `tx` on `grad_fn` (default the least-squares loss)."""
    params = jax.tree.map(jnp.asarray, _P0 if params is None else params)
    grad_fn = _grad_fn_from_loss if grad_fn is None else grad_fn
    state = tx.init(params)

    @jax.jit
    def step(params, state, t):
        updates, state = tx.update(grad_fn(params, t), state, params)
        return optax.apply_updates(params, updates), state

    for t in range(steps):
        params, state = step(params, state, t)
    return params, state


def _keras_sgd_numpy(steps, *, lr, decay, momentum, nesterov, weight_decay=0.0, l1=0.0):
    """The Keras 1 SGD update written out in float64 numpy, plus decoupled decay and L1 prox.

    At update `t` (0-based): `lr_t = lr / (1 + decay * t)`; `v = momentum*v - lr_t*g`;
    plain `p = p + v`, Nesterov `p = p + momentum*v - lr_t*g`; then for the kernel only
    `p = p - lr_t*weight_decay*p_old` and `p = sign(p) * max(|p| - lr_t*l1, 0)`.
    """
    params = {k: v.astype(np.float64) for k, v in _P0.items()}
    velocity = {k: np.zeros_like(v) for k, v in params.items()}
    for t in range(steps):
        lr_t = lr / (1.0 + decay * t)
        grads = _numpy_grad(params)
        new = {}
        for k, p in params.items():
            v = momentum * velocity[k] - lr_t * grads[k]
            velocity[k] = v
            step = momentum * v - lr_t * grads[k] if nesterov else v
            q = p + step
            if k == "kernel":
                q = q - lr_t * weight_decay * p
                q = np.sign(q) * np.maximum(np.abs(q) - lr_t * l1, 0.0)
            new[k] = q
        params = new
    return params, velocity


def _grad_fn_from_loss(params, t):
    del t
    return jax.grad(_loss)(params)


# ---------------------------------------------------------------------------------------------
# Schedule


def test_inverse_time_decay_values_and_dtype():
    schedule = inverse_time_decay(0.05, 1e-2)
    counts = jnp.arange(4, dtype=jnp.int32)
    lrs = jax.vmap(schedule)(counts)
    assert lrs.dtype == jnp.float32
    np.testing.assert_allclose(lrs, 0.05 / (1 + 1e-2 * np.arange(4)), rtol=1e-7)
    assert float(schedule(jnp.asarray(0, jnp.int32))) == np.float32(0.05)  # first update: t=0


def test_sgd_schedule_is_counted_with_int32():
    tx = sgd(inverse_time_decay(0.1, 1e-2), momentum=0.9, weight_decay=1e-3, l1=1e-3)
    _, state = _run(tx, 3, grad_fn=_grad_fn_from_loss)
    counts = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(state)
        if "count" in jax.tree_util.keystr(path)
    ]
    assert len(counts) == 3  # lr scaling, weight decay, L1 prox
    for count in counts:
        assert count.dtype == jnp.int32 and int(count) == 3


# ---------------------------------------------------------------------------------------------
# SGD == Keras


@pytest.mark.parametrize("decay", [1e-6, 1e-2])
@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_sgd_matches_keras_update(decay, momentum, nesterov):
    tx = sgd(inverse_time_decay(0.05, decay), momentum=momentum, nesterov=nesterov)
    params, state = _run(tx, 50, grad_fn=_grad_fn_from_loss)
    expected, velocity = _keras_sgd_numpy(
        50, lr=0.05, decay=decay, momentum=momentum, nesterov=nesterov
    )
    chex.assert_trees_all_close(params, expected, atol=1e-6, rtol=1e-6)
    if momentum:
        chex.assert_trees_all_close(state[1].trace, velocity, atol=1e-6, rtol=1e-6)


def test_optax_sgd_differs_from_keras_once_the_lr_decays():
    """optax.sgd scales the whole velocity by today's lr; Keras put each lr_t inside it."""
    schedule = inverse_time_decay(0.05, 1e-2)
    ours, _ = _run(sgd(schedule, momentum=0.9), 50, grad_fn=_grad_fn_from_loss)
    theirs, _ = _run(optax.sgd(schedule, momentum=0.9), 50, grad_fn=_grad_fn_from_loss)
    expected, _ = _keras_sgd_numpy(50, lr=0.05, decay=1e-2, momentum=0.9, nesterov=False)
    chex.assert_trees_all_close(ours, expected, atol=1e-6, rtol=1e-6)
    assert np.max(np.abs(theirs["kernel"] - expected["kernel"])) > 1e-4


# ---------------------------------------------------------------------------------------------
# Decoupled weight decay


@pytest.mark.parametrize("nesterov", [False, True])
def test_decoupled_weight_decay_matches_numpy(nesterov):
    tx = sgd(inverse_time_decay(0.05, 1e-2), momentum=0.9, nesterov=nesterov, weight_decay=0.3)
    params, _ = _run(tx, 50, grad_fn=_grad_fn_from_loss)
    expected, _ = _keras_sgd_numpy(
        50, lr=0.05, decay=1e-2, momentum=0.9, nesterov=nesterov, weight_decay=0.3
    )
    chex.assert_trees_all_close(params, expected, atol=1e-6, rtol=1e-6)


_FIXED_GRADS = {k: _RNG.normal(size=(50, *v.shape)).astype(np.float32) for k, v in _P0.items()}


def _fixed_grads(params, t):
    """Gradients that do not depend on the weights: the velocity then depends on them alone."""
    return {k: jnp.asarray(g)[t] for k, g in _FIXED_GRADS.items()}


def test_decoupled_weight_decay_never_enters_the_velocity():
    lr, rate, momentum = 0.1, 0.5, 0.9
    mask = {"kernel": True, "bias": True}
    plain, plain_state = _run(sgd(lr, momentum=momentum), 30, grad_fn=_fixed_grads)
    decoupled, dec_state = _run(
        sgd(lr, momentum=momentum, weight_decay=rate, weight_decay_mask=mask),
        30,
        grad_fn=_fixed_grads,
    )

    def coupled_grads(params, t):
        penalty = jax.grad(lambda p: l2_penalty(p, rate, mask=True))(params)
        return jax.tree.map(jnp.add, _fixed_grads(params, t), penalty)

    coupled, cou_state = _run(sgd(lr, momentum=momentum), 30, grad_fn=coupled_grads)

    # The decoupled velocity is bit for bit the velocity of SGD without any decay ...
    chex.assert_trees_all_equal(dec_state[1].trace, plain_state[1].trace)
    # ... while the coupled penalty's gradient rate*p is traced into it.
    assert np.max(np.abs(cou_state[1].trace["kernel"] - plain_state[1].trace["kernel"])) > 1e-2

    # Predicted paths: decoupled p' = p + v - lr*rate*p; coupled v = m*v - lr*(g + rate*p).
    grads = [{k: g[t].astype(np.float64) for k, g in _FIXED_GRADS.items()} for t in range(30)]
    p_dec = {k: v.astype(np.float64) for k, v in _P0.items()}
    p_cou = dict(p_dec)
    v_dec = {k: np.zeros_like(v) for k, v in p_dec.items()}
    v_cou = dict(v_dec)
    for g in grads:
        for k in p_dec:
            v_dec[k] = momentum * v_dec[k] - lr * g[k]
            p_dec[k] = p_dec[k] + v_dec[k] - lr * rate * p_dec[k]
            v_cou[k] = momentum * v_cou[k] - lr * (g[k] + rate * p_cou[k])
            p_cou[k] = p_cou[k] + v_cou[k]
    chex.assert_trees_all_close(decoupled, p_dec, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(coupled, p_cou, atol=1e-5, rtol=1e-5)
    assert np.max(np.abs(decoupled["kernel"] - coupled["kernel"])) > 1e-2


def test_decoupled_equals_coupled_without_momentum():
    """With plain SGD both are p <- p*(1 - lr*rate) - lr*g: the same step."""
    rate = 0.5

    def coupled_grads(params, t):
        return jax.grad(lambda p: _loss(p) + l2_penalty(p, rate))(params)

    coupled, _ = _run(sgd(0.1), 30, grad_fn=coupled_grads)
    decoupled, _ = _run(sgd(0.1, weight_decay=rate), 30, grad_fn=_grad_fn_from_loss)
    chex.assert_trees_all_close(decoupled, coupled, atol=1e-6, rtol=1e-6)
    assert np.max(np.abs(decoupled["kernel"] - _run(sgd(0.1), 30)[0]["kernel"])) > 1e-2


def test_decoupled_weight_decay_with_zero_gradient_is_geometric():
    params = {"kernel": jnp.asarray([[1.0, -2.0], [0.5, 4.0]])}
    schedule = inverse_time_decay(0.1, 1e-2)
    tx = sgd(schedule, momentum=0.9, weight_decay=0.5)
    out, state = _run(tx, 20, params=params, grad_fn=lambda p, t: jax.tree.map(jnp.zeros_like, p))
    factor = np.prod([1 - 0.1 / (1 + 1e-2 * t) * 0.5 for t in range(20)])
    np.testing.assert_allclose(out["kernel"], params["kernel"] * factor, rtol=1e-6)
    np.testing.assert_array_equal(state[1].trace["kernel"], 0.0)


# ---------------------------------------------------------------------------------------------
# L1 proximal step


def _apply(tx, updates, params, state=None):
    state = tx.init(params) if state is None else state
    new_updates, state = tx.update(updates, state, params)
    return optax.apply_updates(params, new_updates), state


def test_l1_proximal_hand_made_soft_threshold():
    # lr * strength = 0.25; every number is dyadic, so the float result is exact.
    p = jnp.asarray([1.0, -1.0, 0.25, -0.25, 0.0, 2.0, -3.0])
    u = jnp.asarray([-0.5, 0.5, 0.0, 0.125, 0.0625, 0.5, 0.0])
    expected = np.asarray([0.25, -0.25, 0.0, 0.0, 0.0, 2.25, -2.75], np.float32)
    new, _ = _apply(l1_proximal(0.5, 0.5, mask=True), u, p)
    np.testing.assert_array_equal(new, expected)
    zeros = np.asarray(new) == 0.0
    assert zeros.sum() == 3 and not np.any(np.signbit(np.asarray(new)[zeros]))  # +0.0


def test_l1_proximal_gives_exact_zeros_at_every_scale():
    key_p, key_u = jax.random.split(jax.random.key(0))
    scales = 10.0 ** jnp.arange(-6, 4, dtype=jnp.float32)  # weights from 1e-6 to 1e3
    p = (jax.random.normal(key_p, (10, 1000)) * scales[:, None]).reshape(-1)
    u = (jax.random.normal(key_u, (10, 1000)) * scales[:, None] * 0.5).reshape(-1)
    threshold = 0.5 * 4.0 * 1e-2  # lr * strength = 2e-2
    new, _ = jax.jit(lambda u, p: _apply(l1_proximal(4.0 * 1e-2, 0.5, mask=True), u, p))(u, p)
    new = np.asarray(new)
    x = np.asarray(p + u)  # the same float32 sum the transform makes
    target = np.where(
        np.abs(x) - np.float32(threshold) > 0, np.sign(x) * (np.abs(x) - threshold), 0
    )
    thresholded = target == 0
    assert 1000 < thresholded.sum() < 9000
    assert np.all(new[thresholded] == 0.0)
    # Survivors: the proximal point up to one rounding of p; bit-exact where the subtraction
    # target - p is exact (Sterbenz: target within a factor 2 of p).
    spacing = np.spacing(np.maximum(np.abs(np.asarray(p)), np.abs(target)).astype(np.float32))
    assert np.all(np.abs(new - target) <= spacing)
    sterbenz = (~thresholded) & (target / np.asarray(p) >= 0.5) & (target / np.asarray(p) <= 2)
    assert sterbenz.sum() > 1000
    np.testing.assert_array_equal(new[sterbenz], target[sterbenz].astype(np.float32))


def test_l1_proximal_in_sgd_matches_numpy_and_is_sparse():
    tx = sgd(inverse_time_decay(0.05, 1e-2), momentum=0.9, nesterov=True, l1=2.0)
    params, _ = _run(tx, 50, grad_fn=_grad_fn_from_loss)
    expected, _ = _keras_sgd_numpy(50, lr=0.05, decay=1e-2, momentum=0.9, nesterov=True, l1=2.0)
    chex.assert_trees_all_close(params, expected, atol=1e-6, rtol=1e-6)
    zeros = np.asarray(params["kernel"]) == 0.0
    np.testing.assert_array_equal(zeros, expected["kernel"] == 0.0)
    assert zeros.any()


def test_l1_subgradient_gives_no_exact_zeros():
    def penalised(params, t):
        return jax.grad(lambda p: _loss(p) + l1_penalty(p, 2.0))(params)

    params, _ = _run(
        sgd(inverse_time_decay(0.05, 1e-2), momentum=0.9, nesterov=True), 50, grad_fn=penalised
    )
    assert not np.any(np.asarray(params["kernel"]) == 0.0)


# ---------------------------------------------------------------------------------------------
# Masks


_MASKS = {
    "default_kernels": (None, {"kernel": True, "bias": False}),
    "true_all": (True, {"kernel": True, "bias": True}),
    "pytree": ({"kernel": False, "bias": True}, {"kernel": False, "bias": True}),
    "callable": (lambda p: jax.tree.map(lambda x: x.ndim == 1, p), {"kernel": False, "bias": True}),
}


@functools.cache
def _unregularised_run():
    return _run(sgd(0.1, momentum=0.9), 10, grad_fn=_fixed_grads)[0]


@pytest.mark.parametrize("name", list(_MASKS))
@pytest.mark.parametrize(
    "factory",
    [
        lambda mask: sgd(0.1, momentum=0.9, l1=0.5, l1_mask=mask),
        lambda mask: sgd(0.1, momentum=0.9, weight_decay=0.5, weight_decay_mask=mask),
    ],
    ids=["l1_proximal", "decoupled_weight_decay"],
)
def test_masks_leave_masked_leaves_bit_exact(factory, name):
    mask, touched = _MASKS[name]
    # Gradients independent of the weights: a leaf's path depends on its own mask alone.
    with_reg, _ = _run(factory(mask), 10, grad_fn=_fixed_grads)
    without = _unregularised_run()
    for leaf, on in touched.items():
        if on:
            assert not np.array_equal(with_reg[leaf], without[leaf]), leaf
        else:
            np.testing.assert_array_equal(with_reg[leaf], without[leaf])


def test_kernel_mask_picks_kernels():
    params = {
        "Conv_0": {"kernel": jnp.zeros((3, 3, 1, 4)), "bias": jnp.zeros(4)},
        "Dense_0": {"kernel": jnp.zeros((1, 3)), "bias": jnp.zeros(3)},
        "linear": {"kernel": jnp.zeros(5), "scale": jnp.zeros(5)},
        "embedding": jnp.zeros((10, 2)),
    }
    assert kernel_mask(params) == {
        "Conv_0": {"kernel": True, "bias": False},
        "Dense_0": {"kernel": True, "bias": False},
        "linear": {"kernel": True, "scale": False},
        "embedding": True,
    }


# ---------------------------------------------------------------------------------------------
# Penalties and the sparsity report


def test_penalties_hand_values():
    params = {"kernel": jnp.asarray([[1.0, -2.0], [3.0, -4.0]]), "bias": jnp.asarray([10.0])}
    assert float(l2_penalty(params, 0.5)) == 0.5 * 0.5 * 30.0
    assert float(l2_penalty(params, 0.5, mask=True)) == 0.5 * 0.5 * 130.0
    assert float(l1_penalty(params, 0.5)) == 0.5 * 10.0
    assert float(l1_penalty(params, 0.5, mask={"kernel": False, "bias": True})) == 5.0
    assert float(l1_penalty(params, 0.5, mask=False)) == 0.0


def test_sparsity_per_leaf():
    params = {
        "Dense_0": {"kernel": jnp.asarray([[0.0, 1.0], [0.0, -0.0]]), "bias": jnp.zeros(3)},
        "Dense_1": {"kernel": jnp.asarray([1e-30, 2.0])},
    }
    assert sparsity(params) == {"Dense_0/bias": 1.0, "Dense_0/kernel": 0.75, "Dense_1/kernel": 0.0}


# ---------------------------------------------------------------------------------------------
# Every transform: nested pytrees, jit == no jit, vmap over a hyperparameter == separate runs

_TRANSFORMS = {
    "sgd": lambda h: sgd(h),
    "sgd_momentum": lambda h: sgd(h, momentum=0.9),
    "sgd_nesterov_decay": lambda h: sgd(inverse_time_decay(h, 1e-2), momentum=0.9, nesterov=True),
    "sgd_elastic_net": lambda h: sgd(0.1, momentum=0.5, weight_decay=h, l1=h),
    "decoupled_weight_decay": lambda h: optax.chain(sgd(0.1), add_decoupled_weight_decay(h, 0.1)),
    "decoupled_weight_decay_schedule": lambda h: optax.chain(
        sgd(inverse_time_decay(h, 1e-1)),
        add_decoupled_weight_decay(0.5, inverse_time_decay(h, 1e-1), mask=True),
    ),
    "l1_proximal": lambda h: optax.chain(sgd(0.1), l1_proximal(h, 0.1)),
    "l1_proximal_schedule": lambda h: optax.chain(
        sgd(inverse_time_decay(h, 1e-1)),
        l1_proximal(0.5, inverse_time_decay(h, 1e-1), mask=True),
    ),
}
_HYPER = (0.05, 0.1, 0.2)


def _nested_params():
    keys = jax.random.split(jax.random.key(3), 5)
    return {
        "encoder": [
            {
                "kernel": jax.random.normal(keys[0], (3, 4)),
                "bias": jax.random.normal(keys[1], (4,)),
            },
            {"kernel": jax.random.normal(keys[2], (4, 2))},
        ],
        "head": (jax.random.normal(keys[3], (2, 2)), jax.random.normal(keys[4], (2,))),
    }


def _nested_loss(params):
    leaves = jax.tree.leaves(params)
    return sum(jnp.sum(0.25 * jnp.sin(3.0 * p) + 0.5 * (p - 1.0) ** 2) for p in leaves)


def _steps(tx, params, steps=4):
    state = tx.init(params)
    for _ in range(steps):
        updates, state = tx.update(jax.grad(_nested_loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("name", list(_TRANSFORMS))
def test_every_transform_nested_jit_and_vmap(name):
    factory = _TRANSFORMS[name]
    params = _nested_params()
    eager = _steps(factory(0.1), params)
    chex.assert_trees_all_equal_shapes_and_dtypes(eager, params)
    assert not np.array_equal(eager["encoder"][0]["kernel"], params["encoder"][0]["kernel"])
    jitted = jax.jit(lambda p: _steps(factory(0.1), p))(params)
    chex.assert_trees_all_close(jitted, eager, atol=1e-6, rtol=1e-6)

    hypers = jnp.asarray(_HYPER)
    vmapped = jax.jit(jax.vmap(lambda h: _steps(factory(h), params)))(hypers)
    for i, h in enumerate(_HYPER):
        separate = _steps(factory(h), params)
        chex.assert_trees_all_close(jax.tree.map(lambda x, i=i: x[i], vmapped), separate, atol=1e-6)


def test_sgd_vmapped_over_learning_rates_via_inject_hyperparams():
    """One transform, the learning rate in its state: a batch of states trains 3 models."""
    tx = optax.inject_hyperparams(sgd)(learning_rate=0.0, momentum=0.9, nesterov=True, l1=0.01)
    params = jax.tree.map(jnp.asarray, _P0)
    lrs = jnp.asarray([0.01, 0.05, 0.1])

    def init(lr):
        state = tx.init(params)
        state.hyperparams["learning_rate"] = lr
        return params, state

    @jax.jit
    @jax.vmap
    def step(params, state):
        updates, state = tx.update(jax.grad(_loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    batch = jax.vmap(init)(lrs)
    for _ in range(50):
        batch = step(*batch)
    for i, lr in enumerate([0.01, 0.05, 0.1]):
        separate, _ = _run(
            sgd(lr, momentum=0.9, nesterov=True, l1=0.01), 50, grad_fn=_grad_fn_from_loss
        )
        chex.assert_trees_all_close(
            jax.tree.map(lambda x, i=i: x[i], batch[0]), separate, atol=1e-6
        )


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: sgd(0.1, momentum=1.0), "momentum must be in"),
        (lambda: sgd(0.1, momentum=-0.5), "momentum must be finite and >= 0"),
        (lambda: sgd(-0.1), "learning_rate must be"),
        (lambda: sgd(0.1, weight_decay=-1e-4), "rate must be"),
        (lambda: l1_proximal(-1.0, 0.1), "strength must be"),
        (lambda: inverse_time_decay(0.1, -1e-6), "decay must be"),
        (lambda: l2_penalty({"w": jnp.ones(2)}, float("nan")), "rate must be finite"),
    ],
)
def test_bad_hyperparameters_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("tx", [l1_proximal(0.1, 0.1), add_decoupled_weight_decay(0.1, 0.1)])
def test_update_without_params_says_how_to_call(tx):
    params = {"kernel": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match=r"tx.update\(grads, opt_state, params\)"):
        tx.update(params, tx.init(params))


def _converge(tx, steps=3000):
    def step_fn(_, carry):
        params, state = carry
        updates, state = tx.update(jax.grad(_loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    params = jax.tree.map(jnp.asarray, _P0)
    return jax.jit(lambda p: jax.lax.fori_loop(0, steps, step_fn, (p, tx.init(p)))[0])(params)


def test_momentum_scales_the_stationary_strength_by_one_minus_momentum():
    """Velocity amplifies gradient steps by 1/(1-m), not the prox/decay: l1/(1-m) matches."""
    ista = _converge(sgd(0.05, l1=0.5, weight_decay=0.2))
    heavy_ball = _converge(sgd(0.05, momentum=0.9, l1=0.5 / 0.1, weight_decay=0.2 / 0.1))
    chex.assert_trees_all_close(heavy_ball, ista, atol=1e-5)
    assert np.any(np.asarray(ista["kernel"]) == 0.0)
    np.testing.assert_array_equal(heavy_ball["kernel"] == 0.0, ista["kernel"] == 0.0)
    unmatched = _converge(sgd(0.05, momentum=0.9, l1=0.5, weight_decay=0.2))
    assert np.max(np.abs(unmatched["kernel"] - ista["kernel"])) > 1e-2
