"""The open engine: Linen/NNX adapters, model state, randomness, losses, metrics, devices."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxnets import (
    adapters,
    checkpoint,
    hooks,
    loop,
    losses,
    metrics,
    sharding,
    train,
    writers,
)


class _BnDropNet(nn.Module):
    """Conv -> BatchNorm -> Dropout -> Dense, no axis name: the global batch's statistics."""

    dropout: float = 0.5

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(4, (3, 3), use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.8)(x)
        x = nn.relu(x).reshape(x.shape[0], -1)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(3)(x)


def _images(n=64, seed=0, shape=(6, 5, 2)):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *shape)).astype(np.float32) + 2.0  # mean 2: BatchNorm has work
    return {"image": x, "label": (x.reshape(n, -1).sum(-1) > 2.0 * x[0].size).astype(np.int32)}


def _ce(logits, y):
    return losses.softmax_cross_entropy(logits, y, reduction="none")


def _linen(dropout=0.5):
    return adapters.linen(_BnDropNet(dropout), loss=_ce, metrics={"accuracy": metrics.accuracy})


TX = optax.sgd(0.05, momentum=0.9)


class _StopAfter(hooks.Hook):
    """Asks to stop at the n-th poll (a stand-in for SIGTERM)."""

    def __init__(self, n):
        self.n, self.polls = n, 0

    def should_stop(self, ctx):
        self.polls += 1
        return self.polls >= self.n


def _fit(objective, data, *, devices=1, epochs=2, k=2, state=None, **kw):
    if state is None:
        sample = jax.tree.map(lambda x: x[:1], data)
        state = train.create_train_state(objective.init, TX, sample, key=jax.random.key(0))
    step = train.make_train_step(objective.loss_fn, TX)
    return loop.fit(
        state,
        step,
        data,
        data_key=jax.random.key(1),
        epochs=epochs,
        batch_size=16,
        mesh=sharding.make_mesh(devices),
        steps_per_call=k,
        **kw,
    )


def _close(a, b, tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


@pytest.mark.compat
def test_batchnorm_statistics_train_and_are_used_at_eval():
    data = _images()
    objective = _linen(dropout=0.0)
    result = _fit(objective, data, epochs=2)
    stats = result.state.model_state["batch_stats"]["BatchNorm_0"]
    assert np.all(np.abs(np.asarray(stats["mean"])) > 0.1)  # moved from their init (0)
    # Eval uses the running statistics: equal to the module with use_running_average.
    variables = {"params": result.state.params, **result.state.model_state}
    want = _BnDropNet(0.0).apply(variables, data["image"], train=False)
    ev = objective.eval_fn(result.state.params, result.state.model_state, data, np.ones(64, bool))
    np.testing.assert_allclose(
        float(ev["loss"].compute()), float(_ce(want, data["label"]).mean()), rtol=1e-5
    )
    _, init_state = objective.init(jax.random.key(0), data)
    untrained_stats = {"params": result.state.params, **init_state}
    assert not np.allclose(
        want, _BnDropNet(0.0).apply(untrained_stats, data["image"], train=False), atol=1e-3
    )


def test_dropout_differs_between_steps_and_is_off_at_eval():
    data = _images(16)
    objective = _linen(dropout=0.5)
    params, model_state = objective.init(jax.random.key(0), data)
    loss_at = lambda key: float(objective.loss_fn(params, model_state, data, key)[0])
    a, b = loss_at(jax.random.key(1)), loss_at(jax.random.key(2))
    assert a != b and loss_at(jax.random.key(1)) == a  # a pure function of the key
    # Through the step: the key of step s is fold_in(key, s).
    state = train.create_train_state(objective.init, optax.sgd(0.0), data, key=jax.random.key(3))
    step = jax.jit(train.make_train_step(objective.loss_fn, optax.sgd(0.0)))
    _, m1 = step(state, data)
    _, m2 = step(state._replace(step=state.step + 1), data)
    assert float(m1["loss"].compute()) != float(m2["loss"].compute())
    mask = np.ones(16, bool)
    e1 = objective.eval_fn(params, model_state, data, mask)["loss"].compute()
    e2 = objective.eval_fn(params, model_state, data, mask)["loss"].compute()
    no_drop = _BnDropNet(0.5).apply({"params": params, **model_state}, data["image"], train=False)
    assert float(e1) == float(e2) == pytest.approx(float(_ce(no_drop, data["label"]).mean()))


@pytest.mark.compat
def test_regression_logged_loss_is_the_true_mean_and_custom_metric_is_everywhere(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 3)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5]], np.float32) + 0.1).astype(np.float32)  # [N, 1]
    data = {"image": x, "label": y}

    def within(pred, target, mask):  # a user's own metric: per-example values
        return jnp.abs(pred - target)[:, 0] < 0.5

    objective = adapters.linen(
        nn.Dense(1),
        loss=lambda p, t: losses.mean_squared_error(p, t, reduction="none"),
        metrics={"mae": metrics.mean_absolute_error, "within_half": within},
    )
    records = []
    jsonl = writers.JsonlWriter(tmp_path / "metrics.jsonl")
    tb = writers.TensorBoardWriter(tmp_path / "tb")

    class Keep:
        write, close = records.append, lambda self=None: None

    state = train.create_train_state(objective.init, TX, data, key=jax.random.key(0))
    tx = optax.sgd(0.01)
    result = loop.fit(
        state,
        train.make_train_step(objective.loss_fn, tx),
        data,
        data_key=jax.random.key(1),
        epochs=1,
        batch_size=96,
        hooks=[
            hooks.Evaluate(train.make_eval_step(objective.eval_fn), data, batch_size=40),
            hooks.Log(Keep(), jsonl, tb, every_steps=1),
        ],
        steps_per_call=1,
    )
    # The one step's logged loss is the mean of the per-example losses at the initial params.
    pred0 = np.asarray(nn.Dense(1).apply({"params": state.params}, x))
    first = records[0]
    np.testing.assert_allclose(first["loss"], np.mean((pred0 - y) ** 2), rtol=1e-6)
    np.testing.assert_allclose(first["mae"], np.mean(np.abs(pred0 - y)), rtol=1e-6)
    np.testing.assert_allclose(first["within_half"], np.mean(np.abs(pred0 - y) < 0.5))
    # Eval (40 + 40 + 16 padded examples) counts each example once.
    pred1 = np.asarray(nn.Dense(1).apply({"params": result.state.params}, x))
    epoch = result.history[-1]
    np.testing.assert_allclose(epoch["val_loss"], np.mean((pred1 - y) ** 2), rtol=1e-5)
    np.testing.assert_allclose(epoch["val_within_half"], np.mean(np.abs(pred1 - y) < 0.5))
    assert "accuracy" not in epoch
    logged = writers.read_jsonl(tmp_path / "metrics.jsonl")
    assert logged[0]["within_half"] == first["within_half"]
    assert logged[-1]["val_within_half"] == epoch["val_within_half"]
    scalars = writers.read_tensorboard_scalars(tmp_path / "tb")
    assert scalars["train/within_half"][1] == pytest.approx(first["within_half"])
    assert scalars["epoch/val_within_half"][1] == pytest.approx(epoch["val_within_half"])


def test_class_weighted_loss_through_the_step_is_torchs_weighted_mean():
    """torch.nn.CrossEntropyLoss(weight=w): sum_i w[y_i] * nll_i / sum_i w[y_i]."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 4)).astype(np.float32)
    y = np.array([0, 1, 2, 2, 2, 1, 0, 2, 2, 1, 2, 2], np.int32)
    w = np.array([3.0, 1.0, 0.25], np.float32)
    objective = adapters.linen(
        nn.Dense(3), loss=lambda z, t: losses.softmax_cross_entropy(z, t, class_weights=w)
    )
    data = {"image": x, "label": y}
    state = train.create_train_state(objective.init, optax.sgd(0.1), data, key=jax.random.key(0))
    params = state.params
    logits = np.asarray(nn.Dense(3).apply({"params": params}, x), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -logp[np.arange(12), y]
    want = np.sum(w[y] * nll) / np.sum(w[y])
    assert not np.isclose(want, nll.mean(), rtol=1e-2)  # the weighting matters here
    _, m = jax.jit(train.make_train_step(objective.loss_fn, optax.sgd(0.1)))(state, data)
    np.testing.assert_allclose(float(m["loss"].compute()), want, rtol=1e-6)
    # The gradient is that of the weighted mean too (not of a re-averaged per-example loss).
    g = jax.grad(lambda p: objective.loss_fn(p, {}, data, jax.random.key(0))[0])(params)
    ref = jax.grad(
        lambda p: losses.softmax_cross_entropy(
            nn.Dense(3).apply({"params": p}, x), y, class_weights=w
        )
    )(params)
    _close(g, ref, 1e-6)


def test_penalty_on_params_is_added_and_reported():
    data = _images(16, shape=(4,))
    rate = 0.3
    objective = adapters.linen(
        nn.Dense(3),
        loss=_ce,
        penalty=lambda p: rate * sum(jnp.sum(jnp.square(v)) for v in jax.tree.leaves(p)),
    )
    params, _ = objective.init(jax.random.key(0), data)
    loss, (m, _) = objective.loss_fn(params, {}, data, jax.random.key(0))
    plain = _ce(nn.Dense(3).apply({"params": params}, data["image"]), data["label"]).mean()
    l2 = rate * sum(float(np.sum(np.square(v))) for v in jax.tree.leaves(params))
    np.testing.assert_allclose(float(loss), float(plain) + l2, rtol=1e-6)
    np.testing.assert_allclose(float(m["loss"].compute()), float(plain), rtol=1e-6)
    np.testing.assert_allclose(float(m["penalty"].compute()), l2, rtol=1e-6)


@pytest.mark.slow
def test_batchnorm_dropout_model_on_8_devices_equals_1_and_fsdp_equals_replicated():
    data = _images(64)
    objective = _linen(dropout=0.5)
    one = _fit(objective, data, devices=1)
    eight = _fit(objective, data, devices=8)
    fsdp = _fit(objective, data, devices=8, rule=sharding.fsdp(min_bytes=256))
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(fsdp.state.params))
    _close(eight.state, one.state, 1e-5)
    _close(fsdp.state, eight.state, 1e-6)
    for name in ("loss", "accuracy"):
        assert eight.history[-1][name] == pytest.approx(one.history[-1][name], abs=1e-5)


@pytest.mark.slow
def test_batchnorm_dropout_model_resumes_bit_for_bit(tmp_path):
    """Stopped mid-epoch, saved, restored by a new Checkpointer, resumed == uninterrupted."""
    data = _images(64)
    objective = _linen(dropout=0.5)
    full = _fit(objective, data, devices=2, epochs=2, k=2)
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:

        def save(step, state):
            ckpt.save(step, state, metadata={})

        part = _fit(
            objective,
            data,
            devices=2,
            epochs=2,
            k=2,
            hooks=[hooks.Periodic(save, every_steps=5, on_stop=True), _StopAfter(3)],
        )
    assert part.stopped_early and int(part.state.step) == 6  # mid-epoch (4 steps per epoch)
    sample = jax.tree.map(lambda x: x[:1], data)
    fresh = train.create_train_state(objective.init, TX, sample, key=jax.random.key(9))
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        restored, _, step = ckpt.restore(fresh)
    assert step == 6
    resumed = _fit(objective, data, devices=2, epochs=2, k=2, state=restored)
    for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(full.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _NnxNet(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(10, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, momentum=0.8, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(nnx.relu(self.bn(self.linear(x.reshape(x.shape[0], -1))))))


@pytest.mark.slow
def test_nnx_model_trains_evaluates_and_resumes(tmp_path):
    data = _images(64, shape=(5, 2))
    module = _NnxNet(rngs=nnx.Rngs(0))
    before = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    objective = adapters.nnx(module, loss=_ce, metrics={"accuracy": metrics.accuracy})
    full = _fit(objective, data, epochs=3)
    assert full.history[-1]["loss"] < full.history[0]["loss"]
    stats = full.state.model_state["bn"]
    assert np.abs(np.asarray(stats["mean"])).max() > 0.1
    # The module passed in is unchanged (the adapter works on copies).
    _close(nnx.to_pure_dict(nnx.state(module, nnx.Param)), before, 0)
    # Eval: the module in eval mode (running statistics, no dropout) with the trained state.
    ev = objective.eval_fn(full.state.params, full.state.model_state, data, np.ones(64, bool))
    trained = nnx.clone(module)
    nnx.update(trained, full.state.params, full.state.model_state)
    trained.eval()
    want = _ce(trained(data["image"]), data["label"]).mean()
    np.testing.assert_allclose(float(ev["loss"].compute()), float(want), rtol=1e-5)
    # Checkpoint after 1 epoch, restore into a fresh state, resume: equal bit for bit.
    one = _fit(objective, data, epochs=1)
    with checkpoint.Checkpointer(tmp_path / "ckpt", async_save=False) as ckpt:
        ckpt.save(int(one.state.step), one.state, metadata={})
        sample = jax.tree.map(lambda x: x[:1], data)
        fresh = train.create_train_state(objective.init, TX, sample, key=jax.random.key(5))
        restored, _, _ = ckpt.restore(fresh)
    resumed = _fit(objective, data, epochs=3, state=restored)
    for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(full.state), strict=True):
        np.testing.assert_array_equal(_bits(a), _bits(b))


def _bits(x):
    """The data of an array, PRNG keys (an NNX module's rng streams) as their raw words."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def test_a_plain_function_of_a_params_pytree_is_a_loss_function():
    """No module: `loss_fn(params, model_state, batch, key)` by hand (the two-layer net)."""
    x = np.array([[0, 0, 1], [0, 1, 1], [1, 0, 1], [1, 1, 1]], np.float32)
    y = np.array([[0], [1], [1], [0]], np.float32)

    def loss_fn(params, model_state, batch, key):
        out = jax.nn.sigmoid(jax.nn.sigmoid(batch["x"] @ params["w1"]) @ params["w2"])
        sse = jnp.sum((batch["y"] - out) ** 2)
        return sse, ({"sse": metrics.Mean.from_scalar(sse)}, model_state)

    params = {"w1": jnp.full((3, 4), 0.5), "w2": jnp.full((4, 1), 0.5)}
    state = train.create_train_state(params, optax.sgd(1.0), key=jax.random.key(0))
    assert state.model_state == {}
    step = jax.jit(train.make_train_step(loss_fn, optax.sgd(1.0)))
    new, m = step(state, {"x": x, "y": y})
    g = jax.grad(lambda p: loss_fn(p, {}, {"x": x, "y": y}, None)[0])(params)
    _close(new.params, jax.tree.map(lambda p, d: p - d, params, g), 1e-6)
    assert float(m["sse"].compute()) == pytest.approx(
        float(loss_fn(params, {}, {"x": x, "y": y}, None)[0])
    )


def test_adapter_errors_name_the_fix():
    data = _images(8)
    with pytest.raises(KeyError, match=r"no 'pixels' \(inputs\); it has \['image', 'label'\]"):
        adapters.linen(nn.Dense(3), loss=_ce, inputs="pixels").init(jax.random.key(0), data)
    bad = adapters.linen(nn.Dense(3), loss=lambda z, t: jnp.zeros((2, 2)))
    params, _ = bad.init(jax.random.key(0), data)
    with pytest.raises(ValueError, match=r"the loss returned shape \(2, 2\); return per-example"):
        bad.loss_fn(params, {}, data, jax.random.key(0))
    with pytest.raises(ValueError, match="metric name 'loss' is reserved"):
        adapters.linen(nn.Dense(3), loss=_ce, metrics={"loss": metrics.accuracy})
    with pytest.raises(TypeError, match="key must be a PRNG key"):
        train.create_train_state({"w": jnp.ones(2)}, TX, key=1)


def test_metrics_are_mergeable_sums_against_numpy():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(20, 5)).astype(np.float32)
    labels = rng.integers(0, 5, 20)
    mask = np.arange(20) < 17
    top3 = metrics.top_k_accuracy(3)(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
    ranks = (logits > logits[np.arange(20), labels][:, None]).sum(-1)
    assert float(top3.compute()) == pytest.approx(np.mean((ranks < 3)[mask]))
    a = metrics.accuracy(logits[:10], labels[:10])
    b = metrics.accuracy(logits[10:], labels[10:])
    assert float(metrics.merge(a, b).compute()) == pytest.approx(
        np.mean(logits.argmax(-1) == labels)
    )
    one_hot = np.eye(5, dtype=np.float32)[labels]
    assert float(metrics.accuracy(logits, one_hot).compute()) == float(a.total + b.total) / 20
    pred, target = rng.normal(size=(6, 2)), rng.normal(size=(6, 2))
    mse = metrics.mean_squared_error(pred, target)
    assert float(mse.compute()) == pytest.approx(np.mean((pred - target) ** 2), rel=1e-6)
    with pytest.raises(ValueError, match=r"predictions \(6, 2\) and targets \(6,\) differ"):
        metrics.mean_absolute_error(pred, target[:, 0])
    bf16 = metrics.Mean.from_values(jnp.full((1000,), 0.23, jnp.bfloat16))
    assert bf16.total.dtype == jnp.float32  # sums never in the model's low precision
