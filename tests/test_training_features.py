"""Issue 27 items 1, 4, 5, 6 from `fit`: best checkpoints and early stopping (resumed runs stop
where uninterrupted ones do), throughput and time accounting, the profiler window, and the
training-health metrics, each against a reference."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from jaxnets import adapters, checkpoint, hooks, loop, monitoring, optim, sharding, train, writers
from jaxnets import metrics as jmetrics


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(10)(nn.tanh(nn.Dense(16)(x)))


def _data(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6, 6, 1)).astype(np.float32)
    return {"image": x, "label": rng.integers(0, 10, n).astype(np.int32)}


def _objective():
    return adapters.linen(
        _Net(),
        loss=lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y),
        metrics={"accuracy": jmetrics.accuracy},
    )


TRAIN, VAL = _data(128, 0), _data(64, 1)  # random labels: validation loss rises as it overfits
TX = optax.sgd(0.3, momentum=0.9)


def _state(tx=TX):
    obj = _objective()
    sample = jax.tree.map(lambda x: x[:1], TRAIN)
    return train.create_train_state(obj.init, tx, sample, key=jax.random.key(0))


def _fit(state, epochs, extra, *, k=1, step=None, tx=TX):
    obj = _objective()
    return loop.fit(
        state,
        step or train.make_train_step(obj.loss_fn, tx),
        TRAIN,
        data_key=jax.random.key(1),
        epochs=epochs,
        batch_size=32,
        hooks=[hooks.Evaluate(train.make_eval_step(obj.eval_fn), VAL, batch_size=32), *extra],
        mesh=sharding.make_mesh(1),
        steps_per_call=k,
    )


class _Records:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)

    def close(self):
        pass


def _stopper():
    return hooks.EarlyStopping("val_loss", mode="min", patience=2)


@pytest.mark.slow
def test_best_checkpoints_and_early_stopping_resume_where_uninterrupted_stops(tmp_path):
    """An uninterrupted run stops at epoch E; a run saved at E-1 (one bad epoch counted) and
    resumed stops at E too, with the same parameters; the best 2 by val_loss are kept."""
    epochs = 30
    ckpt_a = checkpoint.Checkpointer(
        tmp_path / "a", max_to_keep=1, best_metric="val_loss", keep_best=2, async_save=False
    )
    stop_a = _stopper()
    res_a = _fit(_state(), epochs, [stop_a, hooks.Checkpoint(ckpt_a)])
    stopped_at = len(res_a.history)
    assert res_a.stopped_early and stopped_at < epochs, res_a.history
    assert stop_a.stopped_epoch == stopped_at and stop_a.wait == 2
    # Best-N next to the latest: the two lowest val_loss epochs and the last one.
    val = {r["step"]: r["val_loss"] for r in res_a.history}
    best = sorted(val, key=val.get)[:2]
    assert ckpt_a.all_steps() == sorted({*best, res_a.history[-1]["step"]})
    assert ckpt_a.best_step() == best[0]
    assert ckpt_a.metrics(best[0])["val_loss"] == pytest.approx(val[best[0]])
    ckpt_a.close()

    # Interrupted after epoch E-1, where early stopping has counted one bad epoch.
    ckpt_b = checkpoint.Checkpointer(tmp_path / "b", async_save=False)
    stop_b = _stopper()
    _fit(_state(), stopped_at - 1, [stop_b, hooks.Checkpoint(ckpt_b)])
    assert stop_b.wait == 1 and stop_b.stopped_epoch is None
    state, meta, step = ckpt_b.restore(_state())
    assert meta["hooks"]["early_stopping"]["wait"] == 1
    stop_resumed = _stopper()
    resumed = _fit(
        state,
        epochs,
        [stop_resumed, hooks.Checkpoint(ckpt_b, position=meta["data"], hook_state=meta["hooks"])],
    )
    assert resumed.stopped_early and [r["epoch"] for r in resumed.history] == [stopped_at]
    assert stop_resumed.checkpoint_state() == stop_a.checkpoint_state()
    for x, y in zip(jax.tree.leaves(res_a.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # Resuming a run that stopped early trains no further.
    state, meta, _ = ckpt_b.restore(_state())
    again = _fit(state, epochs, [_stopper(), hooks.Checkpoint(ckpt_b, hook_state=meta["hooks"])])
    assert again.stopped_early and again.history == []
    assert int(again.state.step) == int(res_a.state.step)
    ckpt_b.close()


def test_early_stopping_names_a_missing_metric():
    with pytest.raises(ValueError, match="'val_acc'.*val_accuracy"):
        _fit(_state(), 1, [hooks.EarlyStopping("val_acc", mode="max")])
    with pytest.raises(ValueError, match="patience"):
        hooks.EarlyStopping(patience=0)


def _norm(tree):
    return np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize("inject", [False, True])
def test_health_metrics_match_numpy_norms_and_the_schedule(inject):
    schedule = optim.inverse_time_decay(0.1, 0.5)
    if inject:
        tx = optax.inject_hyperparams(optax.sgd)(learning_rate=schedule, momentum=0.9)
    else:
        tx = optax.sgd(schedule, momentum=0.9)
    obj, state = _objective(), _state(tx)
    step = jax.jit(
        train.make_train_step(
            obj.loss_fn, tx, health=True, learning_rate=None if inject else schedule
        )
    )
    batch = jax.tree.map(lambda x: x[:32], TRAIN)
    for i in range(3):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        grads = jax.grad(lambda p, s=state, k=key: obj.loss_fn(p, s.model_state, batch, k)[0])(
            state.params
        )
        state, m = step(state, batch)
        np.testing.assert_allclose(float(m["grad_norm"].compute()), _norm(grads), rtol=1e-5)
        np.testing.assert_allclose(float(m["param_norm"].compute()), _norm(state.params), rtol=1e-5)
        np.testing.assert_allclose(float(m["learning_rate"].compute()), 0.1 / (1 + 0.5 * i), 1e-6)


def test_skip_nonfinite_keeps_the_state_and_counts_the_step():
    obj, state = _objective(), _state()
    step = jax.jit(train.make_train_step(obj.loss_fn, TX, health=True, skip_nonfinite=True))
    batch = jax.tree.map(lambda x: x[:32], TRAIN)
    bad = {**batch, "image": batch["image"].copy()}
    bad["image"][3] = np.nan
    after, m = step(state, bad)
    assert float(m["skipped"].compute()) == 1.0 and not np.isfinite(m["grad_norm"].compute())
    assert int(after.step) == 1
    for x, y in zip(
        jax.tree.leaves((state.params, state.opt_state)),
        jax.tree.leaves((after.params, after.opt_state)),
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    good, m = step(after, batch)
    assert float(m["skipped"].compute()) == 0.0 and _norm(good.params) != _norm(after.params)


def test_health_reaches_the_log_as_window_means():
    sink = _Records()
    obj = _objective()
    step = train.make_train_step(obj.loss_fn, TX, health=True, learning_rate=0.3)
    _fit(_state(), 1, [hooks.Log(sink, every_steps=2)], step=step)
    first = sink.records[0]
    assert first["learning_rate"] == pytest.approx(0.3) and first["grad_norm"] > 0
    assert first["param_norm"] > 0


class _Slow(hooks.Hook):
    """Sleeps at each epoch's end, its time counted as evaluation."""

    at_epoch_end, timer = True, "evaluation"

    def __call__(self, ctx):
        import time

        time.sleep(0.25)


def test_throughput_rates_flops_and_time_accounting(tmp_path):
    sink, tb = _Records(), writers.TensorBoardWriter(tmp_path / "tb")
    meter = monitoring.Throughput(every_steps=2)
    res = _fit(_state(), 2, [meter, _Slow(), hooks.Log(sink, tb, every_steps=2)], k=1)
    windows = [r for r in sink.records if r["kind"] == "train"]
    assert [r["step"] for r in windows] == [2, 4, 6, 8]
    for r in windows:
        assert r["steps_per_second"] > 0
        assert r["examples_per_second"] == pytest.approx(32 * r["steps_per_second"])
        assert r["flops_per_second"] == pytest.approx(meter.flops_per_step * r["steps_per_second"])
        assert "mfu" not in r  # CPU: no peak
    # FLOPs per step: XLA's own count of the one-step program, near a hand count.
    obj = _objective()
    batch = jax.tree.map(lambda x: x[:32], TRAIN)
    single = jax.jit(train.make_train_step(obj.loss_fn, TX)).lower(_state(), batch).compile()
    assert meter.flops_per_step == pytest.approx(monitoring.cost_flops(single), rel=0.05)
    # By hand: the matmuls, forward (x W1, h W2) and backward (dW1, dW2, dh: no dx), at 2
    # FLOPs per multiply-add; XLA adds the elementwise work (tanh, softmax, SGD).
    matmuls = 2 * 32 * (2 * 36 * 16 + 3 * 16 * 10)
    assert matmuls <= meter.flops_per_step <= 1.3 * matmuls
    # Time: the components and the rest sum to the total; the sleeping hook is evaluation.
    last = res.history[-1]
    parts = [last[f"seconds_{k}"] for k in (*monitoring.COMPONENTS, "other")]
    assert min(parts) >= 0 and sum(parts) == pytest.approx(last["seconds_total"], rel=1e-6)
    assert last["seconds_compile"] > 0 and last["seconds_device"] > 0
    total = meter.summary()  # at the end: both sleeps (the record came before the last)
    assert last["seconds_evaluation"] >= 0.25 and total["seconds_evaluation"] >= 0.5
    assert last["seconds_evaluation"] <= total["seconds_evaluation"] - 0.25
    assert total["seconds_evaluation"] < 0.5 + total["seconds_total"] / 2
    assert total["seconds_total"] >= last["seconds_total"]
    # Evaluation time is not training time: the run's rate is above steps / total seconds.
    assert total["steps_per_second"] > 8 / total["seconds_total"]
    scalars = writers.read_tensorboard_scalars(tmp_path / "tb")
    assert set(scalars["train/steps_per_second"]) == {2, 4, 6, 8}
    assert scalars["epoch/seconds_evaluation"][8] == pytest.approx(last["seconds_evaluation"])


def test_mfu_against_a_known_peak():
    device = jax.devices()[0]
    assert monitoring.peak_flops(device) is None  # CPU
    meter = monitoring.Throughput(every_steps=4, flops_per_step=1e6, peak_flops_per_device=1e9)
    sink = _Records()
    _fit(_state(), 1, [meter, hooks.Log(sink, every_steps=4)])
    r = sink.records[0]
    assert r["mfu"] == pytest.approx(1e6 * r["steps_per_second"] / 1e9)

    class _Device:
        platform, device_kind = "gpu", "NVIDIA H100 80GB HBM3"

    assert monitoring.peak_flops(_Device()) == 989e12


def test_profile_window_writes_a_trace(tmp_path):
    prof = monitoring.Profile(tmp_path / "profile", steps=(2, 4))
    _fit(_state(), 1, [prof], k=1)
    assert prof.traced == (2, 4)
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0
    assert monitoring.parse_steps("20:30") == (20, 30) and monitoring.parse_steps("") is None
    with pytest.raises(ValueError, match="a < b"):
        monitoring.Profile(tmp_path, steps=(3, 3))


@pytest.mark.slow
def test_the_experiment_flags(tmp_path):
    """mnist_cnn with --health --keep-best 1 --best-metric val_accuracy --best-mode max
    --early-stop-patience 1 --early-stop-min-delta 1 (no epoch can improve by 1: stops after
    the second) --profile-steps 2:4; running it again trains no further."""
    import dataclasses
    import json

    from experiments import mnist_cnn
    from jaxnets import cli

    config = dataclasses.replace(
        mnist_cnn.get_config(),
        dataset="mnist_sample",
        limit_train=400,
        batch_size=40,
        epochs=4,
        devices=2,
        log_every_steps=4,
        steps_per_dispatch=1,
        progress=False,
        checkpoint_every_minutes=0.0,
        workdir=str(tmp_path / "run"),
        health=True,
        keep_best=1,
        best_metric="val_accuracy",
        best_mode="max",
        early_stop_patience=1,
        early_stop_min_delta=1.0,
        profile_steps="2:4",
    )
    summary = mnist_cnn.main(config)
    assert summary["stopped_early"] and summary["epochs_completed"] == 2
    assert cli.exit_status(summary) == 0
    assert summary["early_stopping"]["stopped_epoch"] == 2
    records = writers.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    epochs = [r for r in records if r["kind"] == "epoch"]
    best = max(epochs, key=lambda r: r["val_accuracy"])
    assert summary["best_checkpoint"] == {
        "step": best["step"],
        "val_accuracy": best["val_accuracy"],
    }
    window = next(r for r in records if r["kind"] == "train")
    assert window["learning_rate"] == pytest.approx(
        0.05 / (1 + 1e-6 * 1.5), rel=1e-6
    )  # counts 0..3
    assert window["grad_norm"] > 0 and window["param_norm"] > 0 and window["steps_per_second"] > 0
    t = summary["throughput"]
    assert t["seconds_total"] > t["seconds_compile"] > 0 and t["examples_per_second"] > 0
    assert list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["throughput"]["seconds_total"] == pytest.approx(t["seconds_total"])
    again = mnist_cnn.main(config)
    assert again["stopped_early"] and again["step"] == summary["step"]
    assert again["params_sha256"] == summary["params_sha256"]
