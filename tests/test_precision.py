"""Mixed precision: bfloat16 compute, float32 parameters, optimiser state, logits and sums."""

import dataclasses

import jax
import jax.numpy as jnp
import optax
import pytest

from experiments import mnist_cnn
from jaxnets import adapters, losses, train
from jaxnets import metrics as jmetrics
from jaxnets.models import MnistCNN, TwoLayerSigmoid


def _dtypes(tree):
    return {str(x.dtype) for x in jax.tree.leaves(tree) if hasattr(x, "dtype")}


@pytest.mark.slow
def test_cnn_computes_in_bfloat16_with_float32_parameters_and_logits():
    model = MnistCNN(dtype=jnp.bfloat16)
    images = jax.random.uniform(jax.random.key(0), (4, 28, 28, 1))
    variables = jax.jit(model.init)(jax.random.key(1), images)
    assert _dtypes(variables["params"]) == {"float32"}
    logits, seen = model.apply(variables, images, mutable=["intermediates"])
    assert logits.dtype == jnp.float32
    assert _dtypes(seen) == {"bfloat16"}  # the activations are bfloat16
    f32 = MnistCNN().apply(variables, images)
    assert jnp.max(jnp.abs(logits - f32)) < 0.05 and not jnp.array_equal(logits, f32)


def test_two_layer_sigmoid_dtype():
    model = TwoLayerSigmoid(dtype=jnp.bfloat16)
    x = jnp.ones((4, 3))
    variables = model.init(jax.random.key(0), x)
    assert _dtypes(variables) == {"float32"}
    assert model.apply(variables, x).dtype == jnp.float32


@pytest.mark.slow
def test_bfloat16_training_state_and_metric_sums_stay_float32():
    objective = adapters.linen(
        MnistCNN(dtype=jnp.bfloat16),
        loss=lambda logits, y: losses.softmax_cross_entropy(logits, y, reduction="none"),
        metrics={"accuracy": jmetrics.accuracy},
    )
    tx = optax.sgd(0.05, momentum=0.9, nesterov=True)
    batch = {
        "image": jax.random.uniform(jax.random.key(2), (8, 28, 28, 1)),
        "label": jnp.arange(8) % 10,
    }
    state = train.create_train_state(objective.init, tx, batch, key=jax.random.key(0))
    state, metrics = jax.jit(train.make_train_step(objective.loss_fn, tx))(state, batch)
    assert _dtypes(state.params) == _dtypes(state.opt_state) == {"float32"}
    assert _dtypes(metrics) == {"float32"}


def test_experiment_rejects_an_unknown_dtype(tmp_path):
    with pytest.raises(ValueError, match="--dtype float16: must be one of 'float32', 'bfloat16'"):
        dataclasses.replace(mnist_cnn.get_config(), dtype="float16", workdir=str(tmp_path))


@pytest.mark.slow
def test_bfloat16_training_reaches_float32_accuracy_on_the_bundled_sample(tmp_path):
    config = dataclasses.replace(
        mnist_cnn.get_config(),
        dataset="mnist_sample",
        epochs=2,
        devices=1,
        steps_per_dispatch=10,
        progress=False,
        checkpoint=False,
        checkpoint_every_minutes=0.0,
    )
    accuracy = {
        dtype: mnist_cnn.main(
            dataclasses.replace(config, dtype=dtype, workdir=str(tmp_path / dtype))
        )["test"]["accuracy"]
        for dtype in ("float32", "bfloat16")
    }
    assert accuracy["float32"] > 0.85, accuracy  # 64 steps on 3,200 digits
    assert abs(accuracy["bfloat16"] - accuracy["float32"]) <= 0.01, accuracy
