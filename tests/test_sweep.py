"""Sweeps: K vmapped models equal K separate `train.fit` runs; best/table; --sweep parsing."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnets import optim, parallel, sweep, train


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


# Every hyperparameter differs somewhere; two configs share a seed (same init and data order).
CONFIGS = [
    {"seed": 0, "learning_rate": 0.1, "momentum": 0.9},
    {"seed": 1, "learning_rate": 0.05, "momentum": 0.0, "weight_decay": 1e-2},
    {"seed": 2, "learning_rate": 0.2, "momentum": 0.5, "l1": 1e-3, "lr_decay": 1e-2},
    {"seed": 0, "learning_rate": 0.02, "momentum": 0.9, "weight_decay": 1e-3, "l1": 1e-4},
]
EPOCHS, BATCH = 2, 32


def _separate_run(config, train_data, val_data):
    """One configuration through the ordinary single-model path: train.fit on 1 device."""
    c = sweep.complete_configs([config], {})[0]
    tx = optim.sgd(
        optim.inverse_time_decay(c["learning_rate"], c["lr_decay"]),
        momentum=c["momentum"],
        nesterov=True,
        weight_decay=c["weight_decay"],
        l1=c["l1"],
    )
    model_key, data_key = sweep.run_keys(c["seed"])
    model = _TinyNet()
    dp = parallel.make_data_parallel(backend="pmap", devices=1)
    state = train.create_train_state(
        model, tx, _preprocess(train_data[0][:1], keys=None), key=model_key
    )
    step = train.make_train_step(
        model.apply, _loss, tx, preprocess=_preprocess, axis_name=dp.axis_name
    )
    evaluation = train.make_evaluation(
        train.make_eval_step(model.apply, _loss, preprocess=_preprocess, axis_name=dp.axis_name),
        dp,
        *val_data,
        batch_size=BATCH,
    )
    result = train.fit(
        dp.replicate(state),
        train.make_epoch_runner(step, dp),
        dp,
        train_data,
        data_key=data_key,
        epochs=EPOCHS,
        batch_size=BATCH,
        evaluation=evaluation,
        steps_per_dispatch=1,
    )
    return dp.unreplicate(result.state.params), result.history


@pytest.mark.slow
def test_sweep_on_several_devices_equals_separate_runs_on_1():
    train_data, val_data = _data(160, 0), _data(40, 1)
    results = [
        sweep.run_sweep(
            _TinyNet(),
            _loss,
            CONFIGS,
            train_data,
            val_data,
            epochs=EPOCHS,
            batch_size=BATCH,
            nesterov=True,
            preprocess=_preprocess,
            dp=parallel.make_data_parallel(backend=backend, devices=devices),
            steps_per_dispatch=k,  # k=2: chunks of 2, 2, 1 steps, the scanned and direct paths
            vectorize=vectorize,
        )
        for vectorize, backend, devices, k in [("vmap", "pmap", 4, 2), ("map", "shard_map", 2, 1)]
    ]
    for k, config in enumerate(CONFIGS):
        params, history = _separate_run(config, train_data, val_data)
        for result in results:
            assert result.results["num_models"] == len(CONFIGS)
            chex.assert_trees_all_close(
                jax.tree.map(lambda x, k=k: x[k], result.state.params), params, atol=1e-5, rtol=1e-5
            )
            run = result.results["runs"][k]
            for mine, theirs in zip(run["history"], history, strict=True):
                for name in sweep.RESULT_COLUMNS:
                    np.testing.assert_allclose(mine[name], theirs[name], atol=1e-5, rtol=1e-5)
    # The two seed-0 configs started from the same weights.
    init = sweep.create_sweep_state(
        _TinyNet(), sweep.complete_configs(CONFIGS, {}), jnp.zeros((1, 6, 6, 1))
    )
    chex.assert_trees_all_equal(
        jax.tree.map(lambda x: x[0], init.params), jax.tree.map(lambda x: x[3], init.params)
    )


def test_sweep_state_matches_create_train_state_bit_for_bit():
    configs = sweep.complete_configs([{"seed": 5, "learning_rate": 0.3, "momentum": 0.1}], {})
    sample = jnp.zeros((1, 6, 6, 1))
    stacked = sweep.create_sweep_state(_TinyNet(), configs, sample, nesterov=True)
    one = train.create_train_state(
        _TinyNet(),
        sweep.make_sweep_tx(configs[0], nesterov=True),
        sample,
        key=sweep.run_keys(5)[0],
    )
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x[0], stacked), one)
    hp = jax.tree.map(lambda x: x[0], stacked.opt_state.hyperparams)
    assert float(hp["learning_rate"]) == pytest.approx(0.3)
    assert float(hp["momentum"]) == pytest.approx(0.1)


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
    result = sweep.run_sweep(
        _TinyNet(),
        _loss,
        configs,
        train_data,
        val_data,
        epochs=2,
        batch_size=BATCH,
        preprocess=_preprocess,
        dp=parallel.make_data_parallel(backend="shard_map", devices=2),
    )
    results = result.results
    # Independent of the sweep's own bookkeeping: evaluate each final model separately.
    dp, params = parallel.make_data_parallel(backend="pmap", devices=1), result.state.params
    evaluation = train.make_evaluation(
        train.make_eval_step(_TinyNet().apply, _loss, preprocess=_preprocess, axis_name="batch"),
        dp,
        *val_data,
        batch_size=16,
    )
    val = [
        train.evaluate(evaluation, dp.replicate(jax.tree.map(lambda x, k=k: x[k], params)))["loss"]
        for k in range(len(configs))
    ]
    expected = int(np.nanargmin(val))
    assert results["best"] == expected
    assert sweep.best(results) is results["runs"][expected]
    np.testing.assert_allclose([r["final"]["val_loss"] for r in results["runs"]], val, rtol=1e-5)
    table = sweep.format_results(results).splitlines()
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
        ("lr=abc", r"--sweep 'lr=abc': 'abc' is not a number"),
        ("learning_rate=abc", r"--sweep 'learning_rate=abc': 'abc' is not a number"),
        ("seed=0:x", r"--sweep 'seed=0:x': '0:x' is not an integer range"),
        ("seed=3:3", r"empty range 3:3"),
        ("seed", r"--sweep 'seed': expected NAME=VALUES"),
        ("batch_size=32,64", r"unknown name 'batch_size'; sweepable: seed, learning_rate"),
        ("l1=inf", r"'inf' is not finite"),
    ],
)
def test_parse_sweep_errors_name_the_flag(spec, message):
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
