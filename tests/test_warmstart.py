"""Warm start (`jaxnets.runs.warmstart`): another run's parameters, a fresh optimiser, step 0."""

import chex
import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from jaxnets import Checkpointer, adapters, loop, losses, run, sharding, train, warmstart


class Net(nn.Module):
    hidden: int = 8
    extra: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.BatchNorm(use_running_average=not train)(nn.Dense(self.hidden)(x))
        if self.extra:
            x = nn.Dense(self.hidden)(x)
        return nn.Dense(3)(nn.relu(x))


def _objective(**kw):
    return adapters.linen(Net(**kw), loss=losses.softmax_cross_entropy)


def _data():
    rng = np.random.default_rng(0)
    return {
        "image": rng.normal(size=(64, 5)).astype(np.float32),
        "label": rng.integers(0, 3, 64).astype(np.int32),
    }


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A run trained with Adam for 8 steps on 8 devices, FSDP, saved at its end."""
    directory = tmp_path_factory.mktemp("source") / "checkpoints"
    objective, data, tx = _objective(), _data(), optax.adam(1e-2)
    state = train.create_train_state(objective.init, tx, data, key=jax.random.key(0))
    result = loop.fit(
        state,
        train.make_train_step(objective.loss_fn, tx),
        data,
        data_key=jax.random.key(1),
        epochs=2,
        batch_size=16,
        rule=sharding.fsdp(min_bytes=0),
    )
    with Checkpointer(directory) as ckpt:
        ckpt.save(8, result.state, metadata={})
    return directory, jax.device_get(result.state)


def test_warm_start_takes_the_parameters_with_a_fresh_optimiser(source):
    directory, trained = source
    objective, data, tx = _objective(), _data(), optax.sgd(0.1, momentum=0.9)
    fresh = train.create_train_state(objective.init, tx, data, key=jax.random.key(5))
    state = warmstart.warm_start(fresh, tx, directory.parent)  # a run's work directory
    assert int(state.step) == 0
    chex.assert_trees_all_equal(jax.device_get(state.params), trained.params)
    chex.assert_trees_all_equal(state.opt_state, tx.init(trained.params))  # zero momentum
    chex.assert_trees_all_equal(state.model_state, fresh.model_state)  # not asked for
    np.testing.assert_array_equal(state.key, fresh.key)
    with_stats = warmstart.warm_start(fresh, tx, directory, model_state=True)
    chex.assert_trees_all_equal(jax.device_get(with_stats.model_state), trained.model_state)
    # the new run trains from step 0 and equals a run started from those parameters by hand
    by_hand = train.TrainState(
        fresh.step, trained.params, tx.init(trained.params), fresh.model_state, fresh.key
    )
    runs = [
        loop.fit(
            s,
            train.make_train_step(objective.loss_fn, tx),
            data,
            data_key=jax.random.key(2),
            epochs=1,
            batch_size=16,
        )
        for s in (state, by_hand)
    ]
    assert int(runs[0].state.step) == 4
    chex.assert_trees_all_equal(jax.device_get(runs[0].state), jax.device_get(runs[1].state))


def test_warm_start_names_the_differing_paths(source):
    directory, trained = source
    data, tx = _data(), optax.sgd(0.1)
    other = train.create_train_state(
        _objective(hidden=4, extra=True).init, tx, data, key=jax.random.key(0)
    )
    with pytest.raises(ValueError) as err:
        warmstart.warm_start(other, tx, directory)
    message = str(err.value)
    assert "params['Dense_0']['kernel']: source float32[5, 8], new model float32[5, 4]" in message
    assert "params['Dense_2']['kernel']: in the new model, not in the source" in message
    assert "params['BatchNorm_0']['scale']: source float32[8], new model float32[4]" in message
    with pytest.raises(FileNotFoundError, match="step 3"):
        warmstart.warm_start(other, tx, directory, step=3)
    # from a state in memory, the same check
    with pytest.raises(ValueError, match=r"params\['Dense_0'\]\['kernel'\]"):
        warmstart.warm_start(other, tx, trained)


def test_open_run_warm_starts_a_fresh_run_only(source, tmp_path):
    directory, trained = source
    objective, data, tx = _objective(), _data(), optax.sgd(0.1)
    fresh = train.create_train_state(objective.init, tx, data, key=jax.random.key(3))
    flags = run.RunConfig(warm_start=str(directory), workdir=str(tmp_path / "w"), progress=False)
    with pytest.raises(ValueError, match="needs open_run"):
        run.open_run(flags, {}, fresh, result_fields=(), total_steps=8)
    with run.open_run(flags, {}, fresh, result_fields=(), total_steps=8, tx=tx) as work:
        assert work.start_step == 0
        chex.assert_trees_all_equal(jax.device_get(work.state.params), trained.params)
