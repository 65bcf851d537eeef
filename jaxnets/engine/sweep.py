"""Many models in one program: a sweep over seeds and any injected Optax hyperparameters.

K configurations (a seed and values of the optimiser's hyperparameters) train as **one**
jitted program: the train state has a leading model axis `[K, ...]` and the step of
`jaxnets.engine.train.make_train_step` is `jax.vmap`-ed over it. The hyperparameters live in the
optimiser state through `optax.inject_hyperparams`, so one Optax transform (traced once)
applies K different learning rates, momenta, weight decays... Any chain works whose
hyperparameters are injected: `optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3)`
sweeps `learning_rate`, `b1`, `weight_decay`...; `make_sweep_tx` is the seed's SGD.
(`vectorize="map"` runs the K steps one after the other inside the same program instead,
`lax.map`: the same numbers, faster for the CNN on XLA:CPU; see `make_sweep_train_step`.)
Any model the adapters support sweeps: the loss function is the train step's.

Composition with devices: the vmapped step is a function of every model's global batch,
jitted over the mesh; every device holds all K models and a slice of every model's batch,
and XLA averages each model's gradients over devices, exactly as for one model. This works
for any K and any device count that divides the batch, and a K-model sweep on N devices
equals K separate runs on 1.

A configuration is a dict over `seed` and the injected names; missing entries come from the
transform's own values. Its `seed` decides the model's initialisation, its per-step
randomness and its data order: `model_key, data_key = jax.random.split(jax.random.key(seed))`,
so each configuration's run equals `loop.fit` with `create_train_state(..., key=model_key)`
and `data_key=data_key` (what the tests check, to 1e-5). The loop is `loop.fit` itself.

Example:
    >>> configs = grid(**parse_sweep(["seed=0:2", "learning_rate=0.01,0.1"]))
    >>> [(c["seed"], c["learning_rate"]) for c in configs]
    [(0, 0.01), (0, 0.1), (1, 0.01), (1, 0.1)]
    >>> result = fit_sweep(objective, make_sweep_tx(DEFAULTS), configs, {"image": x, "label": y},
    ...                    val_data, epochs=2, batch_size=100)      # doctest: +SKIP
    >>> print(format_results(result.results))                      # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnets.core import optim
from jaxnets.core.checks import POSITIVE_INT, check_argument
from jaxnets.core.types import Batch, PRNGKey
from jaxnets.data.batching import num_examples
from jaxnets.engine import hooks, indices, loop, sharding, train

# The seed CNN's optimiser (SEEDS.md): SGD 0.05, Nesterov 0.9, inverse-time decay 1e-6.
SGD_HYPERPARAMETERS = ("learning_rate", "decay", "momentum", "weight_decay", "l1")
SWEEPABLE = ("seed", *SGD_HYPERPARAMETERS)
DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "learning_rate": 0.05,
    "decay": 1e-6,
    "momentum": 0.9,
    "weight_decay": 0.0,
    "l1": 0.0,
}
VECTORIZE = ("vmap", "map")
RESULT_COLUMNS = ("loss", "accuracy", "val_loss", "val_accuracy")

SWEEP_SYNTAX = (
    "write NAME=a,b,c (a list of numbers) or NAME=start:stop (the integers start, ..., "
    "stop-1), one spec per name, e.g. ['seed=0:8', 'learning_rate=0.01,0.05']"
)


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse_sweep(specs: Sequence[str], *, allowed: Sequence[str] | None = SWEEPABLE) -> dict:
    """The axes of a grid from specs (an experiment's `--sweep` flags): `["lr=0.1", "seed=0:8"]`.

    Args:
      specs: one `NAME=a,b,c` (numbers) or `NAME=start:stop` (integers start..stop-1) each.
      allowed: the valid names (None: any).

    Returns:
      `{name: [values]}` in flag order; ints stay ints, anything else becomes a float.

    Raises:
      ValueError: naming the spec ("sweep spec 'lr=x': ..."), for bad syntax, a
        non-number, an empty range, an unknown or repeated name.
    """
    axes: dict[str, list] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        name, values = name.strip(), values.strip()
        if not sep or not name or not values:
            raise ValueError(f"sweep spec {spec!r}: expected NAME=VALUES; {SWEEP_SYNTAX}")
        if allowed is not None and name not in allowed:
            raise ValueError(
                f"sweep spec {spec!r}: unknown name {name!r}; sweepable: {', '.join(allowed)}"
            )
        if name in axes:
            raise ValueError(
                f"sweep spec {spec!r}: {name!r} is given twice; put all its values in one spec "
                f"({name}=a,b,c)"
            )
        if ":" in values:
            start, _, stop = values.partition(":")
            try:
                lo, hi = int(start), int(stop)
            except ValueError:
                raise ValueError(
                    f"sweep spec {spec!r}: {values!r} is not an integer range start:stop; "
                    f"{SWEEP_SYNTAX}"
                ) from None
            if hi <= lo:
                raise ValueError(
                    f"sweep spec {spec!r}: empty range {lo}:{hi}; use e.g. {lo}:{lo + 4}"
                )
            axes[name] = list(range(lo, hi))
            continue
        parsed = []
        for text in values.split(","):
            try:
                value = _number(text.strip())
            except ValueError:
                raise ValueError(
                    f"sweep spec {spec!r}: {text.strip()!r} is not a number; {SWEEP_SYNTAX}"
                ) from None
            if not math.isfinite(value):
                raise ValueError(f"sweep spec {spec!r}: {text.strip()!r} is not finite")
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


def injected_hyperparameters(tx: optax.GradientTransformation, params: Any) -> dict:
    """`{name: float}` of the hyperparameters `optax.inject_hyperparams` put in `tx`'s state.

    Args:
      tx: the transform.
      params: the params pytree (arrays or `jax.ShapeDtypeStruct`s).
    """
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    found: dict = {}
    is_injected = lambda x: hasattr(x, "hyperparams")
    for node in jax.tree.leaves(tx.init(zeros), is_leaf=is_injected):
        if is_injected(node):
            found.update({k: float(v) for k, v in node.hyperparams.items() if jnp.ndim(v) == 0})
    return found


def complete_configs(
    configs: Sequence[Mapping[str, Any]],
    base: Mapping[str, Any],
    *,
    names: Sequence[str] = SGD_HYPERPARAMETERS,
) -> list[dict]:
    """Every config with `seed` and all of `names` (from `base`, then `DEFAULTS`), checked.

    Raises:
      ValueError: no configs, an unknown name, a non-integer seed, a non-finite value; for
        the seed's SGD names: a negative value or momentum >= 1.
    """
    if not configs:
        raise ValueError("a sweep needs at least one configuration; e.g. configs=[{'seed': 0}]")
    allowed = ("seed", *names)
    full = []
    for i, config in enumerate(configs):
        unknown = sorted(set(config) - set(allowed)) + sorted(set(base) - set(allowed))
        if unknown:
            raise ValueError(
                f"configuration {i}: unknown names {unknown}; sweepable: {', '.join(allowed)}"
            )
        c = {**{k: v for k, v in DEFAULTS.items() if k in allowed}, **base, **config}
        if not isinstance(c.get("seed", 0), (int, np.integer)) or isinstance(c.get("seed"), bool):
            raise ValueError(f"configuration {i}: seed must be an int, got {c['seed']!r}")
        for name in names:
            value = c.get(name)
            if value is None:
                continue
            sgd_name = name in SGD_HYPERPARAMETERS
            if not (isinstance(value, (int, float)) and math.isfinite(value)) or (
                sgd_name and value < 0
            ):
                low = " >= 0" if sgd_name else ""
                raise ValueError(
                    f"configuration {i}: {name} must be a finite number{low}, got {value!r}"
                )
        if c.get("momentum", 0) >= 1 and "momentum" in names:
            raise ValueError(f"configuration {i}: momentum must be in [0, 1), got {c['momentum']}")
        full.append(
            {
                "seed": int(c.get("seed", 0)),
                **{k: float(c[k]) for k in names if c.get(k) is not None},
            }
        )
    return full


def seed_keys(seed: int) -> tuple[PRNGKey, PRNGKey]:
    """`(model_key, data_key)` of a configuration's seed (module docstring)."""
    model_key, data_key = jax.random.split(jax.random.key(seed))
    return model_key, data_key


def _sgd(learning_rate, decay, momentum, weight_decay, l1, *, nesterov=False):
    return optim.sgd(
        optim.inverse_time_decay(learning_rate, decay),
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
        l1=l1,
    )


def make_sweep_tx(
    hyperparams: Mapping[str, Any], *, nesterov: bool = False
) -> optax.GradientTransformation:
    """The seed's SGD, `optim.sgd` with inverse-time decay, its hyperparameters injected.

    `learning_rate, decay, momentum, weight_decay, l1` are float32 arrays in the optimiser
    state (`optax.inject_hyperparams`), so a state stacked over K models carries K values of
    each. Any other chain sweeps the same way once built with `optax.inject_hyperparams`.

    Args:
      hyperparams: a mapping with the names of `SGD_HYPERPARAMETERS` (extra keys ignored).
      nesterov: Keras' Nesterov momentum (static: the same for every model of a sweep).
    """
    return optax.inject_hyperparams(_sgd, static_args=("nesterov",))(
        **{k: hyperparams[k] for k in SGD_HYPERPARAMETERS}, nesterov=nesterov
    )


def create_sweep_state(
    init_fn: train.InitFn,
    tx: optax.GradientTransformation,
    configs: Sequence[Mapping[str, Any]],
    sample_batch: Batch,
) -> train.TrainState:
    """K train states stacked along a leading model axis, initialised in one program.

    Model k is `train.create_train_state(init_fn, tx_k, sample_batch, key=seed_keys(seed_k)[0])`
    where `tx_k` is `tx` with config k's injected hyperparameters, bit for bit.

    Args:
      init_fn: an adapter's `init` (`(key, batch) -> (params, model_state)`).
      tx: a transform with injected hyperparameters (`optax.inject_hyperparams`).
      configs: complete configurations (`complete_configs`).
      sample_batch: a batch of the right shapes and dtypes.
    """
    keys = jnp.stack([train.raw_key(seed_keys(c["seed"])[0]) for c in configs])
    names = sorted({k for c in configs for k in c if k != "seed"})
    values = {k: jnp.asarray([c[k] for c in configs], jnp.float32) for k in names}

    def init_one(raw, hp):
        state = train.create_train_state(
            init_fn, tx, sample_batch, key=jax.random.wrap_key_data(raw)
        )
        if not hp:
            return state
        dtypes = {k: optax.tree_utils.tree_get(state.opt_state, k).dtype for k in hp}
        hp = {k: v.astype(dtypes[k]) for k, v in hp.items()}
        return state._replace(opt_state=optax.tree_utils.tree_set(state.opt_state, **hp))

    return jax.jit(jax.vmap(init_one))(keys, values)


def make_sweep_train_step(
    loss_fn: train.LossFn,
    tx: optax.GradientTransformation,
    *,
    vectorize: str = "vmap",
) -> Callable:
    """`train.make_train_step` over K models at once: `(states, batch) -> (states, metrics)`.

    Args:
      loss_fn, tx: as in `train.make_train_step`.
      vectorize: "vmap" batches the K models' arithmetic (wide matmuls: fast on GPU/TPU and
        for small dense nets everywhere); "map" runs the K steps one after the other inside
        the same compiled program (`lax.map`), which on XLA:CPU is faster for the CNN,
        whose vmapped convolutions become batched matmuls XLA:CPU runs slowly (measured:
        K=8 forward+backward 188 ms vmapped vs 100 ms mapped vs 8 x 14 ms alone).

    The returned step takes `states` with a leading model axis `[K, ...]` and a batch whose
    leaves are `[batch, K, ...]` (batch first: the layout in which
    `sharding.place_columns` splits `[steps, batch, K]` example indices over devices),
    and returns the states and metrics with a `[K]` axis. `programs.make_epoch_program` runs it.
    """
    if vectorize not in VECTORIZE:
        raise ValueError(f"vectorize={vectorize!r}: use one of {VECTORIZE}")
    step = train.make_train_step(loss_fn, tx)
    if vectorize == "vmap":
        step_fn = jax.vmap(step, in_axes=(0, 1))
    else:

        def step_fn(states, batch):
            batch = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), batch)
            return jax.lax.map(lambda args: step(*args), (states, batch))

    return step_fn


def make_sweep_eval_step(eval_fn: train.EvalFn) -> Callable:
    """`train.make_eval_step` vmapped over K models' states (the same batch for all)."""
    return jax.vmap(train.make_eval_step(eval_fn), in_axes=(0, None, None))


def sweep_epoch_indices(
    data_keys: Sequence[PRNGKey], epoch: int, num_examples: int, batch_size: int
) -> np.ndarray:
    """`[steps, batch_size, K]` example indices: model k's `indices.epoch_indices`."""
    return np.stack(
        [indices.epoch_indices(k, epoch, num_examples, batch_size) for k in data_keys], axis=-1
    )


class _Sink(NamedTuple):
    """A `hooks.Log` sink calling a function."""

    write: Callable[[dict], None]

    def close(self) -> None:
        pass


class SweepResult(NamedTuple):
    state: train.TrainState  # host arrays, leading model axis [K]
    results: dict  # JSON-serialisable: what sweep.json holds


def _label(config: Mapping[str, Any], axes: Sequence[str]) -> str:
    return " ".join(f"{k}={config[k]:g}" for k in axes) or "base"


def _per_model(record: Mapping[str, Any], num_models: int) -> list[dict]:
    """One record per model of a record whose metrics are lists of K values."""
    out: list[dict] = [{} for _ in range(num_models)]
    for name, value in record.items():
        for k in range(num_models):
            out[k][name] = float(value[k]) if isinstance(value, list) else value
    return out


def fit_sweep(
    objective: Any,
    tx: optax.GradientTransformation,
    configs: Sequence[Mapping[str, Any]],
    train_data: Batch,
    val_data: Batch | None = None,
    *,
    epochs: int,
    batch_size: int,
    base: Mapping[str, Any] = {},  # noqa: B006 - read only
    mesh: Any = None,
    steps_per_call: int | None = None,
    log_every_steps: int = 10,
    vectorize: str = "vmap",
    on_epoch: Callable[[int, list[dict]], None] | None = None,
    progress: bool = False,
) -> SweepResult:
    """Trains every configuration for `epochs` epochs as one vmapped, device-parallel program.

    Args:
      objective: an adapter's `Objective` (`init`, `loss_fn`, `eval_fn`).
      tx: the optimiser, hyperparameters injected (`make_sweep_tx`, or any chain built
        with `optax.inject_hyperparams`); configs may set any of them.
      configs: dicts over `seed` and the injected names (e.g. from `grid`); missing entries
        from `base`, then the transform's own values.
      train_data: the training set, a host batch pytree.
      val_data: a host batch pytree evaluated after every epoch (None: no validation).
      epochs: epochs per model.
      batch_size: global batch per model (divisible by the device count).
      base: values for entries the configs leave out.
      mesh: the devices (`sharding.make_mesh()`, default: all).
      steps_per_call: steps per device call (None: measured by `loop.fit`).
      log_every_steps: train curves get one point (the mean over the interval) this often.
      vectorize: "vmap" or "map" (`make_sweep_train_step`); the numbers are the same.
      on_epoch: `(epoch, records)` after each epoch, one record per model (host-side logging).
      progress: show a progress bar per epoch.

    Returns:
      `SweepResult(state, results)`: the final states (host, `[K, ...]`) and a dict with
      `runs` (per configuration: `config`, `label`, `final` {loss, accuracy, val_loss,
      val_accuracy...}, `history` per epoch, `curve` per log interval), `axes` (the names that
      vary), `best` (index by `best_index`), `metric`, `num_models`, `devices`, `seconds`.
    """
    if vectorize not in VECTORIZE:
        raise ValueError(f"vectorize={vectorize!r}: use one of {VECTORIZE}")
    check_argument("epochs", epochs, POSITIVE_INT)
    check_argument("batch_size", batch_size, POSITIVE_INT)
    check_argument("log_every_steps", log_every_steps, POSITIVE_INT)
    n = num_examples(train_data, "training data")
    sample = jax.tree.map(lambda x: np.asarray(x[:1]), train_data)
    params_shape = jax.eval_shape(objective.init, jax.random.key(0), sample)[0]
    injected = injected_hyperparameters(tx, params_shape)
    if not injected and any(set(c) - {"seed"} for c in configs):
        raise ValueError(
            "the configs set hyperparameters but tx has none injected; build it with "
            "optax.inject_hyperparams(...) (e.g. sweep.make_sweep_tx)"
        )
    full = complete_configs(configs, {**injected, **base}, names=tuple(sorted(injected)))
    mesh = sharding.make_mesh() if mesh is None else mesh
    sharding.check_batch(mesh, batch_size)
    indices.epoch_indices(jax.random.key(0), 0, n, batch_size)  # validates the batch
    start = time.perf_counter()
    state = create_sweep_state(objective.init, tx, full, sample)
    step = make_sweep_train_step(objective.loss_fn, tx, vectorize=vectorize)
    fit_hooks: list[hooks.Hook] = []
    if val_data is not None:
        eval_step = make_sweep_eval_step(objective.eval_fn)
        fit_hooks.append(hooks.Evaluate(eval_step, val_data, batch_size=batch_size))
    data_keys = [seed_keys(c["seed"])[1] for c in full]
    curves: list[list[dict]] = [[] for _ in full]
    histories: list[list[dict]] = [[] for _ in full]

    def write(record):
        per_model = _per_model(record, len(full))
        if record["kind"] == "train":
            for curve, r in zip(curves, per_model):
                curve.append({k: v for k, v in r.items() if k not in ("kind", "epoch")})
            return
        for history, r in zip(histories, per_model):
            history.append({k: v for k, v in r.items() if k != "kind"})
        if on_epoch is not None:
            on_epoch(record["epoch"] - 1, [h[-1] for h in histories])

    # No NonFinite guard: one diverged model must not stop the others.
    fit_hooks.append(hooks.Log(_Sink(write), every_steps=log_every_steps))
    if progress:
        fit_hooks.append(hooks.Progress(epochs))
    result = loop.fit(
        state,
        step,
        train_data,
        data_key=data_keys[0],
        epochs=epochs,
        batch_size=batch_size,
        hooks=fit_hooks,
        mesh=mesh,
        steps_per_call=steps_per_call,
        order=lambda epoch: sweep_epoch_indices(data_keys, epoch, n, batch_size),
    )
    final_state = jax.device_get(result.state)
    axes = [name for name in full[0] if len({c[name] for c in full}) > 1]
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
        "devices": sharding.num_devices(mesh),
        "epochs": epochs,
        "batch_size": batch_size,
        "vectorize": vectorize,
        "steps_per_call": result.steps_per_call,
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
