"""Pure train/eval steps, epochs run on the device, and `fit()`, a thin loop over them.

Everything a run computes is a pure function of the train state and of `(seed, step)`:
the data order of epoch e is a permutation drawn from `fold_in(data_key, e)`, and the
augmentation of example i of step s uses `fold_in(fold_in(state.key, s), i)`. That is
what makes a resumed run bit-identical to an uninterrupted one, and a run on 8 devices
equal (to float rounding) to a run on 1.

A complete loop from the public parts (what `fit` does, without logging):

    state = create_train_state(model, tx, images[:1], key=jax.random.key(0))
    dp = make_data_parallel(backend="pmap")
    run = make_epoch_runner(make_train_step(model.apply, loss_fn, tx, axis_name=dp.axis_name), dp)
    state, data = dp.replicate(state), dp.replicate((images, labels))
    for epoch in range(epochs):
        idx = epoch_indices(data_key, epoch, len(labels), batch_size)
        state, metrics = run(state, data, dp.shard_columns(dp.process_columns(idx)))
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnets import parallel
from jaxnets.types import Array, Params, PRNGKey, PyTree

# (images, *, keys) -> model inputs. keys: [batch] per-example keys when training, else None.
Preprocess = Callable[..., Array]
# (logits, labels) -> per-example losses [batch].
LossFn = Callable[[Array, Array], Array]


class TrainState(NamedTuple):
    """Everything training changes, as one pytree (checkpointed whole)."""

    step: Array  # int32 [], number of optimiser steps taken
    params: Params
    opt_state: optax.OptState
    key: Array  # uint32 [2] raw key data; randomness of step s is fold_in(key, s)


def create_train_state(
    model: Any, tx: optax.GradientTransformation, sample_input: Array, *, key: PRNGKey
) -> TrainState:
    """Initialises a Flax Linen `model` and the optimiser state.

    Args:
      model: a Linen module (its `init`/`apply` are the pure functions used).
      tx: the Optax transformation.
      sample_input: [1, ...] an input of the right shape and dtype.
      key: a PRNG key (`jax.random.key(seed)`); split into the init key and the state key.
    """
    if isinstance(key, int):
        raise TypeError("key must be a PRNG key, e.g. key=jax.random.key(0), not an int")
    init_key, state_key = jax.random.split(key)
    params = model.init(init_key, sample_input)["params"]
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), raw_key(state_key))


def raw_key(key: PRNGKey) -> Array:
    """uint32 key data of a typed or raw key (what the state stores: plain arrays only)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def classification_metrics(logits: Array, labels: Array, losses: Array, mask: Array) -> dict:
    """Sums (not means) over the batch, so that they add up over steps and devices.

    Args:
      logits: [batch, num_classes].
      labels: [batch] int class ids.
      losses: [batch] per-example loss.
      mask: [batch] bool, False for padding.
    """
    correct = (jnp.argmax(logits, -1) == labels) & mask
    return {
        "loss": jnp.sum(jnp.where(mask, losses, 0.0)),
        "correct": jnp.sum(correct, dtype=jnp.int32),
        "count": jnp.sum(mask, dtype=jnp.int32),
    }


def summarize(sums: dict) -> dict:
    """Means from summed metrics: {"loss": mean loss, "accuracy": fraction correct}."""
    count = max(int(sums["count"]), 1)
    return {"loss": float(sums["loss"]) / count, "accuracy": float(sums["correct"]) / count}


def _example_keys(step_key: PRNGKey, batch: int, axis_name: str | None) -> Array:
    offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * batch
    positions = offset + jnp.arange(batch)
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(positions)


def make_train_step(
    apply_fn: Callable,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    preprocess: Preprocess | None = None,
    axis_name: str | None = None,
) -> Callable[[TrainState, tuple[Array, Array]], tuple[TrainState, dict]]:
    """Builds `train_step(state, (images, labels)) -> (state, metric sums)`.

    The loss is the mean of `loss_fn` over the (per-device) batch; with `axis_name`
    gradients are averaged over devices with `lax.pmean` and metrics summed with
    `lax.psum`, so N devices with batch B/N each take the same step as 1 device with B.

    Args:
      apply_fn: `model.apply`, called as `apply_fn({"params": params}, inputs)`.
      loss_fn: `(logits, labels) -> [batch]` per-example losses.
      tx: the Optax transformation.
      preprocess: optional `(images, *, keys) -> inputs` (scaling, augmentation);
        `keys` are per-example keys derived from the state key, the step and the
        example's global position in the batch (independent of the device count).
      axis_name: the collective axis when run under `DataParallel.map`.
    """

    def step_fn(state: TrainState, batch: tuple[Array, Array]) -> tuple[TrainState, dict]:
        images, labels = batch
        step_key = jax.random.fold_in(state.key, state.step)
        if preprocess is not None:
            inputs = preprocess(images, keys=_example_keys(step_key, images.shape[0], axis_name))
        else:
            inputs = images

        def objective(params):
            logits = apply_fn({"params": params}, inputs)
            losses = loss_fn(logits, labels)
            return jnp.mean(losses), (logits, losses)

        (_, (logits, losses)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = classification_metrics(logits, labels, losses, jnp.ones(labels.shape, bool))
        if axis_name is not None:
            metrics = jax.lax.psum(metrics, axis_name)
        return TrainState(state.step + 1, params, opt_state, state.key), metrics

    return step_fn


def make_eval_step(
    apply_fn: Callable,
    loss_fn: LossFn,
    *,
    preprocess: Preprocess | None = None,
    axis_name: str | None = None,
) -> Callable[[Params, tuple[Array, Array], Array], dict]:
    """Builds `eval_step(params, (images, labels), mask) -> metric sums` (mask: [batch] bool)."""

    def step_fn(params: Params, batch: tuple[Array, Array], mask: Array) -> dict:
        images, labels = batch
        inputs = preprocess(images, keys=None) if preprocess is not None else images
        logits = apply_fn({"params": params}, inputs)
        metrics = classification_metrics(logits, labels, loss_fn(logits, labels), mask)
        if axis_name is not None:
            metrics = jax.lax.psum(metrics, axis_name)
        return metrics

    return step_fn


def make_epoch_runner(train_step: Callable, dp: parallel.DataParallel) -> Callable:
    """Runs many train steps per dispatch on every device, the data set on the device.

    Returns `run(state, data, idx) -> (state, metrics)` where `state` and
    `data = (images, labels)` come from `dp.replicate`, `idx` is `[steps, global_batch]`
    example indices from `dp.shard_columns`, and `metrics` are per-step metric sums
    `[steps]` (replicated). With one step per call the step is called directly; with
    more it runs inside `lax.scan`. The state buffer is donated.
    """

    def run_fn(state, data, idx):
        images, labels = data

        def body(state, ix):
            return train_step(state, (images[ix], labels[ix]))

        if idx.shape[0] == 1:
            state, metrics = body(state, idx[0])
            return state, jax.tree.map(lambda m: m[None], metrics)
        return jax.lax.scan(body, state, idx)

    return dp.map(
        run_fn,
        in_specs=(parallel.REPLICATED, parallel.REPLICATED, parallel.COLUMNS),
        out_specs=(parallel.REPLICATED, parallel.REPLICATED),
        donate_argnums=(0,),
    )


def make_eval_runner(eval_step: Callable, dp: parallel.DataParallel) -> Callable:
    """`run(params, data, idx) -> metric sums` over all of `idx` ([steps, batch]; -1 = padding)."""

    def run_fn(params, data, idx):
        images, labels = data

        def body(total, ix):
            safe = jnp.maximum(ix, 0)
            m = eval_step(params, (images[safe], labels[safe]), ix >= 0)
            return jax.tree.map(jnp.add, total, m), None

        zero = jax.eval_shape(
            lambda: eval_step(params, (images[idx[0]], labels[idx[0]]), idx[0] >= 0)
        )
        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
        total, _ = jax.lax.scan(body, zero, idx)
        return total

    return dp.map(
        run_fn,
        in_specs=(parallel.REPLICATED, parallel.REPLICATED, parallel.COLUMNS),
        out_specs=parallel.REPLICATED,
    )


def check_data(images: Any, labels: Any, what: str) -> None:
    """Raises a clear error when images and labels do not pair up one to one."""
    if np.ndim(labels) < 1 or len(images) != len(labels):
        raise ValueError(
            f"{what}: {len(images)} images but {np.shape(labels)} labels; pass the same "
            "examples' images and labels, e.g. (images[:n], labels[:n])"
        )


def epoch_indices(data_key: PRNGKey, epoch: int, num_examples: int, batch_size: int) -> np.ndarray:
    """Example indices of every step of an epoch: `[num_examples // batch_size, batch_size]`.

    The permutation is a pure function of `(data_key, epoch)`; the last partial batch is
    dropped (a different remainder is dropped each epoch).
    """
    steps = num_examples // batch_size
    if steps == 0:
        raise ValueError(
            f"batch size {batch_size} is larger than the {num_examples} training examples; "
            f"use --batch-size {num_examples} or less"
        )
    perm = jax.random.permutation(jax.random.fold_in(data_key, epoch), num_examples)
    return np.asarray(perm[: steps * batch_size], np.int32).reshape(steps, batch_size)


def eval_indices(num_examples: int, batch_size: int) -> np.ndarray:
    """`[steps, batch_size]` indices covering every example once, padded with -1."""
    steps = math.ceil(num_examples / batch_size)
    idx = np.full(steps * batch_size, -1, np.int32)
    idx[:num_examples] = np.arange(num_examples, dtype=np.int32)
    return idx.reshape(steps, batch_size)


def default_steps_per_dispatch() -> int:
    """Steps run per device call (inside `lax.scan`): 10 on XLA:CPU, 50 elsewhere.

    Measured with the seed CNN on the 2-core CPU (`make bench`, quiet machine): 10 scanned
    steps per call 1.43 s/epoch against 1.80-2.04 s with one step per call. (PERF-NOTES
    recorded a 2.2x scan penalty for the earlier NHWC model; it no longer holds.) On GPU/TPU
    scanning removes the per-step launch cost.
    """
    return 10 if jax.default_backend() == "cpu" else 50


def _chunk_ends(start: int, stop: int, every: Sequence[int]) -> list[int]:
    """Step boundaries in (start, stop]: every multiple of each `every`, plus `stop`."""
    ends = {stop}
    for n in every:
        if n and n > 0:
            ends.update(range((start // n + 1) * n, stop, n))
    return sorted(e for e in ends if start < e <= stop)


class Evaluation(NamedTuple):
    """What `fit` needs to evaluate: a runner and device-resident data."""

    dp: parallel.DataParallel
    run: Callable  # make_eval_runner(...)
    data: tuple[Array, Array]  # replicated (images, labels)
    idx: Array  # sharded eval_indices


def make_evaluation(
    eval_step: Callable,
    dp: parallel.DataParallel,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
) -> Evaluation:
    """Puts an evaluation set on the devices once, padded to whole global batches."""
    check_data(images, labels, "evaluation data")
    dp.check_batch(batch_size)
    idx = eval_indices(len(labels), batch_size)
    return Evaluation(
        dp,
        make_eval_runner(eval_step, dp),
        dp.replicate((images, labels)),
        dp.shard_columns(dp.process_columns(idx)),
    )


def evaluate(evaluation: Evaluation, params: Params) -> dict:
    """Mean loss and accuracy of replicated `params` on an `Evaluation`'s data."""
    sums = evaluation.run(params, evaluation.data, evaluation.idx)
    return summarize(jax.device_get(evaluation.dp.unreplicate(sums)))


class Hooks(NamedTuple):
    """Optional host-side functions `fit` calls; none of them changes what a step computes.

    Attributes:
      on_log: `(record)` at each log point (`record["kind"] == "train"`) and after each
        epoch's evaluation (`"epoch"`).
      on_steps: `(step, state, epoch_done)` at every chunk boundary, after logging
        (checkpoints save here).
      should_stop: `() -> bool`, polled at chunk boundaries (preemption).
      progress: `(epoch, steps_per_epoch, start_in_epoch) -> bar` with `update(n, **postfix)`
        and `close()`; None for no progress bar.
    """

    on_log: Callable[[dict], None] | None = None
    on_steps: Callable[[int, TrainState, bool], None] | None = None
    should_stop: Callable[[], bool] | None = None
    progress: Callable[..., Any] | None = None


class FitResult(NamedTuple):
    state: TrainState  # replicated, as `fit` holds it
    history: list[dict]  # one record per epoch
    stopped_early: bool


def fit(
    state: TrainState,
    run_epoch: Callable,
    dp: parallel.DataParallel,
    train_data: tuple[np.ndarray, np.ndarray],
    *,
    data_key: PRNGKey,
    epochs: int,
    batch_size: int,
    evaluation: Evaluation | None = None,
    steps_per_dispatch: int | None = None,
    log_every_steps: int = 10,
    save_every_steps: int = 0,
    hooks: Hooks = Hooks(),
    on_nonfinite: str = "raise",
) -> FitResult:
    """Trains until `epochs` epochs are done, resuming from `state.step`.

    Args:
      state: replicated TrainState (`dp.replicate(...)`); its step says where to start.
      run_epoch: `make_epoch_runner(train_step, dp)`.
      dp: the data-parallel plan.
      train_data: host `(images, labels)`; put on the devices once.
      data_key: key of the data order (epoch e uses `fold_in(data_key, e)`).
      epochs: total epochs (a finished run given more epochs continues).
      batch_size: global batch.
      evaluation: evaluated after every epoch (the validation set).
      steps_per_dispatch: steps per device call (default: `default_steps_per_dispatch()`).
      log_every_steps: metrics are read back (one sync) every this many steps.
      save_every_steps: chunks end on multiples of this (so `on_steps` can save there).
      hooks: host-side logging, checkpoint and stop hooks.
      on_nonfinite: "raise": a non-finite training loss stops training with
        FloatingPointError naming the step range (checked at log points, no extra sync);
        "warn": log a warning and go on (with `optax.apply_if_finite` skipping the update).

    Returns:
      FitResult(state, history, stopped_early).
    """
    if on_nonfinite not in ("raise", "warn"):
        raise ValueError(f"on_nonfinite={on_nonfinite!r}; use 'raise' or 'warn'")
    images, labels = train_data
    check_data(images, labels, "training data")
    dp.check_batch(batch_size)
    steps_per_epoch = len(labels) // batch_size
    epoch_indices(data_key, 0, len(labels), batch_size)  # validates the batch size
    k = steps_per_dispatch or default_steps_per_dispatch()
    data = dp.replicate((images, labels))
    step = int(np.asarray(dp.unreplicate(state.step)))
    total_steps = epochs * steps_per_epoch
    history: list[dict] = []
    while step < total_steps:
        epoch, pos = divmod(step, steps_per_epoch)
        idx = dp.process_columns(epoch_indices(data_key, epoch, len(labels), batch_size))
        bar = hooks.progress(epoch, steps_per_epoch, pos) if hooks.progress else None
        epoch_sums: dict | None = None
        pending: list[tuple[int, dict]] = []
        last_logged = step
        t0 = time.perf_counter()
        ends = _chunk_ends(pos, steps_per_epoch, [k, log_every_steps, save_every_steps])
        for end in ends:
            state, metrics = run_epoch(state, data, dp.shard_columns(idx[pos:end]))
            step += end - pos
            pending.append((end - pos, metrics))
            pos = end
            if end % log_every_steps == 0 or end == steps_per_epoch:
                sums = _drain(pending, dp)
                pending = []
                _check_finite(sums, last_logged, step, on_nonfinite)
                epoch_sums = sums if epoch_sums is None else _add(epoch_sums, sums)
                record = {"kind": "train", "step": step, "epoch": epoch, **summarize(sums)}
                if hooks.on_log:
                    hooks.on_log(record)
                if bar is not None:
                    bar.update(step - last_logged, **summarize(epoch_sums))
                last_logged = step
            if hooks.on_steps:
                hooks.on_steps(step, state, end == steps_per_epoch)
            if hooks.should_stop and hooks.should_stop():
                if bar is not None:
                    bar.close()
                return FitResult(state, history, True)
        if bar is not None:
            bar.close()
        record = {"kind": "epoch", "epoch": epoch + 1, "step": step}
        if epoch_sums is not None:
            record.update(summarize(epoch_sums))
        record["epoch_seconds"] = time.perf_counter() - t0
        if evaluation is not None:
            val = evaluate(evaluation, state.params)
            record.update({f"val_{k_}": v for k_, v in val.items()})
        history.append(record)
        if hooks.on_log:
            hooks.on_log(record)
    return FitResult(state, history, False)


def _drain(pending: list[tuple[int, dict]], dp: parallel.DataParallel) -> dict:
    """Sums the per-step metrics of several chunks on the host (one sync)."""
    host = jax.device_get([dp.unreplicate(m) for _, m in pending])
    total = None
    for m in host:
        m = jax.tree.map(lambda x: np.sum(x, axis=0), m)
        total = m if total is None else _add(total, m)
    return total


def _add(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in a}


def _check_finite(sums: dict, first_step: int, last_step: int, on_nonfinite: str) -> None:
    if np.isfinite(sums["loss"]):
        return
    where = f"non-finite training loss between steps {first_step + 1} and {last_step}"
    if on_nonfinite == "warn":
        logging.getLogger("jaxnets.train").warning("%s (updates skipped)", where)
        return
    raise FloatingPointError(
        f"{where}: lower the learning rate, check the inputs, or pass --skip-nonfinite; the "
        "last checkpoint saved before this is intact"
    )


def params_sha256(params: PyTree) -> str:
    """A fingerprint of every parameter byte, leaves in `jax.tree` order (with paths)."""
    import hashlib

    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]:
        arr = np.ascontiguousarray(np.asarray(leaf))
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(f"{arr.dtype.str}{arr.shape}".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()
