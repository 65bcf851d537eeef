"""Losses: SEEDS.md golden values, numpy references, finite differences, PyTorch semantics."""

import functools
import importlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnets import losses

# Newer jax has jax.enable_x64; 0.7.2 (the Colab stack) only jax.experimental's.
enable_x64 = (
    jax.enable_x64
    if hasattr(jax, "enable_x64")
    else importlib.import_module("jax.experimental").enable_x64
)

# SEEDS.md section 4: 10 classes, correct label 2.
T = np.eye(10, dtype=np.float32)[2]
Y1 = [0.01, 0.03, 0.7, 0.06, 0.2, 0, 0, 0, 0, 0]
Y2 = [0.1, 0.05, 0.6, 0.0, 0.05, 0.1, 0.0, 0.1, 0.0, 0.0]
Y3 = [0.1, 0.05, 0.1, 0.0, 0.05, 0.1, 0.0, 0.0, 0.6, 0.0]


@pytest.mark.parametrize("y, expected", [(Y1, 0.0673), (Y2, 0.0975), (Y3, 0.5975)])
def test_tutorial_mean_squared_error_is_summed_l2_loss(y, expected):
    y = np.asarray(y, np.float32)
    np.testing.assert_allclose(losses.l2_loss(y, T, reduction="sum"), expected, rtol=1e-6)
    # Per example over a batch: sum over classes.
    batch = losses.l2_loss(np.stack([y, y]), np.stack([T, T])).sum(-1)
    np.testing.assert_allclose(batch, [expected, expected], rtol=1e-6)


@pytest.mark.parametrize("y, expected", [(Y2, 0.510825457099338), (Y3, 2.302584092994546)])
def test_tutorial_cross_entropy_error(y, expected):
    np.testing.assert_allclose(
        losses.cross_entropy(np.asarray(y, np.float32), T), expected, rtol=1e-6
    )
    with enable_x64(True):
        got = losses.cross_entropy(np.asarray(y, np.float64), T.astype(np.float64))
        np.testing.assert_allclose(got, expected, rtol=1e-14)


# Independent numpy references (float64) and input generators, one entry per loss.
def _log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _np_bce(p, t, eps=1e-7):
    p = np.clip(p, eps, 1 - eps)
    return -(t * np.log(p) + (1 - t) * np.log(1 - p))


def _np_categorical(p, t, eps=1e-7):
    p = np.clip(p / p.sum(-1, keepdims=True), eps, 1 - eps)
    return -(t * np.log(p)).sum(-1)


def _np_multiclass_hinge(s, y):
    c = s.shape[-1]
    true = np.take_along_axis(s, y[..., None], -1)
    others = np.where(np.arange(c) == y[..., None], -np.inf, s)
    return np.maximum(0.0, 1.0 + others.max(-1) - true[..., 0])


def _pair(rng, shape):
    return rng.normal(size=shape), rng.normal(size=shape)


def _probs_and_binary(rng, shape):
    return rng.uniform(0.02, 0.98, shape), rng.uniform(0, 1, shape)


def _scores_and_signs(rng, shape):
    return rng.normal(size=shape) * 2, rng.choice([-1.0, 1.0], shape)


def _scores_and_index(rng, shape):
    return rng.normal(size=shape) * 2, rng.integers(0, shape[-1], shape[:-1])


def _probs_and_onehot(rng, shape):
    p = rng.dirichlet(np.ones(shape[-1]), shape[:-1])
    return p, np.eye(shape[-1])[rng.integers(0, shape[-1], shape[:-1])]


def _logprobs_and_index(rng, shape):
    x, y = _scores_and_index(rng, shape)
    return _log_softmax(x), y


# name -> (function, numpy reference, input generator, elementwise?)
CASES = {
    "squared_error": (losses.squared_error, lambda y, t: (y - t) ** 2, _pair, True),
    "l2_loss": (losses.l2_loss, lambda y, t: 0.5 * (y - t) ** 2, _pair, True),
    "absolute_error": (losses.absolute_error, lambda y, t: np.abs(y - t), _pair, True),
    "mean_squared_error": (
        losses.mean_squared_error,
        lambda y, t: ((y - t) ** 2).mean(-1),
        _pair,
        False,
    ),
    "mean_absolute_error": (
        losses.mean_absolute_error,
        lambda y, t: np.abs(y - t).mean(-1),
        _pair,
        False,
    ),
    "root_mean_squared_error": (
        losses.root_mean_squared_error,
        lambda y, t: np.sqrt(((y - t) ** 2).mean(-1)),
        _pair,
        False,
    ),
    "hinge": (losses.hinge, lambda s, t: np.maximum(0, 1 - s * t), _scores_and_signs, True),
    "multiclass_hinge": (
        losses.multiclass_hinge,
        _np_multiclass_hinge,
        _scores_and_index,
        False,
    ),
    "binary_cross_entropy": (losses.binary_cross_entropy, _np_bce, _probs_and_binary, True),
    "sigmoid_binary_cross_entropy": (
        losses.sigmoid_binary_cross_entropy,
        lambda x, t: _np_bce(1 / (1 + np.exp(-x)), t, eps=0.0),
        lambda rng, shape: (rng.normal(size=shape) * 3, rng.uniform(0, 1, shape)),
        True,
    ),
    "cross_entropy": (
        losses.cross_entropy,
        lambda p, t: -(t * np.log(p + 1e-7)).sum(-1),
        _probs_and_onehot,
        False,
    ),
    "categorical_cross_entropy": (
        losses.categorical_cross_entropy,
        _np_categorical,
        # Unnormalised non-negative scores and soft targets exercise the renormalisation.
        lambda rng, shape: (
            rng.uniform(0.0, 3.0, shape),
            rng.dirichlet(np.ones(shape[-1]), shape[:-1]),
        ),
        False,
    ),
    "nll": (
        losses.nll,
        lambda lp, y: -np.take_along_axis(lp, y[..., None], -1)[..., 0],
        _logprobs_and_index,
        False,
    ),
    "softmax_cross_entropy": (
        functools.partial(losses.softmax_cross_entropy, reduction="none"),
        lambda x, y: -np.take_along_axis(_log_softmax(x), y[..., None], -1)[..., 0],
        _scores_and_index,
        False,
    ),
    "zero_one": (
        losses.zero_one,
        lambda s, y: (s.argmax(-1) != y).astype(float),
        _scores_and_index,
        False,
    ),
}
SHAPES = [(5,), (6, 10), (2, 3, 4)]


def _inputs(name, shape, seed=0):
    rng = np.random.default_rng(seed)
    a, b = CASES[name][2](rng, shape)
    if np.issubdtype(b.dtype, np.integer):
        return a, b.astype(np.int32)
    return a, b


@pytest.mark.parametrize("name, shape", list(itertools.product(sorted(CASES), SHAPES)))
def test_matches_numpy_reference(name, shape):
    fn, ref, _, elementwise = CASES[name]
    a, b = _inputs(name, shape)
    expected = ref(a, b)
    assert expected.shape == (shape if elementwise else shape[:-1])
    a32 = a.astype(np.float32)
    b32 = b if np.issubdtype(b.dtype, np.integer) else b.astype(np.float32)
    got = fn(a32, b32)
    assert got.shape == expected.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)
    # jit and vmap over the leading axis give the same values.
    np.testing.assert_allclose(jax.jit(fn)(a32, b32), expected, rtol=2e-5, atol=2e-6)
    if len(shape) > 1:
        np.testing.assert_allclose(jax.vmap(fn)(a32, b32), expected, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name", sorted(set(CASES) - {"root_mean_squared_error"}))
def test_reductions_are_mean_and_sum_of_per_example_values(name):
    fn, ref, _, _ = CASES[name]
    a, b = _inputs(name, (6, 10), seed=1)
    b32 = b if np.issubdtype(b.dtype, np.integer) else b.astype(np.float32)
    expected = ref(a, b)
    for reduction, reduce in (("mean", np.mean), ("sum", np.sum)):
        got = fn(a.astype(np.float32), b32, reduction=reduction)
        assert got.shape == ()
        np.testing.assert_allclose(got, reduce(expected), rtol=2e-5)


def test_root_mean_squared_error_mean_is_data_set_rmse():
    y, t = _inputs("root_mean_squared_error", (6, 10))
    got = losses.root_mean_squared_error(
        y.astype(np.float32), t.astype(np.float32), reduction="mean"
    )
    np.testing.assert_allclose(got, np.sqrt(((y - t) ** 2).mean()), rtol=1e-6)
    with pytest.raises(ValueError, match="reduction='sum'"):
        losses.root_mean_squared_error(y, t, reduction="sum")


def _numeric_grad(f, x, eps=1e-6):
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[i] = eps
        grad[i] = (f(x + step) - f(x - step)) / (2 * eps)
    return grad


@pytest.mark.parametrize("name", sorted(set(CASES) - {"zero_one"}))
def test_gradient_matches_finite_differences(name):
    fn = CASES[name][0]
    a, b = _inputs(name, (3, 4), seed=2)
    with enable_x64(True):
        # Distinct weights per output value, so a wrong per-example gradient cannot cancel out.
        scale = np.arange(1.0, 1.0 + np.asarray(fn(a, b)).size).reshape(np.shape(fn(a, b)))
        loss = jax.jit(lambda x: jnp.sum(fn(x, b) * scale))
        grad = np.asarray(jax.grad(loss)(a))
        assert grad.dtype == np.float64
        numeric = _numeric_grad(lambda x: float(loss(x)), a)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


def test_zero_one_gradient_is_zero_and_one_hot_labels_work():
    scores = jnp.array([[0.1, 0.9, 0.0], [2.0, 1.0, 3.0]])
    np.testing.assert_array_equal(losses.zero_one(scores, jnp.array([1, 0])), [0.0, 1.0])
    np.testing.assert_array_equal(losses.zero_one(scores, jnp.eye(3)[jnp.array([1, 2])]), [0, 0])
    grad = jax.grad(lambda s: losses.zero_one(s, jnp.array([1, 0]), reduction="sum"))(scores)
    np.testing.assert_array_equal(grad, np.zeros((2, 3)))


def test_root_mean_squared_error_gradient_at_perfect_fit_is_zero():
    y = jnp.ones((2, 3))
    grad = jax.grad(lambda p: losses.root_mean_squared_error(p, y, reduction="mean"))(y)
    np.testing.assert_array_equal(grad, np.zeros((2, 3)))


def test_multiclass_hinge_is_crammer_singer_not_weston_watkins():
    scores = jnp.array([[1.0, 0.5, 0.8]])
    # Crammer-Singer: max(0, 1 + max(0.5, 0.8) - 1.0) = 0.8; Weston-Watkins would sum to 1.3.
    np.testing.assert_allclose(losses.multiclass_hinge(scores, jnp.array([0])), [0.8], rtol=1e-6)
    np.testing.assert_allclose(
        losses.multiclass_hinge(scores, jnp.array([0]), margin=0.1), [0.0], atol=1e-7
    )


# Extreme logits: values exact and finite, gradients finite.
BIG = 1e4


def test_sigmoid_binary_cross_entropy_extreme_logits():
    x = jnp.array([BIG, -BIG, BIG, -BIG, 0.0])
    t = jnp.array([1.0, 0.0, 0.0, 1.0, 0.5])
    np.testing.assert_allclose(
        losses.sigmoid_binary_cross_entropy(x, t), [0.0, 0.0, BIG, BIG, np.log(2)], rtol=1e-6
    )
    grad = jax.grad(lambda x: losses.sigmoid_binary_cross_entropy(x, t, reduction="sum"))(x)
    np.testing.assert_allclose(grad, [0.0, 0.0, 1.0, -1.0, 0.0], atol=1e-7)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"label_smoothing": 0.1},
        {"class_weights": jnp.array([0.5, 2.0, 1.0]), "ignore_index": 1, "label_smoothing": 0.2},
    ],
)
def test_softmax_cross_entropy_extreme_logits(kwargs):
    logits = jnp.array([[BIG, -BIG, 0.0], [-BIG, BIG, BIG], [BIG, -BIG, -BIG]])
    labels = jnp.array([1, 2, 0])

    def loss(x):
        return losses.softmax_cross_entropy(x, labels, **kwargs)

    value, grad = jax.value_and_grad(loss)(logits)
    assert np.isfinite(value) and np.isfinite(grad).all()
    if not kwargs:  # -log p: 2e4, log 2, 0 -> mean
        np.testing.assert_allclose(value, (2 * BIG + np.log(2)) / 3, rtol=1e-6)
    probs = jax.nn.one_hot(labels, 3)
    value, grad = jax.value_and_grad(
        lambda x: losses.softmax_cross_entropy(x, probs, label_smoothing=0.1)
    )(logits)
    assert np.isfinite(value) and np.isfinite(grad).all()


@pytest.mark.parametrize("name", ["hinge", "multiclass_hinge", "sigmoid_binary_cross_entropy"])
def test_logit_losses_finite_at_extremes(name):
    fn = CASES[name][0]
    a, b = _inputs(name, (4, 3), seed=3)
    a = np.where(a > 0, BIG, -BIG).astype(np.float32)
    b = b if np.issubdtype(b.dtype, np.integer) else b.astype(np.float32)
    value, grad = jax.value_and_grad(lambda x: fn(x, b, reduction="sum"))(a)
    assert np.isfinite(value) and np.isfinite(grad).all()


# Shape and label errors: raised in Python with both shapes and the fix.
def test_shape_mismatch_names_both_shapes_and_the_fix():
    with pytest.raises(ValueError) as info:
        losses.sigmoid_binary_cross_entropy(jnp.zeros((8, 1)), jnp.zeros((8,)))
    message = str(info.value)
    assert "(8, 1)" in message and "(8,)" in message and "labels.reshape((8, 1))" in message
    with pytest.raises(ValueError, match=r"\(3, 2\).*\(3, 5\).*one label per"):
        losses.squared_error(jnp.zeros((3, 2)), jnp.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"labels\[\.\.\., 0\]"):
        losses.softmax_cross_entropy(jnp.zeros((4, 3)), jnp.zeros((4, 1), jnp.int32))
    with pytest.raises(ValueError, match="astype\\(jnp.int32\\)"):
        losses.softmax_cross_entropy(jnp.zeros((4, 3)), jnp.zeros((4,)))
    with pytest.raises(ValueError, match="reduction='avg'"):
        losses.nll(jnp.zeros((4, 3)), jnp.zeros((4,), jnp.int32), reduction="avg")


def test_out_of_range_labels_raise_when_concrete_but_not_traced():
    logits = jnp.zeros((3, 4))
    for fn in (losses.softmax_cross_entropy, losses.nll, losses.multiclass_hinge):
        with pytest.raises(ValueError, match=r"\[0, 4\).*found \[4\]"):
            fn(logits, np.array([0, 4, 1]))
        with pytest.raises(ValueError, match=r"found \[-1\]"):
            fn(logits, jnp.array([0, -1, 1]))
    # Traced labels are not inspected (that would need a device sync): no error under jit.
    jax.jit(losses.softmax_cross_entropy)(logits, jnp.array([0, 4, 1]))
    # ignore_index is a valid label value.
    losses.softmax_cross_entropy(logits, np.array([0, -100, 1]), ignore_index=-100)
    with pytest.raises(ValueError, match="2 \\* labels - 1"):
        losses.hinge(jnp.zeros(3), jnp.array([0.0, 1.0, 1.0]))


# softmax_cross_entropy has torch.nn.CrossEntropyLoss semantics.
def _torch_cross_entropy(
    logits, labels, weight=None, ignore_index=-100, smoothing=0.0, reduction="mean"
):
    """numpy transcription of ATen's cross_entropy (aten/src/ATen/native/LossNLL.cpp:
    cross_entropy_loss_label_smoothing / cross_entropy_loss_prob_target), classes last.

    Checked against torch 2.13.0 CPU (float64) over 144 option combinations: max |diff| 1.4e-14.
    """
    c = logits.shape[-1]
    logp = _log_softmax(np.asarray(logits, np.float64))
    w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    if np.issubdtype(labels.dtype, np.floating):
        per = -(logp * (labels * (1 - smoothing) + smoothing / c) * w).sum(-1)
        return {"none": per, "sum": per.sum(), "mean": per.sum() / per.size}[reduction]
    ignore = labels == ignore_index
    safe = np.where(ignore, 0, labels)
    w_y = np.where(ignore, 0.0, w[safe])
    nll = -np.take_along_axis(logp, safe[..., None], -1)[..., 0] * w_y
    smooth = np.where(ignore, 0.0, -(logp * w).sum(-1))
    per = (1 - smoothing) * nll + smoothing / c * smooth
    if reduction == "none":
        return per
    with np.errstate(invalid="ignore"):
        return per.sum() / (w_y.sum() if reduction == "mean" else 1.0)


@pytest.mark.parametrize(
    "weighted, ignore_index, smoothing, reduction",
    list(itertools.product([False, True], [None, 2], [0.0, 0.3], ["none", "mean", "sum"])),
)
def test_softmax_cross_entropy_matches_pytorch_formula(
    weighted, ignore_index, smoothing, reduction
):
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(3, 4, 5)) * 3
    labels = rng.integers(0, 5, (3, 4)).astype(np.int32)
    labels[0, 0] = 2
    weights = rng.uniform(0.1, 2.0, 5) if weighted else None
    expected = _torch_cross_entropy(
        logits,
        labels,
        weights,
        -100 if ignore_index is None else ignore_index,
        smoothing,
        reduction,
    )
    got = losses.softmax_cross_entropy(
        logits.astype(np.float32),
        labels,
        class_weights=None if weights is None else weights.astype(np.float32),
        ignore_index=ignore_index,
        label_smoothing=smoothing,
        reduction=reduction,
    )
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-6)
    probs = rng.dirichlet(np.ones(5), (3, 4))
    if ignore_index is None:
        expected = _torch_cross_entropy(logits, probs, weights, -100, smoothing, reduction)
        got = losses.softmax_cross_entropy(
            logits.astype(np.float32),
            probs.astype(np.float32),
            class_weights=None if weights is None else weights.astype(np.float32),
            label_smoothing=smoothing,
            reduction=reduction,
        )
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-6)


# Produced once with torch 2.13.0+cpu, float64:
#   torch.nn.functional.cross_entropy(torch.tensor(TORCH_LOGITS), torch.tensor(TORCH_LABELS),
#       weight=torch.tensor(TORCH_WEIGHTS), ignore_index=2, label_smoothing=0.1, reduction=r)
TORCH_LOGITS = [
    [2.0, -1.0, 0.5, 3.0],
    [0.0, 1.0, -2.0, 0.5],
    [1.5, 1.5, -0.5, 0.0],
    [-1.0, 2.0, 0.0, 1.0],
]
TORCH_LABELS = [3, 1, 2, 0]
TORCH_WEIGHTS = [0.5, 2.0, 1.0, 1.5]
TORCH_GOLDEN = {
    "mean": 1.0083381683843635,
    "sum": 4.033352673537454,
    "none": [0.8415352594008182, 1.463708337463948, 0.0, 1.7281090766726872],
}


@pytest.mark.parametrize("reduction", sorted(TORCH_GOLDEN))
def test_softmax_cross_entropy_pytorch_golden_values(reduction):
    kwargs = dict(class_weights=np.array(TORCH_WEIGHTS), ignore_index=2, label_smoothing=0.1)
    labels = np.array(TORCH_LABELS)
    with enable_x64(True):
        got = losses.softmax_cross_entropy(
            np.array(TORCH_LOGITS), labels, reduction=reduction, **kwargs
        )
        np.testing.assert_allclose(got, TORCH_GOLDEN[reduction], rtol=1e-12)
    got = losses.softmax_cross_entropy(
        np.array(TORCH_LOGITS, np.float32), labels, reduction=reduction, **kwargs
    )
    np.testing.assert_allclose(got, TORCH_GOLDEN[reduction], rtol=1e-6)


def test_softmax_cross_entropy_edge_semantics():
    logits = jnp.array([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0]])
    # Every target ignored: 0 / 0 = nan for 'mean' (PyTorch), 0 for 'sum'.
    labels = jnp.array([1, 1])
    assert np.isnan(losses.softmax_cross_entropy(logits, labels, ignore_index=1))
    assert losses.softmax_cross_entropy(logits, labels, ignore_index=1, reduction="sum") == 0.0
    # One-hot labels equal integer labels when there is no weighting.
    np.testing.assert_allclose(
        losses.softmax_cross_entropy(logits, jax.nn.one_hot(jnp.array([2, 0]), 3)),
        losses.softmax_cross_entropy(logits, jnp.array([2, 0])),
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="ignore_index=1 needs integer"):
        losses.softmax_cross_entropy(logits, jnp.full((2, 3), 1 / 3), ignore_index=1)
    with pytest.raises(ValueError, match=r"class_weights shape \(2,\)"):
        losses.softmax_cross_entropy(logits, labels, class_weights=jnp.ones(2))
    with pytest.raises(ValueError, match="label_smoothing=1.5"):
        losses.softmax_cross_entropy(logits, labels, label_smoothing=1.5)
