"""Loss and eval functions of the train-step contract, built from a Flax Linen or NNX module.

`linen(module, loss=..., metrics=...)` and `nnx(module, loss=..., metrics=...)` return an
`Objective(init, loss_fn, eval_fn)`: `init(key, batch) -> (params, model_state)`, and the two
pure functions `jaxnets.engine.train` takes. They handle what a hand-written step gets wrong:
- the model's non-trainable collections (Linen `batch_stats`, NNX `BatchStat`) live in
  `model_state`, are updated in training (`mutable`) and read, not updated, in evaluation;
- randomness (dropout) comes from the step key, a different key every step;
- the train/eval switch: `module(x, train=True)` in training, `train=False` in evaluation,
  found by name (`train`, `training`, `deterministic` inverted, ...: `linen(mode_arg=)`),
  an ambiguous module refused; NNX modules get `.train()` / `.eval()`;
- the loss: per-example values `[batch]` are averaged (and their mean is reported as
  `loss`), a scalar is used as returned (a weighted mean); `penalty(params)` is added.

Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from jaxnets import losses, metrics
    >>> objective = linen(nn.Dense(3), loss=losses.softmax_cross_entropy,
    ...                   metrics={"accuracy": metrics.accuracy})
    >>> batch = {"image": jnp.ones((4, 5)), "label": jnp.array([0, 1, 2, 0])}
    >>> params, model_state = objective.init(jax.random.key(0), batch)
    >>> loss, (m, _) = objective.loss_fn(params, model_state, batch, jax.random.key(1))
    >>> sorted(m)
    ['accuracy', 'loss']
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxnets.core import metrics as jmetrics
from jaxnets.core.types import Array, Batch, Params, PRNGKey, PyTree
from jaxnets.engine import train

# (inputs, *, keys) -> model inputs; keys: [batch] per-example keys in training, else None.
Preprocess = Callable[..., Any]
# (outputs, targets) -> per-example losses [batch] or a scalar.
Loss = Callable[[Any, Any], Array]
# A batch key, or a function of the batch.
Selector = str | Callable[[Batch], Any]


INTEGER_LOSS = (
    "the loss returned {dtype} values of shape {shape}: an integer (or boolean) loss has a "
    "zero gradient everywhere, so training would never move the parameters; return "
    "floating-point losses (e.g. losses.softmax_cross_entropy, not a count of errors; report "
    "counts as metrics)"
)


class Objective(NamedTuple):
    """A model's pure functions for `jaxnets.engine.train`: init, loss_fn, eval_fn, and the
    forward pass `apply(params, model_state, inputs) -> outputs` in evaluation mode (what
    `jaxnets.engine.serving` predicts with and exports; `inputs` are the model's, not a batch)."""

    init: train.InitFn
    loss_fn: train.LossFn
    eval_fn: train.EvalFn
    apply: Callable[[Params, PyTree, Any], Any] | None = None


def _select(batch: Batch, selector: Selector, what: str) -> Any:
    if callable(selector):
        return selector(batch)
    if not isinstance(batch, Mapping) or selector not in batch:
        have = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise KeyError(
            f"the batch has no {selector!r} ({what}); it has {have}: pass {what}=<a key of the "
            "batch or a function of the batch>"
        )
    return batch[selector]


def _check_metrics(metrics: Mapping[str, Callable]) -> dict[str, Callable]:
    metrics = dict(metrics)
    for name, fn in metrics.items():
        if name in ("loss", "penalty"):
            raise ValueError(f"metric name {name!r} is reserved (the adapter reports it)")
        if not callable(fn):
            raise TypeError(f"metric {name!r} is a {type(fn).__name__}; give a function")
    return metrics


class _Parts(NamedTuple):
    """The module-independent half of an adapter: data selection, loss and metrics."""

    inputs: Selector
    targets: Selector
    loss: Loss
    metrics: dict[str, Callable]
    penalty: Callable[[Params], Array] | None
    preprocess: Preprocess | None

    def model_inputs(self, batch: Batch, key: PRNGKey | None) -> Any:
        x = _select(batch, self.inputs, "inputs")
        if self.preprocess is None:
            return x
        keys = None
        if key is not None:
            n = jax.tree.leaves(x)[0].shape[0]
            keys = train.example_keys(key, n)
        return self.preprocess(x, keys=keys)

    def objective(self, params, outputs, batch, mask) -> tuple[Array, dict]:
        """(differentiated objective, metrics) of a batch's model outputs."""
        targets = _select(batch, self.targets, "targets")
        value = jnp.asarray(self.loss(outputs, targets))
        n = jax.tree.leaves(outputs)[0].shape[0]
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise TypeError(INTEGER_LOSS.format(dtype=value.dtype, shape=value.shape))
        if value.ndim == 0:
            loss = value
            if mask is None:  # training: no padding, every batch of the same size
                reported = jmetrics.Mean.from_scalar(value)
            else:  # evaluation: each example's loss alone, so the padding is left out
                reported = jmetrics.Mean.from_values(self.per_example_loss(outputs, targets), mask)
        elif value.shape == (n,):
            loss = jnp.mean(value)
            reported = jmetrics.Mean.from_values(value, mask)
        else:
            raise ValueError(
                f"the loss returned shape {value.shape}; return per-example losses [{n}] or a "
                "scalar (e.g. reduction='none' or reduction='mean')"
            )
        out: dict[str, jmetrics.Metric] = {"loss": reported}
        if self.penalty is not None:
            p = self.penalty(params)
            loss = loss + p
            out["penalty"] = jmetrics.Mean.from_scalar(p)
        for name, fn in self.metrics.items():
            out[name] = jmetrics.as_metric(fn(outputs, targets, mask), mask, name, batch=n)
        return loss, out

    def per_example_loss(self, outputs: Any, targets: Any) -> Array:
        """`[batch]`: a scalar loss of each example alone (a batch of one)."""
        one = lambda tree: jax.tree.map(lambda x: x[None], tree)  # noqa: E731
        return jax.vmap(lambda o, t: jnp.asarray(self.loss(one(o), one(t))))(outputs, targets)


def _stream_key(key: PRNGKey) -> PRNGKey:
    """The key the module's rng streams (dropout) are split from: `fold_in(key, 0)`, the key
    the first device drew from when each device folded in its index, so a one-device run
    keeps its numbers. The mask is drawn for the global batch: any device count agrees."""
    return jax.random.fold_in(key, 0)


def _parts(inputs, targets, loss, metrics, penalty, preprocess) -> _Parts:
    if not callable(loss):
        raise TypeError(f"loss must be a function (outputs, targets) -> losses, got {loss!r}")
    return _Parts(inputs, targets, loss, _check_metrics(metrics), penalty, preprocess)


# A Linen module's train/eval switch, by name: passed `True` in training ...
TRAINING_NAMES = ("train", "training", "is_training")
# ... and these `False` in training (`deterministic=True` is evaluation).
EVAL_NAMES = ("deterministic", "use_running_average", "is_eval", "eval_mode", "inference")
# Either a name (its meaning from the lists above, else True in training) or
# (name, value in training); '' for a module without a switch.
ModeArg = str | tuple[str, bool]

AMBIGUOUS_MODE = (
    "{module}: {what}; jaxnets cannot tell which argument switches training and evaluation "
    "(Dropout, BatchNorm). Pass mode_arg=<its name> (e.g. mode_arg={example!r}; "
    "mode_arg=(name, value_in_training) for a name not in {known}), or mode_arg='' if the "
    "module has no train/eval switch"
)


class _Mode(NamedTuple):
    """How to put a Linen module in training or evaluation mode."""

    name: str  # '' for none
    in_training: bool  # the value passed in training
    field: bool  # a module attribute (set by `clone`), not a `__call__` argument

    def module(self, module: Any, training: bool) -> Any:
        if not self.name or not self.field:
            return module
        return module.clone(**{self.name: self.in_training == training})

    def kwargs(self, training: bool) -> dict:
        if not self.name or self.field:
            return {}
        return {self.name: self.in_training == training}


def _call_arguments(module: Any) -> dict[str, inspect.Parameter]:
    try:
        parameters = inspect.signature(module.__call__).parameters
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {n: p for n, p in parameters.items() if p.kind in kinds}


def _fields(module: Any) -> set[str]:
    if not dataclasses.is_dataclass(module):
        return set()
    return {f.name for f in dataclasses.fields(module)} - {"parent", "name"}


def _boolean(parameter: inspect.Parameter) -> bool:
    annotation = parameter.annotation
    annotated = annotation is bool or (isinstance(annotation, str) and "bool" in annotation)
    return annotated or isinstance(parameter.default, bool)


def _find_mode(module: Any, mode_arg: ModeArg | None) -> _Mode:
    """The module's train/eval switch: `mode_arg`, else found by name in its `__call__`
    arguments or its attributes; refuses a module where the name does not decide it."""
    arguments, fields = _call_arguments(module), _fields(module)
    label = type(module).__name__
    known = TRAINING_NAMES + EVAL_NAMES
    if mode_arg is not None:
        name, in_training = (
            mode_arg if isinstance(mode_arg, tuple) else (mode_arg, mode_arg not in EVAL_NAMES)
        )
        if not name:
            return _Mode("", True, False)
        if name not in arguments and name not in fields:
            raise ValueError(
                f"mode_arg={mode_arg!r}: {label} has no argument or attribute {name!r}; its "
                f"__call__ takes {list(arguments)[1:] or 'no keyword'}, its attributes are "
                f"{sorted(fields) or 'none'}"
            )
        return _Mode(name, bool(in_training), name not in arguments)
    found = [n for n in known if n in arguments] or [n for n in known if n in fields]
    if len(found) > 1:
        raise ValueError(
            AMBIGUOUS_MODE.format(
                module=label,
                what=f"it takes both {found[0]!r} and {found[1]!r}",
                example=found[0],
                known=known,
            )
        )
    if found:
        name = found[0]
        return _Mode(name, name not in EVAL_NAMES, name not in arguments)
    # No known name: a boolean argument other than the input may be the switch.
    booleans = [n for n, p in list(arguments.items())[1:] if _boolean(p)]
    if booleans:
        raise ValueError(
            AMBIGUOUS_MODE.format(
                module=label,
                what=f"its __call__ takes the boolean argument {booleans[0]!r}",
                example=booleans[0],
                known=known,
            )
        )
    return _Mode("", True, False)


def linen(
    module: Any,
    *,
    loss: Loss,
    metrics: Mapping[str, Callable] = {},  # noqa: B006 - read only
    inputs: Selector = "image",
    targets: Selector = "label",
    penalty: Callable[[Params], Array] | None = None,
    preprocess: Preprocess | None = None,
    rng_streams: Sequence[str] = ("dropout",),
    mode_arg: ModeArg | None = None,
) -> Objective:
    """The `Objective` of a Flax Linen module.

    Args:
      module: a Linen module; its train/eval switch is found by name (see `mode_arg`):
        `module.apply(variables, x, train=...)` when its `__call__` takes `train`, likewise
        `training` and `is_training`; `deterministic=not training` (and the other
        `EVAL_NAMES`); a module attribute of those names is set with `module.clone`.
      loss: `(outputs, targets) -> [batch]` per-example losses (averaged) or a scalar
        (used as is), e.g. `losses.softmax_cross_entropy`.
      metrics: `{name: (outputs, targets, mask) -> Metric or per-example values}`, e.g.
        `{"accuracy": metrics.accuracy}`; `loss` (and `penalty`) are always reported.
      inputs, targets: the batch keys (or functions of the batch) of the model's input and
        of what the loss compares with.
      penalty: `params -> scalar` added to the loss (`regularizers.l2_penalty`, ...).
      preprocess: `(inputs, *, keys) -> model inputs`; keys `[batch]` per-example keys in
        training (augmentation), None in evaluation.
      rng_streams: the Linen rng names the module draws from in training.
      mode_arg: the name of the module's train/eval argument or attribute, when finding
        it by name is not enough: a name in `EVAL_NAMES` is passed `not training`, another
        `training`; `(name, value_in_training)` for any name; '' for a module without one.
        Default: found by name; a module with two known names, or with an unknown boolean
        `__call__` argument, is refused (ValueError) rather than trained in the wrong mode.

    The functions are written for the global batch (jitted over a mesh by `jaxnets.engine.loop`):
    BatchNorm statistics are the global batch's and a dropout mask is drawn for the global
    batch (JAX's partitionable threefry), so 1 and N devices give the same numbers; no axis
    name is needed anywhere in the module.
    """
    parts = _parts(inputs, targets, loss, metrics, penalty, preprocess)
    mode = _find_mode(module, mode_arg)
    streams = tuple(rng_streams)
    train_module, eval_module = mode.module(module, True), mode.module(module, False)

    def flags(training: bool) -> dict:
        return mode.kwargs(training)

    def init_fn(key: PRNGKey, batch: Batch) -> tuple[Params, PyTree]:
        x = parts.model_inputs(batch, None)
        # The params key is `key` itself: `module.init(key, x)` gives the same parameters.
        rngs = {"params": key, **{s: jax.random.fold_in(key, i + 1) for i, s in enumerate(streams)}}
        variables = eval_module.init(rngs, x, **flags(False))
        variables = dict(variables)
        params = variables.pop("params", {})
        return params, variables

    def loss_fn(params, model_state, batch, key):
        x = parts.model_inputs(batch, key)
        rngs = dict(zip(streams, jax.random.split(_stream_key(key), len(streams))))
        variables = {"params": params, **model_state}
        if model_state:
            outputs, new_state = train_module.apply(
                variables, x, rngs=rngs, mutable=list(model_state), **flags(True)
            )
            new_state = {**model_state, **new_state}
        else:
            outputs, new_state = train_module.apply(variables, x, rngs=rngs, **flags(True)), {}
        loss, out = parts.objective(params, outputs, batch, None)
        return loss, (out, new_state)

    def apply_fn(params, model_state, inputs):
        x = inputs if parts.preprocess is None else parts.preprocess(inputs, keys=None)
        return eval_module.apply({"params": params, **model_state}, x, **flags(False))

    def eval_fn(params, model_state, batch, mask):
        outputs = apply_fn(params, model_state, _select(batch, parts.inputs, "inputs"))
        return parts.objective(params, outputs, batch, mask)[1]

    return Objective(init_fn, loss_fn, eval_fn, apply_fn)


def nnx(
    module: Any,
    *,
    loss: Loss,
    metrics: Mapping[str, Callable] = {},  # noqa: B006 - read only
    inputs: Selector = "image",
    targets: Selector = "label",
    penalty: Callable[[Params], Array] | None = None,
    preprocess: Preprocess | None = None,
) -> Objective:
    """The `Objective` of a Flax NNX module (split/merge inside the pure functions).

    `params` are the module's `nnx.Param` variables, `model_state` everything else
    (`BatchStat`, the rng streams' keys and counts). An NNX module is initialised when it is
    built, so `init` ignores its key: the initial parameters are the module's own (a sweep
    over seeds varies the data order and the randomness, not the initialisation; build one
    module per seed for that). The module passed in is not changed:
    each call merges a fresh copy. In training every rng stream is reseeded from the step
    key, so dropout differs between steps and resumes exactly; `.train()` / `.eval()` set
    the mode (Dropout, BatchNorm).

    Args: as `linen` (without rng_streams: the module's own streams are reseeded).
    """
    from flax import nnx as fnnx

    parts = _parts(inputs, targets, loss, metrics, penalty, preprocess)
    model = fnnx.clone(module)
    model.train()
    train_def, params0, rest0 = fnnx.split(model, fnnx.Param, ...)  # type: ignore[misc]
    model.eval()
    eval_def = fnnx.graphdef(model)
    streams = sorted(
        {s.key.tag for _, s in fnnx.iter_graph(model) if isinstance(s, fnnx.RngStream)}
    )

    def init_fn(key: PRNGKey, batch: Batch) -> tuple[Params, PyTree]:
        del key, batch  # an NNX module is initialised when it is built
        return fnnx.to_pure_dict(params0), fnnx.to_pure_dict(rest0)

    def _state(template, pure):
        state = jax.tree.map(lambda x: x, template)  # a copy: the template is never changed
        fnnx.replace_by_pure_dict(state, pure)
        return state

    def _merge(graphdef, params, model_state):
        return fnnx.merge(graphdef, _state(params0, params), _state(rest0, model_state))

    def loss_fn(params, model_state, batch, key):
        m = _merge(train_def, params, model_state)
        if streams:
            keys = jax.random.split(_stream_key(key), len(streams))
            fnnx.reseed(m, **dict(zip(streams, keys)))
        outputs = m(parts.model_inputs(batch, key))
        loss, out = parts.objective(params, outputs, batch, None)
        _, _, new_state = fnnx.split(m, fnnx.Param, ...)
        return loss, (out, fnnx.to_pure_dict(new_state))

    def apply_fn(params, model_state, inputs):
        x = inputs if parts.preprocess is None else parts.preprocess(inputs, keys=None)
        return _merge(eval_def, params, model_state)(x)

    def eval_fn(params, model_state, batch, mask):
        outputs = apply_fn(params, model_state, _select(batch, parts.inputs, "inputs"))
        return parts.objective(params, outputs, batch, mask)[1]

    return Objective(init_fn, loss_fn, eval_fn, apply_fn)
