"""Models: one contract checked for every model, then the CNN's own facts."""

import dataclasses
import functools
import math
from collections.abc import Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnets import losses
from jaxnets.models import MnistCNN, TwoLayerSigmoid, ValidConv, native_conv


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """What every model must satisfy: add one entry per model to MODELS."""

    name: str
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # one example, no batch axis
    output_shape: tuple[int, ...]  # one example, no batch axis
    num_params: int  # pinned
    intermediates: dict[str, tuple[int, ...]]  # sown name -> shape of one example


CNN_INTERMEDIATES = {
    "conv1_tanh": (24, 24, 4),
    "pool1": (11, 11, 8),
    "pool2": (4, 4, 16),
    "flatten": (256,),
    "dense1_tanh": (128,),
}
MODELS = [
    ModelCase("mnist_cnn", MnistCNN, (28, 28, 1), (10,), 35_754, CNN_INTERMEDIATES),
    *(
        ModelCase(
            f"mnist_cnn_{impl}",
            functools.partial(MnistCNN, conv_impl=impl),
            (28, 28, 1),
            (10,),
            35_754,
            CNN_INTERMEDIATES,
        )
        for impl in ("im2col", "xla")
    ),
    ModelCase("two_layer_sigmoid", TwoLayerSigmoid, (3,), (1,), 3 * 4 + 4 * 1, {}),
]
BATCH = 3


def _inputs(case, seed=0, batch=BATCH):
    return jax.random.uniform(jax.random.key(seed), (batch, *case.input_shape))


# Compiling an init takes seconds on XLA:CPU (threefry): one jitted init per model, reused.
_INITS, _PARAMS = {}, {}


def _fresh_init(case, seed):
    if case.name not in _INITS:
        _INITS[case.name] = jax.jit(case.make().init)
    return _INITS[case.name](jax.random.key(seed), _inputs(case))["params"]


def _init(case, seed=0):
    """Parameters for (case, seed), initialised once per test session (compiling is slow)."""
    if (case.name, seed) not in _PARAMS:
        _PARAMS[case.name, seed] = _fresh_init(case, seed)
    return _PARAMS[case.name, seed]


@pytest.fixture(params=MODELS, ids=lambda case: case.name)
def case(request):
    return request.param


def test_parameter_count(case):
    params = jax.eval_shape(case.make().init, jax.random.key(0), _inputs(case))["params"]
    assert sum(math.prod(p.shape) for p in jax.tree.leaves(params)) == case.num_params


def test_output_and_intermediate_shapes_and_finite(case):
    model, params = case.make(), _init(case)
    logits, state = model.apply(
        {"params": params}, _inputs(case, seed=1), mutable=["intermediates"]
    )
    assert logits.shape == (BATCH, *case.output_shape) and logits.dtype == jnp.float32
    assert np.isfinite(logits).all()
    shapes = {name: value[0].shape for name, value in state.get("intermediates", {}).items()}
    assert shapes == {name: (BATCH, *shape) for name, shape in case.intermediates.items()}


def test_init_is_a_function_of_the_key(case):
    chex.assert_trees_all_equal(_fresh_init(case, 5), _fresh_init(case, 5))
    first, other = jax.tree.leaves(_init(case)), jax.tree.leaves(_fresh_init(case, 5))
    assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_jit_matches_eager(case):
    model, params = case.make(), _init(case)
    x = _inputs(case, seed=2)
    eager = model.apply({"params": params}, x)
    jitted = jax.jit(model.apply)({"params": params}, x)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)


# The MNIST CNN's own facts.
def test_cnn_initialisers_are_keras1():
    params = _init(MODELS[0], seed=0)
    for name, (k, cin, cout) in {
        "conv1": (5, 1, 4),
        "conv2": (3, 4, 8),
        "conv3": (3, 8, 16),
    }.items():
        kernel = params[name]["kernel"]
        assert kernel.shape == (k, k, cin, cout)  # HWIO
        limit = math.sqrt(6 / (k * k * cin + k * k * cout))  # glorot_uniform
        assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.8 * limit
        np.testing.assert_allclose(np.var(kernel), limit**2 / 3, rtol=0.35)
        np.testing.assert_array_equal(params[name]["bias"], 0.0)
    dense = np.concatenate([params["dense1"]["kernel"].ravel(), params["dense2"]["kernel"].ravel()])
    np.testing.assert_allclose(dense.std(), 0.05, rtol=0.02)  # init='normal' in Keras 1
    assert abs(dense.mean()) < 1e-3
    np.testing.assert_array_equal(params["dense1"]["bias"], 0.0)


def test_cnn_rejects_bad_images_with_the_fix():
    model, params = MnistCNN(), _init(MODELS[0])
    with pytest.raises(ValueError, match=r"uint8.*astype\(jnp.float32\) / 255"):
        model.apply({"params": params}, jnp.zeros((2, 28, 28, 1), jnp.uint8))
    with pytest.raises(ValueError, match=r"\(2, 28, 28\).*images\[\.\.\., None\]"):
        model.apply({"params": params}, jnp.zeros((2, 28, 28)))
    with pytest.raises(ValueError, match="conv_impl='fft'"):
        MnistCNN(conv_impl="fft").apply({"params": params}, jnp.zeros((2, 28, 28, 1)))


def _loss_fn(model, images, labels):
    def loss_fn(params):
        logits = model.apply({"params": params}, images)
        return losses.softmax_cross_entropy(logits, labels)

    return loss_fn


@pytest.mark.parametrize("impl", ["im2col", "native"])
@pytest.mark.parametrize("image_kind", ["uniform", "digit_like"])
def test_cpu_impls_match_xla_in_values_and_gradients(impl, image_kind):
    if impl == "native" and not native_conv.available():
        pytest.skip(native_conv.unavailable_reason())
    key_x, key_y = jax.random.split(jax.random.key(7))
    images = jax.random.uniform(key_x, (8, 28, 28, 1))
    if image_kind == "digit_like":
        # Flat zero background, like MNIST: many tied maxima in the pools.
        images = jnp.where(images > 0.7, images, 0.0).at[:, :4].set(0.0)
    labels = jax.random.randint(key_y, (8,), 0, 10)
    xla, im2col = MnistCNN(conv_impl="xla"), MnistCNN(conv_impl=impl)
    params = _init(MODELS[0])
    # The same parameter tree, and the same initial values for the same key.
    chex.assert_trees_all_equal(params, _init(MODELS[1]), _init(MODELS[2]))
    np.testing.assert_allclose(
        im2col.apply({"params": params}, images),
        xla.apply({"params": params}, images),
        rtol=1e-5,
        atol=1e-5,
    )
    value_xla, grad_xla = jax.jit(jax.value_and_grad(_loss_fn(xla, images, labels)))(params)
    value_i2c, grad_i2c = jax.jit(jax.value_and_grad(_loss_fn(im2col, images, labels)))(params)
    np.testing.assert_allclose(value_i2c, value_xla, rtol=1e-5)
    chex.assert_trees_all_close(grad_i2c, grad_xla, rtol=1e-5, atol=1e-5)


def _numpy_valid_conv(x, kernel, bias):
    """Direct NHWC valid convolution (cross-correlation, as lax.conv and Keras)."""
    kh, kw, _, cout = kernel.shape
    b, h, w, _ = x.shape
    out = np.zeros((b, h - kh + 1, w - kw + 1, cout), np.float64)
    for i in range(kh):
        for j in range(kw):
            out += np.einsum(
                "bhwc,co->bhwo", x[:, i : i + h - kh + 1, j : j + w - kw + 1], kernel[i, j]
            )
    return out + bias


@pytest.mark.parametrize("impl", ["xla", "im2col", "native"])
# kernel 9: more patch slices per row than XLA:CPU fuses into one concatenate (8)
@pytest.mark.parametrize("kernel_size, x_shape", [(3, (3, 7, 6, 2)), (9, (2, 11, 10, 2))])
def test_valid_conv_layouts_match_numpy_with_one_parameter_tree(impl, kernel_size, x_shape):
    if impl == "native" and not native_conv.available():
        pytest.skip(native_conv.unavailable_reason())
    x = np.asarray(jax.random.normal(jax.random.key(3), x_shape))
    nhwc = ValidConv(5, kernel_size, impl)
    chwn = ValidConv(5, kernel_size, impl, layout="CHWN")
    to_chwn = (3, 1, 2, 0)  # swaps batch and channels; its own inverse
    params = nhwc.init(jax.random.key(0), x)
    chex.assert_trees_all_equal(params, chwn.init(jax.random.key(0), x.transpose(to_chwn)))
    params = jax.tree.map(lambda p: p + 0.1, params)  # nonzero bias
    expected = _numpy_valid_conv(x, *(np.asarray(params["params"][k]) for k in ("kernel", "bias")))
    np.testing.assert_allclose(nhwc.apply(params, x), expected, rtol=1e-5, atol=1e-5)
    got = chwn.apply(params, x.transpose(to_chwn)).transpose(to_chwn)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="layout='NCHW'"):
        ValidConv(5, 3, impl, layout="NCHW").init(jax.random.key(0), x)


def _numpy_max_pool_2x2_and_grad(x, g):
    """Value and vector-Jacobian product of a 2x2/2 valid max pool; a tie splits g evenly."""
    a, h, w, d = x.shape
    y = np.zeros((a, h // 2, w // 2, d))
    grad = np.zeros_like(x)
    for r in range(h // 2):
        for c in range(w // 2):
            window = x[:, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2, :]
            y[:, r, c] = window.max(axis=(1, 2))
            hits = window == y[:, r, c][:, None, None]
            grad[:, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2] = (
                hits * (g[:, r, c] / hits.sum((1, 2)))[:, None, None]
            )
    return y, grad


@pytest.mark.parametrize("shape", [(3, 22, 22, 5), (2, 9, 7, 4)])  # even, odd (cropped)
def test_im2col_max_pool_value_and_tie_splitting_gradient_match_numpy(shape):
    from jaxnets.models.cnn import _max_pool_2x2

    rng = np.random.default_rng(0)
    # Coarse levels: many windows with 2, 3 or 4 equal maxima.
    x = rng.integers(0, 3, shape).astype(np.float32)
    g = rng.standard_normal((shape[0], shape[1] // 2, shape[2] // 2, shape[3])).astype(np.float32)
    want_y, want_grad = _numpy_max_pool_2x2_and_grad(x, g)
    pool = jax.jit(lambda x: _max_pool_2x2(x, "im2col"))
    y, vjp = jax.vjp(pool, jnp.asarray(x))
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_allclose(vjp(jnp.asarray(g))[0], want_grad, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_forward_mode_hessian_vector_product_matches_xla_impl():
    # jvp of grad (forward over reverse) goes through the pool's derivative rule twice.
    images = jax.random.uniform(jax.random.key(5), (4, 28, 28, 1))  # no tied maxima
    labels = jnp.arange(4)
    params = _init(MODELS[0])
    vector = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
    hvps = []
    impls = ["xla", "im2col"] + ["native"] * native_conv.available()
    for impl in impls:
        grad = jax.grad(_loss_fn(MnistCNN(conv_impl=impl), images, labels))
        hvps.append(jax.jit(lambda p, v, g=grad: jax.jvp(g, (p,), (v,))[1])(params, vector))
    for hvp in hvps[1:]:
        chex.assert_trees_all_close(hvp, hvps[0], rtol=1e-4, atol=1e-6)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(hvps[1])) > 1e-3  # not all zero


@pytest.mark.slow
@pytest.mark.parametrize("batch, groups", [(7, 2), (7, 3), (1, 2), (2, 5)])
def test_cnn_batch_groups_compute_the_same_function(batch, groups):
    # Sub-batches (sizes differing by at most one; never more groups than examples) are a
    # schedule, not a model change: values, gradients and intermediates as with one group.
    images = jax.random.uniform(jax.random.key(4), (batch, 28, 28, 1))
    labels = jnp.arange(batch) % 10
    params = _init(MODELS[0])
    whole, split = MnistCNN(batch_groups=1), MnistCNN(batch_groups=groups)
    want, want_seen = whole.apply({"params": params}, images, mutable=["intermediates"])
    got, got_seen = split.apply({"params": params}, images, mutable=["intermediates"])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(got_seen, want_seen, rtol=1e-6, atol=1e-6)
    grads = [jax.jit(jax.grad(_loss_fn(m, images, labels)))(params) for m in (whole, split)]
    chex.assert_trees_all_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_cnn_rejects_bad_batch_groups():
    params = _init(MODELS[0])
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match=rf"batch_groups={bad!r}; use a positive int"):
            MnistCNN(batch_groups=bad).apply({"params": params}, jnp.zeros((2, 28, 28, 1)))
