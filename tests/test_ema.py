"""EMA of the parameters (`jaxnets.core.ema`): the numpy recursion, evaluation on the average."""

import chex
import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from jaxnets import adapters, ema, evaluation, hooks, loop, losses, serving, train


def _setup(decay=0.9):
    objective = adapters.linen(
        nn.Dense(3), loss=lambda y, t: losses.softmax_cross_entropy(y, t, reduction="none")
    )
    rng = np.random.default_rng(0)
    data = {
        "image": rng.normal(size=(64, 5)).astype(np.float32),
        "label": rng.integers(0, 3, 64).astype(np.int32),
    }
    tx = ema.with_ema(optax.sgd(0.5, momentum=0.9), decay)
    state = train.create_train_state(objective.init, tx, data, key=jax.random.key(0))
    return objective, tx, state, data


def test_ema_equals_the_numpy_recursion():
    decay = 0.9
    objective, tx, state, data = _setup(decay)
    trajectory = [jax.device_get(state.params)]
    record = hooks.Periodic(
        lambda step, s: trajectory.append(jax.device_get(s.params)), every_steps=1
    )
    result = loop.fit(
        state,
        train.make_train_step(objective.loss_fn, tx),
        data,
        data_key=jax.random.key(1),
        epochs=3,
        batch_size=16,
        hooks=[record],
        steps_per_call=1,
    )
    assert len(trajectory) == 13  # p_0 and the 12 steps' parameters
    expected = jax.tree.map(np.asarray, trajectory[0])
    for p in trajectory[1:]:
        expected = jax.tree.map(lambda e, q: decay * e + (1 - decay) * np.asarray(q), expected, p)
    got = jax.device_get(ema.ema_params(result.state.opt_state))
    chex.assert_trees_all_close(got, expected, atol=1e-6, rtol=0)
    assert int(result.state.opt_state.count) == 12
    # The average differs from the last parameters (the test would pass vacuously otherwise).
    last = jax.device_get(result.state.params)
    assert not np.allclose(got["kernel"], last["kernel"], atol=1e-3)


def test_evaluation_and_prediction_on_the_average():
    objective, tx, state, data = _setup()
    eval_step = train.make_eval_step(objective.eval_fn)
    result = loop.fit(
        state,
        train.make_train_step(objective.loss_fn, tx),
        data,
        data_key=jax.random.key(1),
        epochs=2,
        batch_size=16,
        hooks=[
            hooks.Evaluate(eval_step, data, batch_size=32),
            hooks.Evaluate(ema.ema_eval_step(eval_step), data, batch_size=32, prefix="val_ema_"),
        ],
    )
    final = jax.device_get(result.state)
    averaged = ema.swap(final)
    # val_ema_loss is the loss of the averaged parameters, computed here by hand.
    logits = data["image"] @ averaged.params["kernel"] + averaged.params["bias"]
    reference = np.mean(
        np.asarray(losses.softmax_cross_entropy(logits, data["label"], reduction="none"))
    )
    assert result.history[-1]["val_ema_loss"] == pytest.approx(reference, abs=1e-5)
    assert result.history[-1]["val_ema_loss"] != pytest.approx(result.history[-1]["val_loss"])
    outputs = serving.predict(objective, averaged, data["image"], batch_size=24)
    np.testing.assert_allclose(outputs, logits, atol=1e-5)
    exported = serving.export(objective, averaged, data["image"][:1])  # serving the average
    np.testing.assert_allclose(exported.call(data["image"]), logits, atol=1e-5)
    values = evaluation.evaluate(
        evaluation.make_evaluation(ema.ema_eval_step(eval_step), data, batch_size=32), final
    )
    assert values["loss"] == pytest.approx(reference, abs=1e-5)


def test_ema_refusals():
    with pytest.raises(ValueError, match="decay=1.0"):
        ema.with_ema(optax.sgd(0.1), 1.0)
    with pytest.raises(ValueError, match="with_ema"):
        ema.ema_params(optax.sgd(0.1).init({"w": np.zeros(2)}))
