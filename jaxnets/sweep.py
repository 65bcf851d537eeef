"""Many models in one program: a sweep over seeds and SGD hyperparameters, vmapped.

K configurations (a seed and the hyperparameters of `jaxnets.optim.sgd`) train as **one**
jitted program: the train state has a leading model axis `[K, ...]` and the step of
`jaxnets.train.make_train_step` is `jax.vmap`-ed over it. The hyperparameters live in the
optimiser state through `optax.inject_hyperparams`, so one Optax transform (traced once)
applies K different learning rates, momenta, weight decays and L1 strengths. (`vectorize="map"`
runs the K steps one after the other inside the same program instead, `lax.map`: the same
numbers, faster for the CNN on XLA:CPU; see `make_sweep_train_step`.)

Composition with devices: every device holds all K models and a slice of every model's
batch; gradients are averaged over devices per model (`lax.pmean` inside the vmapped step),
exactly as `train.py` splits one model's batch. This works for any K and any device count
that divides the batch, and a K-model sweep on N devices equals K separate runs on 1.
(Splitting the models over devices instead would need K divisible by N and gives nothing
a data split does not: the models are small, the data set sits on every device anyway.)

A configuration is a dict over `SWEEPABLE`; missing entries come from `DEFAULTS`. Its
`seed` decides the model's initialisation, its per-step randomness (augmentation) and its
data order: `model_key, data_key = jax.random.split(jax.random.key(seed))`, so two
configurations with the same seed start from the same weights and see the same batches,
and each configuration's run equals `train.fit` with `create_train_state(..., key=model_key)`
and `data_key=data_key` (what the tests check, to 1e-5).

Example:
    >>> configs = grid(**parse_sweep(["seed=0:2", "learning_rate=0.01,0.1"]))
    >>> [(c["seed"], c["learning_rate"]) for c in configs]
    [(0, 0.01), (0, 0.1), (1, 0.01), (1, 0.1)]
    >>> result = run_sweep(model, loss_fn, configs, (images, labels), (val_images, val_labels),
    ...                    epochs=2, batch_size=100)               # doctest: +SKIP
    >>> print(format_results(result.results))                      # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnets import metrics, optim, parallel, train
from jaxnets.types import Array, PRNGKey

HYPERPARAMETERS = ("learning_rate", "lr_decay", "momentum", "weight_decay", "l1")
SWEEPABLE = ("seed", *HYPERPARAMETERS)
# The seed CNN's optimiser (SEEDS.md): SGD 0.05, Nesterov 0.9, inverse-time decay 1e-6.
DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "learning_rate": 0.05,
    "lr_decay": 1e-6,
    "momentum": 0.9,
    "weight_decay": 0.0,
    "l1": 0.0,
}
VECTORIZE = ("vmap", "map")
RESULT_COLUMNS = ("loss", "accuracy", "val_loss", "val_accuracy")

SWEEP_SYNTAX = (
    "write --sweep NAME=a,b,c (a list of numbers) or --sweep NAME=start:stop (the integers "
    "start, ..., stop-1), e.g. --sweep seed=0:8 --sweep learning_rate=0.01,0.05"
)


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse_sweep(specs: Sequence[str], *, allowed: Sequence[str] | None = SWEEPABLE) -> dict:
    """The axes of a grid from `--sweep` flags: `["lr=0.01,0.05", "seed=0:8"]`.

    Args:
      specs: one `NAME=a,b,c` (numbers) or `NAME=start:stop` (integers start..stop-1) each.
      allowed: the valid names (None: any).

    Returns:
      `{name: [values]}` in flag order; ints stay ints, anything else becomes a float.

    Raises:
      ValueError: naming the flag, for bad syntax, a non-number, an empty range, an
        unknown or repeated name.
    """
    axes: dict[str, list] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        name, values = name.strip(), values.strip()
        if not sep or not name or not values:
            raise ValueError(f"--sweep {spec!r}: expected NAME=VALUES; {SWEEP_SYNTAX}")
        if allowed is not None and name not in allowed:
            raise ValueError(
                f"--sweep {spec!r}: unknown name {name!r}; sweepable: {', '.join(allowed)}"
            )
        if name in axes:
            raise ValueError(
                f"--sweep {spec!r}: {name!r} is given twice; put all its values in one flag "
                f"({name}=a,b,c)"
            )
        if ":" in values:
            start, _, stop = values.partition(":")
            try:
                lo, hi = int(start), int(stop)
            except ValueError:
                raise ValueError(
                    f"--sweep {spec!r}: {values!r} is not an integer range start:stop; "
                    f"{SWEEP_SYNTAX}"
                ) from None
            if hi <= lo:
                raise ValueError(f"--sweep {spec!r}: empty range {lo}:{hi}; use e.g. {lo}:{lo + 4}")
            axes[name] = list(range(lo, hi))
            continue
        parsed = []
        for text in values.split(","):
            try:
                value = _number(text.strip())
            except ValueError:
                raise ValueError(
                    f"--sweep {spec!r}: {text.strip()!r} is not a number; {SWEEP_SYNTAX}"
                ) from None
            if not math.isfinite(value):
                raise ValueError(f"--sweep {spec!r}: {text.strip()!r} is not finite")
            parsed.append(value)
        axes[name] = parsed
    return axes


def grid(**axes: Sequence[Any]) -> list[dict]:
    """The cartesian product of `axes`, the last axis varying fastest.

    Example:
        >>> grid(seed=[0, 1], l1=[0.0, 1e-4])
        [{'seed': 0, 'l1': 0.0}, {'seed': 0, 'l1': 0.0001}, {'seed': 1, 'l1': 0.0}, {'seed': 1, 'l1': 0.0001}]
    """  # noqa: E501
    for name, values in axes.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ValueError(f"grid axis {name}={values!r}: give a non-empty list of values")
    names = list(axes)
    return [dict(zip(names, combo)) for combo in itertools.product(*axes.values())]


def complete_configs(configs: Sequence[Mapping[str, Any]], base: Mapping[str, Any]) -> list[dict]:
    """Every config with all of `SWEEPABLE` (from `base`, then `DEFAULTS`), checked.

    Raises:
      ValueError: no configs, an unknown name, a non-integer seed, a negative or non-finite
        hyperparameter, momentum >= 1.
    """
    if not configs:
        raise ValueError("a sweep needs at least one configuration; e.g. configs=[{'seed': 0}]")
    full = []
    for i, config in enumerate(configs):
        unknown = sorted(set(config) - set(SWEEPABLE)) + sorted(set(base) - set(SWEEPABLE))
        if unknown:
            raise ValueError(
                f"configuration {i}: unknown names {unknown}; sweepable: {', '.join(SWEEPABLE)}"
            )
        c = {**DEFAULTS, **base, **config}
        if not isinstance(c["seed"], (int, np.integer)) or isinstance(c["seed"], bool):
            raise ValueError(f"configuration {i}: seed must be an int, got {c['seed']!r}")
        for name in HYPERPARAMETERS:
            value = c[name]
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(
                    f"configuration {i}: {name} must be a finite number >= 0, got {value!r}"
                )
        if c["momentum"] >= 1:
            raise ValueError(f"configuration {i}: momentum must be in [0, 1), got {c['momentum']}")
        full.append({"seed": int(c["seed"]), **{k: float(c[k]) for k in HYPERPARAMETERS}})
    return full


def run_keys(seed: int) -> tuple[PRNGKey, PRNGKey]:
    """`(model_key, data_key)` of a configuration's seed (module docstring)."""
    model_key, data_key = jax.random.split(jax.random.key(seed))
    return model_key, data_key


def _sgd(learning_rate, lr_decay, momentum, weight_decay, l1, *, nesterov=False):
    return optim.sgd(
        optim.inverse_time_decay(learning_rate, lr_decay),
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
        l1=l1,
    )


def make_sweep_tx(
    hyperparams: Mapping[str, Any], *, nesterov: bool = False
) -> optax.GradientTransformation:
    """`optim.sgd` with an inverse-time decayed learning rate, hyperparameters in the state.

    `optax.inject_hyperparams` keeps `learning_rate, lr_decay, momentum, weight_decay, l1`
    as float32 arrays in the optimiser state, so a state stacked over K models carries K
    values of each, and any one transform built here updates all of them under `vmap`.
    The update is that of `optim.sgd(optim.inverse_time_decay(learning_rate, lr_decay),
    momentum=..., nesterov=..., weight_decay=..., l1=...)`.

    Args:
      hyperparams: a mapping with the names of `HYPERPARAMETERS` (floats or arrays; extra
        keys such as `seed` are ignored).
      nesterov: Keras' Nesterov momentum (static: the same for every model of a sweep).
    """
    return optax.inject_hyperparams(_sgd, static_args=("nesterov",))(
        **{k: hyperparams[k] for k in HYPERPARAMETERS}, nesterov=nesterov
    )


def create_sweep_state(
    model: Any,
    configs: Sequence[Mapping[str, Any]],
    sample_input: Array,
    *,
    nesterov: bool = False,
) -> train.TrainState:
    """K train states stacked along a leading model axis, initialised in one program.

    Model k is initialised as `train.create_train_state(model, make_sweep_tx(configs[k]),
    sample_input, key=run_keys(configs[k]["seed"])[0])`, bit for bit.

    Args:
      model: a Flax Linen module.
      configs: complete configurations (`complete_configs`).
      sample_input: [1, ...] an input of the right shape and dtype.
      nesterov: as in `make_sweep_tx`.

    Returns:
      A `TrainState` whose every leaf has a leading axis of size K.
    """
    keys = jnp.stack([train.raw_key(run_keys(c["seed"])[0]) for c in configs])
    hparams = {k: jnp.asarray([c[k] for c in configs], jnp.float32) for k in HYPERPARAMETERS}

    def init_fn(raw, hp):
        key = jax.random.wrap_key_data(raw)
        return train.create_train_state(
            model, make_sweep_tx(hp, nesterov=nesterov), sample_input, key=key
        )

    return jax.jit(jax.vmap(init_fn))(keys, hparams)


def make_sweep_train_step(
    apply_fn: Callable,
    loss_fn: train.LossFn,
    tx: optax.GradientTransformation,
    *,
    preprocess: train.Preprocess | None = None,
    axis_name: str | None = None,
    vectorize: str = "vmap",
) -> Callable:
    """`train.make_train_step` over K models at once: `(states, batch) -> (states, metrics)`.

    Args:
      apply_fn, loss_fn, preprocess, axis_name: as in `train.make_train_step`.
      vectorize: "vmap" batches the K models' arithmetic (wide matmuls: fast on GPU/TPU and
        for small dense nets everywhere); "map" runs the K steps one after the other inside
        the same compiled program (`lax.map`), which on XLA:CPU is faster for the CNN,
        whose vmapped convolutions become batched matmuls XLA:CPU runs slowly (measured:
        K=8 forward+backward 188 ms vmapped vs 100 ms mapped vs 8 x 14 ms alone).
      tx: from `make_sweep_tx` (any one: the hyperparameters are read from each model's
        state). A transform without injected hyperparameters trains every model with the
        same hyperparameters (a seed-only sweep).

    The returned step takes `states` with a leading model axis `[K, ...]` and
    `batch = (images [batch, K, ...], labels [batch, K])` (batch first: the layout in which
    `DataParallel.shard_columns` splits `[steps, batch, K]` example indices over devices),
    and returns the states and metric sums of shape `[K]`. `train.make_epoch_runner` runs it.
    """
    if vectorize not in VECTORIZE:
        raise ValueError(f"vectorize={vectorize!r}: use one of {VECTORIZE}")
    step = train.make_train_step(apply_fn, loss_fn, tx, preprocess=preprocess, axis_name=axis_name)
    if vectorize == "vmap":
        return jax.vmap(step, in_axes=(0, 1))

    def step_fn(states, batch):
        images, labels = (jnp.moveaxis(x, 1, 0) for x in batch)
        return jax.lax.map(lambda args: step(args[0], args[1:]), (states, images, labels))

    return step_fn


def make_sweep_eval_step(
    apply_fn: Callable,
    loss_fn: train.LossFn,
    *,
    preprocess: train.Preprocess | None = None,
    axis_name: str | None = None,
) -> Callable:
    """`train.make_eval_step` vmapped over K models' params (the same batch for all).

    `train.make_evaluation` takes it as is; `train.evaluate`-style sums come out as `[K]`.
    """
    step = train.make_eval_step(apply_fn, loss_fn, preprocess=preprocess, axis_name=axis_name)
    return jax.vmap(step, in_axes=(0, None, None))


def sweep_epoch_indices(
    data_keys: Sequence[PRNGKey], epoch: int, num_examples: int, batch_size: int
) -> np.ndarray:
    """`[steps, batch_size, K]` example indices: model k's `train.epoch_indices`."""
    return np.stack(
        [train.epoch_indices(k, epoch, num_examples, batch_size) for k in data_keys], axis=-1
    )


class SweepResult(NamedTuple):
    state: train.TrainState  # host arrays, leading model axis [K]
    results: dict  # JSON-serialisable: what sweep.json holds


def _label(config: Mapping[str, Any], axes: Sequence[str]) -> str:
    return " ".join(f"{k}={config[k]:g}" for k in axes) or "base"


def _sums_to_means(sums: Mapping[str, np.ndarray], prefix: str = "") -> list[dict]:
    """Per-model means of `[K]` metric sums (NaN where a model diverged)."""
    count = np.maximum(np.asarray(sums["count"], np.float64), 1)
    loss = np.asarray(sums["loss"], np.float64) / count
    accuracy = np.asarray(sums["correct"], np.float64) / count
    return [
        {f"{prefix}loss": float(lo), f"{prefix}accuracy": float(ac)}
        for lo, ac in zip(loss, accuracy)
    ]


def run_sweep(
    model: Any,
    loss_fn: train.LossFn,
    configs: Sequence[Mapping[str, Any]],
    train_data: tuple[np.ndarray, np.ndarray],
    val_data: tuple[np.ndarray, np.ndarray] | None = None,
    *,
    epochs: int,
    batch_size: int,
    base: Mapping[str, Any] = {},  # noqa: B006 - read only
    nesterov: bool = False,
    preprocess: train.Preprocess | None = None,
    dp: parallel.DataParallel | None = None,
    steps_per_dispatch: int | None = None,
    log_every_steps: int = 10,
    vectorize: str = "vmap",
    on_epoch: Callable[[int, list[dict]], None] | None = None,
) -> SweepResult:
    """Trains every configuration for `epochs` epochs as one vmapped, device-parallel program.

    Args:
      model: a Flax Linen module (`model.apply` is the forward pass).
      loss_fn: `(logits, labels) -> [batch]` per-example losses.
      configs: dicts over `SWEEPABLE` (e.g. from `grid`); missing entries from `base`.
      train_data: host `(images, labels)`.
      val_data: host `(images, labels)` evaluated after every epoch (None: no validation).
      epochs: epochs per model.
      batch_size: global batch per model (divisible by the device count).
      base: values for entries the configs leave out (then `DEFAULTS`).
      nesterov: Keras' Nesterov momentum for every model.
      preprocess: `(images, *, keys) -> inputs`, as in `train.make_train_step`.
      dp: the data-parallel plan (default: pmap over every device).
      steps_per_dispatch: steps per device call (default `train.default_steps_per_dispatch()`).
      log_every_steps: train curves get one point (the mean over the interval) this often.
      vectorize: "vmap" or "map" (`make_sweep_train_step`); the numbers are the same.
      on_epoch: `(epoch, records)` after each epoch, one record per model (host-side logging).

    Returns:
      `SweepResult(state, results)`: the final states (host, `[K, ...]`) and a dict with
      `runs` (per configuration: `config`, `label`, `final` {loss, accuracy, val_loss,
      val_accuracy}, `history` per epoch, `curve` per log interval), `axes` (the names that
      vary), `best` (index by `best_index`), `metric`, `num_models`, `devices`, `seconds`.
    """
    if vectorize not in VECTORIZE:
        raise ValueError(f"vectorize={vectorize!r}: use one of {VECTORIZE}")
    full = complete_configs(configs, base)
    images, labels = train_data
    train.check_data(images, labels, "training data")
    dp = dp or parallel.make_data_parallel(backend="pmap")
    dp.check_batch(batch_size)
    steps_per_epoch = len(labels) // batch_size
    train.epoch_indices(jax.random.key(0), 0, len(labels), batch_size)  # validates the batch
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    sample = images[:1] if preprocess is None else preprocess(jnp.asarray(images[:1]), keys=None)
    start = time.perf_counter()
    state = create_sweep_state(model, full, sample, nesterov=nesterov)
    tx = make_sweep_tx(full[0], nesterov=nesterov)
    step = make_sweep_train_step(
        model.apply,
        loss_fn,
        tx,
        preprocess=preprocess,
        axis_name=dp.axis_name,
        vectorize=vectorize,
    )
    run_epoch = train.make_epoch_runner(step, dp)
    evaluation = None
    if val_data is not None:
        eval_step = make_sweep_eval_step(
            model.apply, loss_fn, preprocess=preprocess, axis_name=dp.axis_name
        )
        evaluation = train.make_evaluation(
            eval_step, dp, val_data[0], val_data[1], batch_size=batch_size
        )
    data_keys = [run_keys(c["seed"])[1] for c in full]
    k = steps_per_dispatch or train.default_steps_per_dispatch()
    state = dp.replicate(jax.device_get(state))
    data = dp.replicate((images, labels))
    histories: list[list[dict]] = [[] for _ in full]
    curves: list[list[dict]] = [[] for _ in full]
    for epoch in range(epochs):
        idx = dp.process_columns(sweep_epoch_indices(data_keys, epoch, len(labels), batch_size))
        t0 = time.perf_counter()
        chunks, pos = [], 0
        for end in train._chunk_ends(0, steps_per_epoch, [k, log_every_steps]):
            state, m = run_epoch(state, data, dp.shard_columns(idx[pos:end]))
            chunks.append(m)
            pos = end
        per_step = jax.device_get([dp.unreplicate(m) for m in chunks])
        per_step = {name: np.concatenate([m[name] for m in per_step]) for name in per_step[0]}
        seconds = time.perf_counter() - t0
        first = epoch * steps_per_epoch
        for lo in range(0, steps_per_epoch, log_every_steps):
            hi = min(lo + log_every_steps, steps_per_epoch)
            window = {name: v[lo:hi].sum(0) for name, v in per_step.items()}
            for run, point in enumerate(_sums_to_means(window)):
                curves[run].append({"step": first + hi, **point})
        records = _sums_to_means({name: v.sum(0) for name, v in per_step.items()})
        if evaluation is not None:
            sums = evaluation.run(state.params, evaluation.data, evaluation.idx)
            val = jax.device_get(dp.unreplicate(sums))
            for record, v in zip(records, _sums_to_means(val, "val_")):
                record.update(v)
        for run, record in enumerate(records):
            record.update(epoch=epoch + 1, step=first + steps_per_epoch, epoch_seconds=seconds)
            histories[run].append(record)
        if on_epoch is not None:
            on_epoch(epoch, records)
    final_state = jax.device_get(dp.unreplicate(state))
    axes = [name for name in SWEEPABLE if len({c[name] for c in full}) > 1]
    runs = [
        {
            "config": c,
            "label": _label(c, axes),
            "final": {name: h[-1][name] for name in RESULT_COLUMNS if name in h[-1]},
            "history": h,
            "curve": curve,
        }
        for c, h, curve in zip(full, histories, curves)
    ]
    metric = "val_loss" if val_data is not None else "loss"
    results = {
        "runs": runs,
        "axes": axes,
        "metric": metric,
        "num_models": len(full),
        "devices": dp.num_devices,
        "epochs": epochs,
        "batch_size": batch_size,
        "nesterov": nesterov,
        "vectorize": vectorize,
        "seconds": time.perf_counter() - start,
    }
    results["best"] = best_index(results, metric)
    return SweepResult(final_state, results)


def best_index(results: Mapping[str, Any], metric: str = "val_loss") -> int:
    """Index of the run with the lowest final `metric` (highest for accuracies); NaN loses.

    Raises:
      ValueError: a metric the runs do not have, or no run with a finite value.
    """
    values = [run["final"].get(metric) for run in results["runs"]]
    if any(v is None for v in values):
        have = sorted(results["runs"][0]["final"])
        raise ValueError(f"metric {metric!r} not in the results; use one of {have}")
    sign = -1.0 if "accuracy" in metric else 1.0
    scored = [(sign * v, i) for i, v in enumerate(values) if math.isfinite(v)]
    if not scored:
        raise ValueError(f"every run has a non-finite {metric}: all diverged; lower learning_rate")
    return min(scored)[1]


def best(results: Mapping[str, Any], metric: str = "val_loss") -> dict:
    """The run (a dict of `results["runs"]`) with the best final `metric` (`best_index`)."""
    return results["runs"][best_index(results, metric)]


def format_results(results: Mapping[str, Any], metric: str | None = None) -> str:
    """A markdown table: one row per run, swept values, final metrics, best marked `*`."""
    metric = metric or results["metric"]
    winner = best_index(results, metric)
    axes = list(results["axes"]) or ["seed"]
    columns = ["run", *axes]
    columns += [c for c in RESULT_COLUMNS if c in results["runs"][0]["final"]]
    columns.append("best")
    rows = []
    for i, run in enumerate(results["runs"]):
        row = {"run": i, **{a: run["config"][a] for a in axes}, **run["final"]}
        row["best"] = "*" if i == winner else ""
        rows.append(row)
    return metrics.format_table(rows, columns)


def plot_results(results: Mapping[str, Any], path: str | os.PathLike, *, title: str = "") -> None:
    """One PNG of every run's curves: train loss per log interval, validation loss per epoch.

    The best run (by `results["metric"]`) is drawn thick; a legend when there are <= 12 runs.
    """
    from matplotlib.figure import Figure  # lazy: plotting is optional for the library

    runs = results["runs"]
    winner = results["best"]
    has_val = "val_loss" in runs[0]["final"]
    fig = Figure(figsize=(12 if has_val else 6, 4))
    axes = fig.subplots(1, 2 if has_val else 1, squeeze=False)[0]
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for i, run in enumerate(runs):
        lw, alpha = (2.2, 1.0) if i == winner else (0.9, 0.7)
        label = run["label"] + (" (best)" if i == winner else "")
        pts = [(p["step"], p["loss"]) for p in run["curve"] if math.isfinite(p["loss"])]
        if pts:
            axes[0].plot(*zip(*pts), color=colors[i], lw=lw, alpha=alpha, label=label)
        if has_val:
            val = [(h["step"], h["val_loss"]) for h in run["history"]]
            val = [(s, v) for s, v in val if math.isfinite(v)]
            if val:
                axes[1].plot(*zip(*val), "o-", color=colors[i], lw=lw, alpha=alpha, label=label)
    axes[0].set(xlabel="step", ylabel="train loss (mean over log interval)", yscale="log")
    if has_val:
        axes[1].set(xlabel="step", ylabel="validation loss (per epoch)", yscale="log")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    if len(runs) <= 12:
        axes[-1].legend(fontsize=7)
    fig.suptitle(title or f"{len(runs)} models trained as one program")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
