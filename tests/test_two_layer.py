"""The seed's two-layer net: hand backprop == jax.grad, golden numbers, many nets at once."""

import dataclasses
import importlib
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from experiments import two_layer_sigmoid as exp
from jaxnets.models import mlp, two_layer_many
from jaxnets.models.mlp import (
    TwoLayerSigmoid,
    sum_squared_error,
    two_layer_forward,
    two_layer_manual_grads,
    two_layer_params_from_flax,
    two_layer_params_to_flax,
)
from jaxnets.models.two_layer_many import two_layer_train_many
from jaxnets.runs.config import parse_config

# Newer jax has jax.enable_x64; 0.7.2 (the Colab stack) only jax.experimental's.
enable_x64 = (
    jax.enable_x64
    if hasattr(jax, "enable_x64")
    else importlib.import_module("jax.experimental").enable_x64
)

# SEEDS.md section 1 / PERF-NOTES.md: np.random.seed(1), W1 = rand(3,4), W2 = rand(4,1), 1500 steps.
GOLDEN_LOSS = 0.0033558
GOLDEN_PREDICTIONS = [0.0097, 0.9689, 0.9689, 0.0365]


def _random_params(seed, d_in, hidden, out, *, bias, nets=None, dtype=np.float32):
    """Normal(0, 1) params of one net, or of `nets` nets (leading axis) when given."""
    rng = np.random.RandomState(seed)
    lead = () if nets is None else (nets,)
    shapes = {"w1": (d_in, hidden), "w2": (hidden, out)}
    if bias:
        shapes.update(b1=(hidden,), b2=(out,))
    return {k: jnp.asarray(rng.standard_normal(lead + v).astype(dtype)) for k, v in shapes.items()}


def _net(tree, index):
    return jax.tree.map(lambda v: v[index], tree)


def _reference_train(params, x, y, iterations, learning_rate):
    """Plain gradient descent with jax.grad: the reference the fast path must equal."""

    def body(_, p):
        grads = jax.grad(sum_squared_error)(p, x, y)
        return jax.tree.map(lambda w, g: w - learning_rate * g, p, grads)

    return lax.fori_loop(0, iterations, body, params)


_jax_grad = jax.jit(jax.grad(sum_squared_error))


def _tutorial_numpy(iterations):
    """The tutorial's numpy loop, float64, verbatim (W += dW with the negative gradient)."""
    state = np.random.get_state()
    np.random.seed(1)
    w1, w2 = np.random.rand(3, 4), np.random.rand(4, 1)
    np.random.set_state(state)
    x, y = exp.X.astype(np.float64), exp.Y.astype(np.float64)
    sigmoid = lambda z: 1.0 / (1.0 + np.exp(-z))
    for _ in range(iterations):
        layer1 = sigmoid(x @ w1)
        out = sigmoid(layer1 @ w2)
        d_w2 = layer1.T @ (2 * (y - out) * out * (1 - out))
        d_w1 = x.T @ (((2 * (y - out) * out * (1 - out)) @ w2.T) * layer1 * (1 - layer1))
        w1, w2 = w1 + d_w1, w2 + d_w2
    out = sigmoid(sigmoid(x @ w1) @ w2)
    return np.sum((y - out) ** 2), out[:, 0]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    "shape,bias", [((3, 4, 1), False), ((3, 4, 1), True), ((5, 7, 2), True)], ids=str
)
def test_manual_grads_equal_jax_grad(seed, shape, bias):
    params = _random_params(seed, *shape, bias=bias)
    rng = np.random.RandomState(100 + seed)
    x = rng.standard_normal((6, shape[0])).astype(np.float32)
    y = rng.rand(6, shape[2]).astype(np.float32)
    manual = jax.jit(two_layer_manual_grads)(params, x, y)
    chex.assert_trees_all_close(manual, _jax_grad(params, x, y), atol=1e-6)


def test_manual_grads_are_minus_the_tutorial_update():
    """The tutorial's d_w1, d_w2 (added to W) are exactly minus our gradient."""
    params = {"w1": jnp.asarray(np.random.RandomState(0).rand(3, 4), jnp.float32)}
    params["w2"] = jnp.asarray(np.random.RandomState(1).rand(4, 1), jnp.float32)
    x, y = jnp.asarray(exp.X), jnp.asarray(exp.Y)
    layer1 = jax.nn.sigmoid(x @ params["w1"])
    out = jax.nn.sigmoid(layer1 @ params["w2"])
    d_w2 = layer1.T @ (2 * (y - out) * out * (1 - out))
    d_w1 = x.T @ (((2 * (y - out) * out * (1 - out)) @ params["w2"].T) * layer1 * (1 - layer1))
    grads = two_layer_manual_grads(params, x, y)
    np.testing.assert_allclose(grads["w1"], -d_w1, atol=1e-7)
    np.testing.assert_allclose(grads["w2"], -d_w2, atol=1e-7)


@pytest.mark.parametrize("use_bias,count", [(False, 3 * 4 + 4 * 1), (True, 3 * 4 + 4 + 4 * 1 + 1)])
def test_flax_module_equals_pure_functions(use_bias, count):
    model = TwoLayerSigmoid(use_bias=use_bias, bias_init=jax.nn.initializers.normal(1.0))
    variables = model.init(jax.random.key(0), jnp.zeros((1, 3)))
    assert sum(v.size for v in jax.tree.leaves(variables)) == count
    params = two_layer_params_from_flax(variables)
    assert set(params) == ({"w1", "w2", "b1", "b2"} if use_bias else {"w1", "w2"})
    chex.assert_trees_all_equal(two_layer_params_to_flax(params), variables)
    x = jax.random.normal(jax.random.key(1), (5, 3))
    np.testing.assert_allclose(model.apply(variables, x), two_layer_forward(params, x), atol=1e-6)
    w = np.concatenate([np.ravel(params["w1"]), np.ravel(params["w2"])])
    assert np.all((w >= 0) & (w < 1)) and w.std() > 0.1  # uniform_01, the seed's rand()


def test_numpy_init_is_the_tutorials_draw():
    params = exp.init_params(exp.Config(nets=2))
    state = np.random.get_state()
    np.random.seed(1)
    draws = [(np.random.rand(3, 4), np.random.rand(4, 1)) for _ in range(2)]
    np.random.set_state(state)
    for net, (w1, w2) in enumerate(draws):
        np.testing.assert_array_equal(params["w1"][net], w1.astype(np.float32))
        np.testing.assert_array_equal(params["w2"][net], w2.astype(np.float32))


def test_seed_golden_monotone_and_checked(tmp_path):
    results = exp.main(exp.Config(check=True, workdir=str(tmp_path)))
    np.testing.assert_allclose(results["final_loss"], GOLDEN_LOSS, rtol=1e-4)
    np.testing.assert_allclose(results["predictions"], GOLDEN_PREDICTIONS, atol=1e-4)
    loss64, predictions64 = _tutorial_numpy(1500)
    np.testing.assert_allclose(results["final_loss"], loss64, rtol=1e-4)
    np.testing.assert_allclose(results["predictions"], predictions64, atol=1e-5)
    assert results["max_grad_error"] < exp.GRAD_TOLERANCE
    assert results["monotone"] is True
    params = _net(exp.init_params(exp.Config()), 0)
    _, losses, _ = exp.train_one(exp.Config(), params)
    assert np.all(np.diff(np.asarray(losses)) <= 0)
    assert losses[0] > 1.0 > 0.01 > losses[-1]


def test_check_names_the_first_wrong_iteration(tmp_path, monkeypatch):
    config = exp.Config(iterations=400, check=True, workdir=str(tmp_path))
    params = _net(exp.init_params(config), 0)
    _, losses, _ = exp.train_one(dataclasses.replace(config, check=False), params)
    first = int(np.argmax(np.asarray(losses) < 0.5))
    assert 0 < first < 400

    def wrong_below_half(params, x, y):  # correct until the loss drops below 0.5
        grads = two_layer_manual_grads(params, x, y)
        bump = jnp.where(sum_squared_error(params, x, y) < 0.5, 1e-2, 0.0)
        return {k: g + bump for k, g in grads.items()}

    # The step's gradient is the custom VJP's, which calls the module's hand backprop.
    monkeypatch.setattr(mlp, "two_layer_manual_grads", wrong_below_half)
    with pytest.raises(RuntimeError, match=f"^iteration {first}: the hand-written backprop"):
        exp.main(config)


def test_train_many_one_step_equals_vmapped_jax_grad():
    params = exp.init_params(exp.Config(nets=10_000))
    fast, loss = two_layer_train_many(params, exp.X, exp.Y, iterations=1, learning_rate=1.0)
    reference = jax.vmap(_reference_train, in_axes=(0, None, None, None, None))(
        params, exp.X, exp.Y, 1, 1.0
    )
    chex.assert_trees_all_close(fast, reference, atol=1e-6)
    expected = jax.vmap(sum_squared_error, in_axes=(0, None, None))(reference, exp.X, exp.Y)
    np.testing.assert_allclose(loss, expected, atol=1e-6)


@pytest.mark.slow
def test_train_many_10000_nets_equals_a_python_loop_over_three():
    # float64: over 1500 steps of lr 1 a few nets are chaotic, and float32 rounding differences
    # between two evaluation orders grow to O(0.1) on them.
    with enable_x64(True):
        x, y = exp.X.astype(np.float64), exp.Y.astype(np.float64)
        draws = np.random.RandomState(1).rand(10_000, 16)
        params = {"w1": draws[:, :12].reshape(-1, 3, 4), "w2": draws[:, 12:].reshape(-1, 4, 1)}
        params = jax.tree.map(jnp.asarray, params)
        fast, loss = two_layer_train_many(params, x, y, iterations=1500, learning_rate=1.0)
        assert fast["w1"].dtype == jnp.float64 and loss.shape == (10_000,)
        train = jax.jit(_reference_train, static_argnums=(3,))
        for net in (0, 4321, 9999):
            one = _net(params, net)
            expected = train(one, x, y, 1500, 1.0)
            chex.assert_trees_all_close(_net(fast, net), expected, atol=1e-5)
            np.testing.assert_allclose(loss[net], sum_squared_error(expected, x, y), atol=1e-7)
        np.testing.assert_allclose(loss[0], _tutorial_numpy(1500)[0], rtol=1e-9)


def test_train_many_biases_padding_and_no_recompile():
    # 10 nets in chunks of 4: three chunks, two padded nets; biases and a 5-3-2 shape.
    with enable_x64(True):
        params = _random_params(3, 5, 3, 2, bias=True, nets=10, dtype=np.float64)
        rng = np.random.RandomState(4)
        x, y = rng.standard_normal((6, 5)), rng.rand(6, 2)
        fast, loss = two_layer_many._train_many(params, x, y, 0.5, iterations=20, nets_per_chunk=4)
        reference = jax.vmap(_reference_train, in_axes=(0, None, None, None, None))(
            params, x, y, 20, 0.5
        )
        chex.assert_trees_all_close(fast, reference, atol=1e-10)
        expected = jax.vmap(sum_squared_error, in_axes=(0, None, None))(reference, x, y)
        np.testing.assert_allclose(loss, expected, atol=1e-10)
        public, public_loss = two_layer_train_many(params, x, y, iterations=20, learning_rate=0.5)
        chex.assert_trees_all_close(public, reference, atol=1e-10)
        compiled = two_layer_many._train_many._cache_size()
        two_layer_train_many(params, x, y, iterations=20, learning_rate=0.25)
        assert two_layer_many._train_many._cache_size() == compiled


def test_train_many_512_bit_vectors_equal_the_default_and_work_inside_a_jit():
    # The CPU path compiles with 512-bit vectors; inside a user's jit the outer compilation
    # decides (JAX refuses compiler options on a nested jit). Equal to float rounding (FMA
    # contraction differs between vector widths).
    params = _random_params(5, 3, 4, 1, bias=False, nets=300)
    x, y = exp.X, exp.Y
    wide, wide_loss = two_layer_train_many(params, x, y, iterations=50, learning_rate=1.0)
    plain, plain_loss = two_layer_many._train_many_any(params, x, y, 1.0, iterations=50)
    nested = jax.jit(lambda p: two_layer_train_many(p, x, y, iterations=50, learning_rate=1.0))(
        params
    )
    for other, other_loss in ((plain, plain_loss), nested):
        chex.assert_trees_all_close(wide, other, atol=1e-5)
        np.testing.assert_allclose(wide_loss, other_loss, atol=1e-6)


def test_train_many_params_sharded_over_devices_equal_one_device():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("nets",))
    params = _random_params(6, 3, 4, 1, bias=True, nets=10)
    one, one_loss = two_layer_train_many(params, exp.X, exp.Y, iterations=30, learning_rate=1.0)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("nets"))
    two, two_loss = two_layer_train_many(
        jax.device_put(params, sharding), exp.X, exp.Y, iterations=30, learning_rate=1.0
    )
    assert two["w1"].sharding == sharding and two_loss.sharding == sharding
    chex.assert_trees_all_close(two, one, atol=1e-5)
    np.testing.assert_allclose(two_loss, one_loss, atol=1e-6)


def test_train_many_rejects_bad_shapes():
    params = exp.init_params(exp.Config(nets=2))
    with pytest.raises(ValueError, match=r"w1 \[nets, d_in, hidden\].*got w1 \(3, 4\)"):
        two_layer_train_many(_net(params, 0), exp.X, exp.Y, iterations=1, learning_rate=1.0)
    with pytest.raises(ValueError, match=r"x must be \[samples, d_in=3\], got shape \(4, 2\)"):
        two_layer_train_many(params, exp.X[:, :2], exp.Y, iterations=1, learning_rate=1.0)
    with pytest.raises(ValueError, match="two_layer_params_from_flax"):
        two_layer_train_many({"kernel": params["w1"]}, exp.X, exp.Y, iterations=1, learning_rate=1)


def test_main_smoke_writes_plots_and_summary(tmp_path):
    config = parse_config(
        exp.get_config(),
        ["--iterations", "30", "--nets", "64", "--init", "jax", "--workdir", str(tmp_path)],
    )
    results = exp.main(config)
    for name in ("loss.png", "final_loss_hist.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG"), name
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == json.loads(json.dumps(results))
    assert summary["config"]["nets"] == 64 and summary["config"]["init"] == "jax"
    assert summary["nets"]["count"] == 64
    all_params = exp.init_params(config)
    reference = jax.vmap(_reference_train, in_axes=(0, None, None, None, None))(
        all_params, exp.X, exp.Y, 30, 1.0
    )
    losses = jax.vmap(sum_squared_error, in_axes=(0, None, None))(reference, exp.X, exp.Y)
    assert summary["nets"]["reached_threshold"] == int(np.sum(np.asarray(losses) < 0.01))
    np.testing.assert_allclose(summary["nets"]["final_loss_median"], np.median(losses), rtol=1e-5)
    np.testing.assert_allclose(summary["nets"]["net0_final_loss"], results["final_loss"], rtol=1e-5)
    params = _net(exp.init_params(config), 0)
    trained = _reference_train(params, exp.X, exp.Y, 30, 1.0)
    np.testing.assert_allclose(
        results["final_loss"], sum_squared_error(trained, exp.X, exp.Y), rtol=1e-5
    )


def test_config_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="^--init torch: must be one of 'numpy', 'jax'$"):
        exp.Config(init="torch", workdir=str(tmp_path))
    with pytest.raises(ValueError, match="^--nets 0: must be an int >= 1$"):
        dataclasses.replace(exp.get_config(), nets=0, workdir=str(tmp_path))
    with pytest.raises(ValueError, match="^--nets 3 does not split over 2 devices; use --nets 4"):
        exp.main(dataclasses.replace(exp.get_config(), nets=3, devices=2, workdir=str(tmp_path)))
    assert not (tmp_path / "loss.png").exists()  # refused before the seed net trained


@pytest.mark.parametrize("devices", [8, 2])
def test_nets_split_over_devices_equal_one_device(devices):
    """--nets N --devices D: each net's result does not depend on where it was trained."""
    config = dataclasses.replace(exp.get_config(), nets=16, iterations=50, init="jax")
    params = exp.init_params(config)
    x, y = jnp.asarray(exp.X), jnp.asarray(exp.Y)
    one = exp.make_train_many_on_devices(dataclasses.replace(config, devices=1))
    many = exp.make_train_many_on_devices(dataclasses.replace(config, devices=devices))
    (p1, loss1), (pn, lossn) = one(params, x, y), many(params, x, y)
    assert np.asarray(lossn).shape == (16,)
    np.testing.assert_allclose(np.asarray(lossn), np.asarray(loss1), rtol=1e-6)
    for k in p1:
        np.testing.assert_allclose(np.asarray(pn[k]), np.asarray(p1[k]), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="--nets 16 does not split over 3 devices"):
        exp.make_train_many_on_devices(dataclasses.replace(config, devices=3))
