"""Sweeps: K vmapped models equal K separate `loop.fit` runs; best/table; --sweep parsing."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnets import (
    adapters,
    evaluation,
    hooks,
    loop,
    metrics,
    optim,
    sharding,
    sweep,
    sweep_results,
    train,
)


class _TinyNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(10)(nn.tanh(nn.Dense(16)(x)))


def _data(n, seed):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 6, 6, 1), dtype=np.uint8)
    return images, rng.integers(0, 10, n).astype(np.int32)


def _loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _preprocess(images, *, keys):
    x = images.astype(jnp.float32) / 255.0
    if keys is not None:  # per-example noise: the per-model step keys must match too
        x = x + 0.01 * jax.vmap(lambda k: jax.random.normal(k, x.shape[1:]))(keys)
    return x


class _BatchNormNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        # No bias before BatchNorm: its gradient is rounding noise, which adam would amplify.
        x = nn.Dense(16, use_bias=False)(x.reshape(x.shape[0], -1))
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(10)(nn.tanh(x))


def _objective(module=None):
    return adapters.linen(
        module or _TinyNet(),
        loss=_loss,
        metrics={"accuracy": metrics.accuracy},
        preprocess=_preprocess,
    )


def _batch(data):
    return {"image": data[0], "label": data[1]}


# Every hyperparameter differs somewhere; two configs share a seed (same init and data order).
CONFIGS = [
    {"seed": 0, "learning_rate": 0.1, "momentum": 0.9},
    {"seed": 1, "learning_rate": 0.05, "momentum": 0.0, "weight_decay": 1e-2},
    {"seed": 2, "learning_rate": 0.2, "momentum": 0.5, "l1": 1e-3, "decay": 1e-2},
    {"seed": 0, "learning_rate": 0.02, "momentum": 0.9, "weight_decay": 1e-3, "l1": 1e-4},
]
EPOCHS, BATCH = 2, 32


def _separate_run(tx, seed, train_data, val_data, module=None):
    """One configuration through the ordinary single-model path: loop.fit on 1 device."""
    model_key, data_key = sweep.seed_keys(seed)
    objective = _objective(module)
    state = train.create_train_state(objective.init, tx, _batch(train_data), key=model_key)
    step = train.make_train_step(objective.loss_fn, tx)
    evaluate = hooks.Evaluate(
        train.make_eval_step(objective.eval_fn), _batch(val_data), batch_size=BATCH
    )
    result = loop.fit(
        state,
        step,
        _batch(train_data),
        data_key=data_key,
        epochs=EPOCHS,
        batch_size=BATCH,
        hooks=[evaluate],
        mesh=sharding.make_mesh(1),
        steps_per_call=1,
    )
    return result.state, result.history


def _sgd_of(config):
    c = sweep.complete_configs([config], {})[0]
    return c["seed"], optim.sgd(
        optim.inverse_time_decay(c["learning_rate"], c["decay"]),
        momentum=c["momentum"],
        nesterov=True,
        weight_decay=c["weight_decay"],
        l1=c["l1"],
    )


def _assert_sweep_equals_runs(results, configs, separate, train_data, val_data):
    for k, config in enumerate(configs):
        state, history = separate(config)
        for result in results:
            assert result.results["num_models"] == len(configs)
            mine = jax.tree.map(lambda x, k=k: x[k], result.state)
            chex.assert_trees_all_close(mine.params, state.params, atol=1e-5, rtol=1e-5)
            chex.assert_trees_all_close(mine.model_state, state.model_state, atol=1e-5, rtol=1e-5)
            run = result.results["runs"][k]
            for got, want in zip(run["history"], history, strict=True):
                for name in sweep.RESULT_COLUMNS:
                    np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_sweep_on_several_devices_equals_separate_runs_on_1():
    train_data, val_data = _data(160, 0), _data(40, 1)
    results = [
        sweep.fit_sweep(
            _objective(),
            sweep.make_sweep_tx(sweep.DEFAULTS, nesterov=True),
            CONFIGS,
            _batch(train_data),
            _batch(val_data),
            epochs=EPOCHS,
            batch_size=BATCH,
            mesh=sharding.make_mesh(devices),
            steps_per_call=k,  # k=2: chunks of 2, 2, 1 steps, the scanned and direct paths
            vectorize=vectorize,
        )
        for vectorize, devices, k in [("vmap", 4, 2), ("map", 2, 1)]
    ]
    _assert_sweep_equals_runs(
        results,
        CONFIGS,
        lambda c: _separate_run(_sgd_of(c)[1], _sgd_of(c)[0], train_data, val_data),
        train_data,
        val_data,
    )
    # The two seed-0 configs started from the same weights.
    init = sweep.create_sweep_state(
        _objective().init,
        sweep.make_sweep_tx(sweep.DEFAULTS),
        sweep.complete_configs(CONFIGS, {}),
        _batch(train_data),
    )
    chex.assert_trees_all_equal(
        jax.tree.map(lambda x: x[0], init.params), jax.tree.map(lambda x: x[3], init.params)
    )


@pytest.mark.slow
def test_sweep_of_any_injected_chain_and_a_batchnorm_model():
    """adamw's injected learning_rate and b1, swept over a BatchNorm model on 2 devices."""
    train_data, val_data = _data(128, 4), _data(40, 5)
    tx = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3, weight_decay=1e-4)
    configs = [{"seed": 0, "learning_rate": 0.01}, {"seed": 1, "b1": 0.5}]
    result = sweep.fit_sweep(
        _objective(_BatchNormNet()),
        tx,
        configs,
        _batch(train_data),
        _batch(val_data),
        epochs=EPOCHS,
        batch_size=BATCH,
        mesh=sharding.make_mesh(2),
        steps_per_call=2,
    )
    assert result.results["axes"] == ["seed", "b1", "learning_rate"]

    def separate(config):
        hp = {"learning_rate": 1e-3, "weight_decay": 1e-4, **config}
        seed = hp.pop("seed")
        return _separate_run(optax.adamw(**hp), seed, train_data, val_data, module=_BatchNormNet())

    _assert_sweep_equals_runs([result], configs, separate, train_data, val_data)


def test_sweep_state_matches_create_train_state_bit_for_bit():
    configs = sweep.complete_configs([{"seed": 5, "learning_rate": 0.3, "momentum": 0.1}], {})
    sample = _batch(_data(2, 0))
    stacked = sweep.create_sweep_state(
        _objective().init, sweep.make_sweep_tx(sweep.DEFAULTS, nesterov=True), configs, sample
    )
    one = train.create_train_state(
        _objective().init,
        sweep.make_sweep_tx(configs[0], nesterov=True),
        sample,
        key=sweep.seed_keys(5)[0],
    )
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x[0], stacked), one)
    hp = jax.tree.map(lambda x: x[0], stacked.opt_state.hyperparams)
    assert float(hp["learning_rate"]) == pytest.approx(0.3)
    assert float(hp["momentum"]) == pytest.approx(0.1)


def test_configs_setting_hyperparameters_need_an_injected_transform():
    with pytest.raises(ValueError, match="tx has none injected; build it with"):
        sweep.fit_sweep(
            _objective(),
            optax.sgd(0.1),
            [{"seed": 0, "learning_rate": 0.1}],
            _batch(_data(64, 0)),
            epochs=1,
            batch_size=BATCH,
        )


def _results_with(val_losses):
    runs = [
        {"config": {"seed": i}, "label": f"seed={i}", "final": {"loss": 1.0, "val_loss": v}}
        for i, v in enumerate(val_losses)
    ]
    results = {"runs": runs, "axes": ["seed"], "metric": "val_loss"}
    results["best"] = sweep.best_index(results)
    return results


@pytest.mark.slow
def test_best_is_lowest_validation_loss_and_table_marks_it():
    train_data, val_data = _data(96, 2), _data(64, 3)
    configs = sweep.grid(learning_rate=[0.001, 0.3, 3.0], seed=[0, 1])
    result = sweep.fit_sweep(
        _objective(),
        sweep.make_sweep_tx(sweep.DEFAULTS),
        configs,
        _batch(train_data),
        _batch(val_data),
        epochs=2,
        batch_size=BATCH,
        mesh=sharding.make_mesh(2),
    )
    results = result.results
    # Independent of the sweep's own bookkeeping: evaluate each final model separately.
    evaluation_set = evaluation.make_evaluation(
        train.make_eval_step(_objective().eval_fn),
        _batch(val_data),
        batch_size=16,
        mesh=sharding.make_mesh(1),
    )
    val = [
        evaluation.evaluate(evaluation_set, jax.tree.map(lambda x, k=k: x[k], result.state))["loss"]
        for k in range(len(configs))
    ]
    expected = int(np.nanargmin(val))
    assert results["best"] == expected
    assert sweep_results.best(results) is results["runs"][expected]
    np.testing.assert_allclose([r["final"]["val_loss"] for r in results["runs"]], val, rtol=1e-5)
    table = sweep_results.format_results(results).splitlines()
    assert len(table) == 2 + len(configs)
    marked = [line for line in table[2:] if line.rstrip().endswith("| * |")]
    assert len(marked) == 1 and marked[0].startswith(f"| {expected} |")
    assert results["axes"] == ["seed", "learning_rate"]


def test_best_skips_diverged_runs_and_accuracy_is_maximised():
    results = _results_with([float("nan"), 0.5, 0.2, 0.7])
    assert results["best"] == 2
    for run, acc in zip(results["runs"], [0.1, 0.9, 0.3, 0.2]):
        run["final"]["val_accuracy"] = acc
    assert sweep.best_index(results, "val_accuracy") == 1
    with pytest.raises(ValueError, match="'val_f1' not in the results"):
        sweep.best_index(results, "val_f1")
    with pytest.raises(ValueError, match="all diverged"):
        sweep.best_index({"runs": [{"final": {"loss": float("nan")}}]}, "loss")


def test_grid_is_the_cartesian_product_last_axis_fastest():
    assert sweep.grid(seed=[0, 1], learning_rate=[0.1, 0.2]) == [
        {"seed": 0, "learning_rate": 0.1},
        {"seed": 0, "learning_rate": 0.2},
        {"seed": 1, "learning_rate": 0.1},
        {"seed": 1, "learning_rate": 0.2},
    ]
    with pytest.raises(ValueError, match="non-empty list"):
        sweep.grid(seed=[])


def test_parse_sweep_syntax():
    axes = sweep.parse_sweep(["learning_rate=0.01,0.05, 1e-1", "seed=0:3", "weight_decay=0,1e-4"])
    assert axes == {
        "learning_rate": [0.01, 0.05, 0.1],
        "seed": [0, 1, 2],
        "weight_decay": [0, 1e-4],
    }
    assert isinstance(axes["seed"][0], int)
    assert sweep.parse_sweep(["lr=0.1"], allowed=None) == {"lr": [0.1]}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("lr=abc", r"sweep spec 'lr=abc': 'abc' is not a number"),
        ("learning_rate=abc", r"sweep spec 'learning_rate=abc': 'abc' is not a number"),
        ("seed=0:x", r"sweep spec 'seed=0:x': '0:x' is not an integer range"),
        ("seed=3:3", r"empty range 3:3"),
        ("seed", r"sweep spec 'seed': expected NAME=VALUES"),
        ("batch_size=32,64", r"unknown name 'batch_size'; sweepable: seed, learning_rate"),
        ("l1=inf", r"'inf' is not finite"),
    ],
)
def test_parse_sweep_errors_name_the_spec(spec, message):
    allowed = None if spec.startswith("lr=") else sweep.SWEEPABLE
    with pytest.raises(ValueError, match=message):
        sweep.parse_sweep([spec], allowed=allowed)


def test_parse_sweep_rejects_a_repeated_name():
    with pytest.raises(ValueError, match="'seed' is given twice"):
        sweep.parse_sweep(["seed=0:2", "seed=5"])


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"seed": 0.5}, "seed must be an int"),
        ({"learning_rate": -0.1}, "learning_rate must be a finite number >= 0"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"nesterov": True}, r"unknown names \['nesterov'\]"),
        ({"vectorize": "pmap"}, r"unknown names \['vectorize'\]"),
    ],
)
def test_bad_configs_fail_before_tracing(config, message):
    with pytest.raises(ValueError, match=message):
        sweep.complete_configs([config], {})
