"""The training engine: steps, the chunk iterator, fit and its hooks, over fake CPU devices."""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnets import (
    adapters,
    dispatch,
    evaluation,
    hooks,
    indices,
    loop,
    metrics,
    pmap,
    programs,
    sharding,
    train,
)


class _TinyNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(10)(nn.tanh(nn.Dense(16)(x)))


def _data(n=256, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 6, 6, 1), dtype=np.uint8), rng.integers(0, 10, n).astype(
        np.int32
    )


def _loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _preprocess(images, *, keys):
    x = images.astype(jnp.float32) / 255.0
    if keys is not None:  # a random, per-example perturbation: exercises the key plumbing
        x = x + 0.01 * jax.vmap(lambda k: jax.random.normal(k, x.shape[1:]))(keys)
    return x


TX = optax.sgd(0.1, momentum=0.9, nesterov=True)


def _objective(loss=_loss, model=None):
    return adapters.linen(
        model or _TinyNet(),
        loss=loss,
        metrics={"accuracy": metrics.accuracy},
        preprocess=_preprocess,
    )


def _batch(images, labels):
    return {"image": images, "label": labels}


class _Records:
    """A Log sink keeping the records."""

    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)

    def close(self):
        pass


class _Stop(hooks.Hook):
    """Asks to stop at the `after`-th poll (a stand-in for SIGTERM); `tick` runs each poll."""

    def __init__(self, after=None, tick=None):
        self.after, self.tick, self.polls = after, tick, 0

    def should_stop(self, ctx):
        self.polls += 1
        if self.tick is not None:
            self.tick()
        return self.after is not None and self.polls >= self.after


def _run(
    devices=1,
    k=1,
    epochs=2,
    batch=32,
    data=None,
    extra=(),
    state=None,
    tx=TX,
    evaluate=True,
    loss=_loss,
    nonfinite="raise",
    workdir=None,
    train_input="auto",
    train_data=None,
    rule=sharding.replicated,
    model=None,
):
    images, labels = data if data is not None else _data()
    mesh = sharding.make_mesh(devices)
    objective = _objective(loss, model)
    if state is None:
        state = train.create_train_state(
            objective.init, tx, _batch(images[:1], labels[:1]), key=jax.random.key(0)
        )
    step = train.make_train_step(objective.loss_fn, tx)
    fit_hooks = [hooks.NonFinite(nonfinite)] if nonfinite else []
    if evaluate:
        eval_step = train.make_eval_step(_objective(model=model).eval_fn)
        fit_hooks.append(
            hooks.Evaluate(eval_step, _batch(images[:50], labels[:50]), batch_size=batch)
        )
    result = loop.fit(
        state,
        step,
        _batch(images, labels) if train_data is None else train_data,
        data_key=jax.random.key(1),
        epochs=epochs,
        batch_size=batch,
        hooks=[*fit_hooks, *extra],
        mesh=mesh,
        rule=rule,
        input=train_input,
        steps_per_call=k,
        workdir=workdir,
    )
    return sharding.to_host(result.state), result


def _assert_close(a, b, rtol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=rtol)


def test_one_device_step_matches_hand_written_sgd():
    """One step of the engine == value_and_grad + optax by hand on the same batch."""
    images, labels = _data(32)
    model = _TinyNet()
    x = images.astype(jnp.float32) / 255.0
    objective = adapters.linen(model, loss=_loss, metrics={"accuracy": metrics.accuracy})
    state = train.create_train_state(objective.init, TX, _batch(x, labels), key=jax.random.key(0))
    step = jax.jit(train.make_train_step(objective.loss_fn, TX))
    new_state, m = step(state, _batch(x, labels))

    def loss_of(p):
        return _loss(model.apply({"params": p}, x), labels).mean()

    loss, grads = jax.value_and_grad(loss_of)(state.params)
    updates, _ = TX.update(grads, TX.init(state.params), state.params)
    _assert_close(new_state.params, optax.apply_updates(state.params, updates), 1e-6)
    assert int(new_state.step) == 1 and float(m["loss"].count) == 32
    np.testing.assert_allclose(float(m["loss"].compute()), float(loss), rtol=1e-6)
    np.testing.assert_allclose(
        float(m["accuracy"].compute()),
        np.mean(np.argmax(model.apply({"params": state.params}, x), -1) == labels),
    )


@pytest.mark.parametrize("devices", [2, 8])
def test_n_devices_equal_one_device(devices):
    ref, _ = _run(devices=1, epochs=3)  # 24 steps
    got, _ = _run(devices=devices, epochs=3)
    assert int(got.step) == int(ref.step) == 24
    _assert_close(got.params, ref.params, 1e-5)


class _DropoutBatchNormNet(nn.Module):
    """BatchNorm and Dropout with no axis name: the global batch's statistics and mask."""

    hidden: int = 32

    @nn.compact
    def __call__(self, x, train: bool):
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(self.hidden)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.Dropout(0.3, deterministic=not train)(nn.relu(x))
        return nn.Dense(10)(x)


def test_one_and_eight_devices_agree_with_dropout_and_batchnorm():
    """The step is a function of the global batch: the dropout mask and BatchNorm statistics
    do not depend on the device count (and dropout is really on: the masks differ per step)."""
    model = _DropoutBatchNormNet()
    ref, r1 = _run(devices=1, epochs=2, model=model)
    got, r8 = _run(devices=8, epochs=2, model=model)
    _assert_close(got.params, ref.params, 1e-5)
    _assert_close(got.model_state, ref.model_state, 1e-5)
    assert r8.history[-1]["val_loss"] == pytest.approx(r1.history[-1]["val_loss"], rel=1e-5)
    # Dropout changes the numbers (it is not silently off).
    objective = _objective(model=model)
    images, labels = _data(32)
    state = train.create_train_state(
        objective.init, TX, _batch(images, labels), key=jax.random.key(0)
    )
    loss_a = objective.loss_fn(
        state.params, state.model_state, _batch(images, labels), jax.random.key(1)
    )[0]
    loss_b = objective.loss_fn(
        state.params, state.model_state, _batch(images, labels), jax.random.key(2)
    )[0]
    assert float(loss_a) != float(loss_b)


def test_fsdp_equals_replicated_with_an_eighth_of_the_state_per_device(tmp_path):
    """FSDP on 8 devices: the replicated run's numbers, 1/8 of params + optimiser state per
    device (the arrays' own shard sizes); its checkpoint restores onto 1 device and onto 4."""
    model = _DropoutBatchNormNet(hidden=512)
    rule = sharding.fsdp(min_bytes=2**10)
    replicated, rep = _run(devices=8, epochs=1, model=model)
    sharded, fs = _run(devices=8, epochs=1, model=model, rule=rule)
    _assert_close(sharded.params, replicated.params, 1e-6)
    _assert_close(sharded.model_state, replicated.model_state, 1e-6)
    kernel = fs.state.params["Dense_0"]["kernel"]  # [36, 512]: split along 512
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, sharding.DATA)
    rep_bytes = sharding.per_device_bytes((rep.state.params, rep.state.opt_state))
    fs_bytes = sharding.per_device_bytes((fs.state.params, fs.state.opt_state))
    assert fs_bytes < 1.02 * rep_bytes / 8, (fs_bytes, rep_bytes)
    from jaxnets import checkpoint

    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(int(sharded.step), fs.state, metadata={})
    for devices, target_rule in [(1, sharding.replicated), (4, rule)]:
        mesh = sharding.make_mesh(devices)
        target = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            sharded,
            sharding.state_shardings(sharded, mesh, target_rule),
        )
        with checkpoint.Checkpointer(tmp_path / "ckpt", read_only=True) as ckpt:
            restored, _, _ = ckpt.restore(target)
        got = restored.params["Dense_0"]["kernel"]
        assert len(got.sharding.device_set) == devices
        assert got.addressable_shards[0].data.shape == (36, 512 // devices)
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(sharded)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_pmap_adapter_equals_the_jit_path():
    """The mission's pmapped step (per-device code, the only axis name) gives the jitted
    global step's numbers, per-example keys included."""
    images, labels = _data(64)
    objective = _objective()
    state = train.create_train_state(
        objective.init, TX, _batch(images[:1], labels[:1]), key=jax.random.key(0)
    )
    idx = indices.epoch_indices(jax.random.key(1), 0, 64, 16)  # 4 steps of 16
    batches = _batch(images[idx], labels[idx])
    run = pmap.pmapped_steps(pmap.make_train_step(objective.loss_fn, TX), devices=jax.devices()[:4])
    got, got_metrics = run(state, batches)
    mesh = sharding.make_mesh(4)
    shardings = sharding.state_shardings(state, mesh)
    jit_run = programs.make_stream_program(
        train.make_train_step(objective.loss_fn, TX), mesh, shardings
    )
    want, want_metrics = jit_run(
        sharding.place(state, shardings), sharding.place_columns(mesh, batches)
    )
    _assert_close(got.params, jax.device_get(want.params), 1e-6)
    np.testing.assert_allclose(
        got_metrics["loss"].total, np.asarray(want_metrics["loss"].total), rtol=1e-6
    )


def test_scanned_chunks_equal_single_steps():
    single, _ = _run(k=1)
    scanned, _ = _run(k=8)
    _assert_close(scanned.params, single.params, 1e-6)


def test_same_seed_is_bit_identical():
    a, _ = _run(devices=2)
    b, _ = _run(devices=2)
    assert train.params_sha256(a.params) == train.params_sha256(b.params)
    c, _ = _run(devices=2, data=_data(seed=1))
    assert train.params_sha256(c.params) != train.params_sha256(a.params)


def test_resume_mid_epoch_is_bit_identical():
    full, _ = _run(devices=2, epochs=2)
    part, res = _run(devices=2, epochs=2, extra=[_Stop(after=3)])
    assert res.stopped_early and int(part.step) == 3
    resumed, _ = _run(devices=2, epochs=2, state=part)
    assert train.params_sha256(resumed.params) == train.params_sha256(full.params)
    np.testing.assert_array_equal(np.asarray(resumed.key), np.asarray(full.key))


def test_history_and_logs():
    sink = _Records()
    _, res = _run(epochs=2, extra=[hooks.Log(sink, every_steps=4)])
    assert [r["epoch"] for r in res.history] == [1, 2]
    train_steps = [r["step"] for r in sink.records if r["kind"] == "train"]
    assert train_steps == [4, 8, 12, 16]
    assert all(0 <= r["accuracy"] <= 1 and np.isfinite(r["loss"]) for r in sink.records)
    assert {"val_loss", "val_accuracy"} <= set(res.history[-1])
    epochs = [r for r in sink.records if r["kind"] == "epoch"]
    assert epochs == res.history  # the epoch records the loggers wrote, val_ included


def test_evaluation_counts_every_example_once():
    """Padding in the last eval batch is masked: accuracy == numpy argmax on all 50."""
    images, labels = _data(50)
    model = _TinyNet()
    objective = _objective()
    state = train.create_train_state(
        objective.init, TX, _batch(images[:1], labels[:1]), key=jax.random.key(3)
    )
    ev = evaluation.make_evaluation(
        train.make_eval_step(objective.eval_fn),
        _batch(images, labels),
        batch_size=16,
        mesh=sharding.make_mesh(2),
    )
    got = evaluation.evaluate(ev, state)
    logits = model.apply({"params": state.params}, _preprocess(images, keys=None))
    np.testing.assert_allclose(got["accuracy"], np.mean(np.argmax(logits, -1) == labels))
    np.testing.assert_allclose(got["loss"], float(_loss(logits, labels).mean()), rtol=1e-5)


def test_batch_not_divisible_by_devices_is_a_clear_error():
    with pytest.raises(
        ValueError,
        match=r"global batch 30 is not divisible by 8 devices.*batch_size=32",
    ):
        _run(devices=8, batch=30)


def test_batch_larger_than_data_is_a_clear_error():
    with pytest.raises(ValueError, match="batch size 512 is larger than the 256"):
        _run(batch=512, evaluate=False)


def test_non_finite_loss_stops_with_the_step():
    with pytest.raises(FloatingPointError, match=r"non-finite training loss at step 2 "):
        _run(tx=optax.sgd(1e38), epochs=1)


def _poisoned_loss(logits, labels):
    """Cross-entropy, but NaN (value and gradient) for examples labelled 99."""
    safe = jnp.where(labels == 99, 0, labels)
    return _loss(logits, safe) * jnp.where(labels == 99, jnp.nan, 1.0)


@pytest.mark.slow
def test_skip_nonfinite_skips_the_poisoned_step_and_warns(caplog):
    images, labels = _data()
    labels = labels.copy()
    labels[7] = 99  # lands in exactly one batch of each epoch
    data = (images, labels)
    poisoned = [
        s + 1
        for e in range(2)
        for s, rows in enumerate(indices.epoch_indices(jax.random.key(1), e, 256, 32))
        if 7 in rows
    ]
    with pytest.raises(
        FloatingPointError, match=f"non-finite training loss at step {poisoned[0]} "
    ):
        _run(data=data, loss=_poisoned_loss, evaluate=False, epochs=1)
    skip_tx = optax.apply_if_finite(TX, max_consecutive_errors=5)
    state, _ = _run(
        data=data, loss=_poisoned_loss, evaluate=False, epochs=2, tx=skip_tx, nonfinite="warn"
    )
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    assert int(state.opt_state.total_notfinite) == 2  # one poisoned step per epoch, skipped
    assert f"non-finite training loss at step {poisoned[1] + 8} " in caplog.text


@contextlib.contextmanager
def _count_compiles():
    events = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_fit_compiles_before_the_first_step_and_never_again():
    """Any log/save cadence, a fresh start and a resumed mid-epoch start: no compile after
    fit's first device call (the chunk programs are compiled up front)."""
    part, _ = _run(devices=2, k=3, epochs=1, extra=[_Stop(after=2)], evaluate=False)
    assert int(part.step) == 6  # mid-epoch (8 steps per epoch: chunks 3, 3, 2)
    for state in (None, part):
        seen = []

        def spy(step, state, seen=seen):
            seen.append(step)

        sink = _Records()
        sink.write = lambda r, seen=seen: seen.append(("log", len(compiles)))
        with _count_compiles() as compiles:
            _run(
                devices=2,
                k=3,
                epochs=3,
                state=state,
                evaluate=False,
                extra=[
                    hooks.Periodic(spy, every_steps=3),
                    hooks.Periodic(spy, every_steps=5),
                    hooks.Log(sink, every_steps=1),
                ],
            )
        # Every compile happened before the first log record (i.e. before training).
        first_log = next(n for s_, n in (x for x in seen if isinstance(x, tuple)))
        assert len(compiles) == first_log and first_log >= 1


def test_epoch_indices_are_a_pure_function_of_key_and_epoch():
    key = jax.random.key(5)
    a = indices.epoch_indices(key, 3, 100, 10)
    np.testing.assert_array_equal(a, indices.epoch_indices(key, 3, 100, 10))
    assert not np.array_equal(a, indices.epoch_indices(key, 4, 100, 10))
    assert a.shape == (10, 10) and sorted(a.ravel().tolist()) == list(range(100))
    b = indices.epoch_indices(key, 0, 105, 10)  # the remainder is dropped
    assert b.shape == (10, 10) and len(set(b.ravel().tolist())) == 100


def test_arrays_of_different_length_are_a_clear_error():
    images, labels = _data()
    with pytest.raises(ValueError, match=r"training data: every array needs the same leading"):
        _run(data=(images, labels[:-1]), evaluate=False)
    with pytest.raises(ValueError, match=r"evaluation data: .*\['image'\]: 50, \['label'\]: 3200"):
        evaluation.make_evaluation(
            None, _batch(images[:50], np.zeros(3200, np.int32)), batch_size=16
        )


def test_measured_steps_per_call_is_recorded_and_reused(tmp_path, monkeypatch):
    """Two runs of the same command make the same choice (the cache), a resumed run the
    choice of the run it continues (the work directory), whatever a new measurement says."""
    import json

    monkeypatch.setenv("JAXNETS_CACHE_DIR", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / dispatch.CHOICE_FILE
    first, res = _run(k=None, epochs=1, evaluate=False, workdir=tmp_path / "a")
    record = json.loads((tmp_path / "a" / dispatch.CHOICE_FILE).read_text())
    assert record["how"] == "measured" and record["steps_per_call"] == res.steps_per_call
    assert set(record["seconds_per_step"]) == {"1", "8"}  # 1 step vs min(10, 8 per epoch)
    # Pretend this machine had measured the other way: the next run follows the cache.
    other = 1 if res.steps_per_call == 8 else 8
    entries = json.loads(cache.read_text())
    assert len(entries) == 1
    cache.write_text(json.dumps({key: {"steps_per_call": other} for key in entries}))
    with _count_compiles() as compiles:
        second, res2 = _run(k=None, epochs=1, evaluate=False, workdir=tmp_path / "b")
    assert res2.steps_per_call == other
    assert len(compiles) == 1  # the recorded choice's program only (one epoch: one length)
    assert json.loads((tmp_path / "b" / dispatch.CHOICE_FILE).read_text())["how"] == "cached"
    forced, _ = _run(k=other, epochs=1, evaluate=False)
    assert train.params_sha256(second.params) == train.params_sha256(forced.params)
    # A resumed run keeps its own choice, even after the cache changed back.
    cache.write_text(json.dumps({key: {"steps_per_call": res.steps_per_call} for key in entries}))
    part, _ = _run(k=None, epochs=2, evaluate=False, extra=[_Stop(after=1)], workdir=tmp_path / "b")
    resumed, res3 = _run(k=None, epochs=2, state=part, evaluate=False, workdir=tmp_path / "b")
    full, _ = _run(k=other, epochs=2, evaluate=False)
    assert res3.steps_per_call == other
    assert train.params_sha256(resumed.params) == train.params_sha256(full.params)


def test_periodic_hooks_every_seconds_and_at_epoch_end(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(loop, "_now", lambda: now[0])

    def tick():
        now[0] += 7.0  # seconds per chunk

    timed, ends = [], []
    _run(
        k=2,
        epochs=2,
        evaluate=False,
        extra=[
            _Stop(tick=tick),
            hooks.Periodic(lambda step, state: timed.append(step), every_seconds=20.0),
            hooks.Periodic(lambda step, state: ends.append(int(state.step)), at_epoch_end=True),
        ],
    )
    assert timed == [6, 12]  # due at 21 s and 42 s: after the 3rd and 6th chunk of 2 steps
    assert ends == [8, 16]
    with pytest.raises(ValueError, match=r"every_steps=-1; use an int >= 0"):
        hooks.Periodic(lambda s, st: None, every_steps=-1)
