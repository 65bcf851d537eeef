"""Gradient accumulation (`make_train_step(..., microbatches=k)`): the big-batch step, with
the memory of one micro-batch; BatchNorm's documented semantics; 8 devices."""

import chex
import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from jaxnets import adapters, loop, losses, sharding, train
from jaxnets import metrics as jmetrics


class MLP(nn.Module):
    hidden: int = 32

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.tanh(nn.Dense(self.hidden)(x)))


class BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(3)(nn.relu(x))


def _objective(module):
    return adapters.linen(
        module,
        loss=lambda y, t: losses.softmax_cross_entropy(y, t, reduction="none"),
        metrics={"accuracy": jmetrics.accuracy},
    )


def _data(n, d=5, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(n, d)).astype(np.float32),
        "label": rng.integers(0, 3, n).astype(np.int32),
    }


def test_microbatches_equal_the_big_batch_step():
    # SGD: Adam's g / sqrt(v) magnifies the rounding of tiny gradients beyond 1e-6.
    objective, tx = _objective(MLP()), optax.sgd(0.5, momentum=0.9)
    batch = _data(32)
    state = train.create_train_state(objective.init, tx, batch, key=jax.random.key(0))
    big = jax.jit(train.make_train_step(objective.loss_fn, tx))
    acc = jax.jit(train.make_train_step(objective.loss_fn, tx, microbatches=4))
    s1, m1 = big(state, batch)
    s4, m4 = acc(state, batch)
    chex.assert_trees_all_close(s4.params, s1.params, atol=1e-6, rtol=0)
    chex.assert_trees_all_close(s4.opt_state, s1.opt_state, atol=1e-6, rtol=0)
    assert int(s4.step) == 1
    c1, c4 = jmetrics.compute(jax.device_get(m1)), jmetrics.compute(jax.device_get(m4))
    assert c4["loss"] == pytest.approx(c1["loss"], abs=1e-6)
    assert c4["accuracy"] == c1["accuracy"]
    assert float(m4["loss"].count) == 32  # the batch's sums, not one micro-batch's


def test_accumulation_has_the_memory_of_one_microbatch():
    # A wide hidden layer: the activations of the batch dominate the step's temporaries.
    objective, tx = _objective(MLP(hidden=2048)), optax.sgd(0.1)
    batch = _data(1024, d=64)
    state = train.create_train_state(objective.init, tx, batch, key=jax.random.key(0))

    def temp_bytes(k):
        step = jax.jit(train.make_train_step(objective.loss_fn, tx, microbatches=k))
        return step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes

    big, accumulated = temp_bytes(1), temp_bytes(8)
    # One micro-batch's activations (1/8 of the batch's) plus one gradient accumulator.
    assert accumulated < big / 4, (big, accumulated)


def test_batchnorm_statistics_follow_the_microbatches_in_order():
    """Documented: each micro-batch is normalised by its own statistics and updates the
    running averages once, in order (micro-batch j = examples j, j+k, ...)."""
    module = BNNet()
    objective, tx = _objective(module), optax.sgd(0.1)
    batch = _data(16)
    state = train.create_train_state(objective.init, tx, batch, key=jax.random.key(0))
    new, _ = jax.jit(train.make_train_step(objective.loss_fn, tx, microbatches=2))(state, batch)
    stats = state.model_state
    for j in range(2):
        x = batch["image"][j::2]
        _, stats = module.apply(
            {"params": state.params, **stats}, x, train=True, mutable=["batch_stats"]
        )
    chex.assert_trees_all_close(new.model_state, stats, atol=1e-6, rtol=0)
    # ... which is not the big batch's single update:
    big, _ = jax.jit(train.make_train_step(objective.loss_fn, tx))(state, batch)
    mean = lambda s: s["batch_stats"]["BatchNorm_0"]["mean"]
    assert not np.allclose(mean(big.model_state), mean(new.model_state), atol=1e-4)


def test_accumulation_on_8_devices_equals_the_big_batch_on_1():
    objective, tx = _objective(MLP()), optax.sgd(0.1, momentum=0.9)
    data = _data(128)
    state = train.create_train_state(objective.init, tx, data, key=jax.random.key(0))

    def run(devices, k):
        result = loop.fit(
            state,
            train.make_train_step(objective.loss_fn, tx, microbatches=k),
            data,
            data_key=jax.random.key(1),
            epochs=2,
            batch_size=32,
            mesh=sharding.make_mesh(devices),
            steps_per_call=2,
        )
        return jax.device_get(result.state.params), result.history

    p_big, h_big = run(1, 1)
    p_acc, h_acc = run(8, 2)
    chex.assert_trees_all_close(p_acc, p_big, atol=1e-6, rtol=0)
    assert h_acc[-1]["loss"] == pytest.approx(h_big[-1]["loss"], abs=1e-6)


def test_microbatches_must_divide_the_batch():
    objective, tx = _objective(MLP()), optax.sgd(0.1)
    batch = _data(10)
    state = train.create_train_state(objective.init, tx, batch, key=jax.random.key(0))
    with pytest.raises(ValueError, match="microbatches=4"):
        train.make_train_step(objective.loss_fn, tx, microbatches=4)(state, batch)
    with pytest.raises(ValueError, match="microbatches=0"):
        train.make_train_step(objective.loss_fn, tx, microbatches=0)
