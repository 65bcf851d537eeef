"""Loss functions: pure, jit/grad/vmap-safe, per-example unless a `reduction` says otherwise.

Conventions:
  * Classes sit on the last axis (channels-last): scores/logits/probabilities are
    `[..., num_classes]`, integer labels are `[...]`, one-hot/probability labels
    `[..., num_classes]`. PyTorch puts classes on axis 1; here it is always axis -1.
  * Elementwise losses (`squared_error`, `l2_loss`, `absolute_error`, `hinge`,
    `binary_cross_entropy`, `sigmoid_binary_cross_entropy`) return one value per element.
    Per-class losses return one value per example (the class axis is reduced).
  * `reduction='none'` keeps those values, `'sum'` adds them all, `'mean'` averages them all.
  * Predictions and labels of different shapes never broadcast: that silent [N] vs [N, 1]
    -> [N, N] broadcast is the classic sigmoid-cross-entropy bug; it raises ValueError.
  * Integer labels are range-checked when they are concrete (numpy or a committed jax array,
    i.e. called outside jit); inside jit/vmap/grad the check is skipped so no device sync is
    added. Out-of-range traced labels give unspecified values, as with any gather in XLA.

Naming, and the tutorial's `mean_squared_error`: the numpy tutorial of SEEDS.md section 4
calls `0.5 * sum((y - t)**2)` "mean_squared_error". That is not a mean; here it is
`l2_loss(y, t, reduction="sum")` (`l2_loss` is `0.5 * (y - t)**2`, as `tf.nn.l2_loss` and
`optax.l2_loss`). Our `mean_squared_error` is the Keras/sklearn mean over the last axis.
The tutorial's `cross_entropy_error` is our `cross_entropy`.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxnets.core.types import Array

_REDUCTIONS = ("none", "mean", "sum")

_SHAPE_MISMATCH = (
    "{name}: {pred_name} shape {pred_shape} and labels shape {label_shape} differ; they must be "
    "equal (no broadcasting: [N] against [N, 1] would silently become [N, N]). Fix: {fix}"
)

_CLASS_LABEL_SHAPE = (
    "{name}: labels shape {label_shape} does not fit {pred_name} shape {pred_shape}; pass "
    "integer class indices of shape {index_shape} or one-hot/probability labels of shape "
    "{pred_shape}. Fix: {fix}"
)

_LABEL_RANGE = "{name}: labels must be {allowed}; found {bad} (min {lo}, max {hi}). Fix: {fix}"


def _reduce(values: Array, reduction: str, name: str) -> Array:
    if reduction == "none":
        return values
    if reduction == "mean":
        return jnp.mean(values)
    if reduction == "sum":
        return jnp.sum(values)
    raise ValueError(f"{name}: reduction={reduction!r}; use one of {_REDUCTIONS}")


def _check_reduction(reduction: str, name: str, allowed: Sequence[str] = _REDUCTIONS) -> None:
    if reduction not in allowed:
        raise ValueError(f"{name}: reduction={reduction!r}; use one of {tuple(allowed)}")


def _concrete(x) -> np.ndarray | None:
    """The value of `x` on the host if it is known outside tracing, else None (no sync)."""
    if isinstance(x, jax.core.Tracer):
        return None
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None  # a multi-host global array: this host cannot see all of it
    return np.asarray(x)


def _check_same_shape(pred, labels, name: str, pred_name: str = "predictions") -> None:
    p, t = jnp.shape(pred), jnp.shape(labels)
    if p == t:
        return
    if np.prod(p, dtype=int) == np.prod(t, dtype=int):
        fix = f"labels.reshape({p})"
    else:
        fix = f"pass exactly one label per {pred_name[:-1]}, an array of shape {p}"
    raise ValueError(
        _SHAPE_MISMATCH.format(name=name, pred_name=pred_name, pred_shape=p, label_shape=t, fix=fix)
    )


def _is_index_labels(logits, labels, name: str, pred_name: str = "logits") -> bool:
    """True for integer labels [...], False for probability labels [..., C]; else ValueError."""
    p, t = jnp.shape(logits), jnp.shape(labels)
    if len(p) == 0:
        raise ValueError(f"{name}: {pred_name} must have a class axis [..., num_classes]; got {p}")
    integer = jnp.issubdtype(jnp.result_type(labels), jnp.integer)
    if integer and t == p[:-1]:
        return True
    if not integer and t == p:
        return False
    if integer and t == p:
        fix = "one-hot labels must be floating point: labels.astype(jnp.float32)"
    elif not integer and t == p[:-1]:
        fix = "class indices must be integers: labels.astype(jnp.int32)"
    elif t == (*p[:-1], 1):
        fix = "drop the trailing axis: labels[..., 0]"
    else:
        fix = "pass one label per example"
    raise ValueError(
        _CLASS_LABEL_SHAPE.format(
            name=name,
            pred_name=pred_name,
            pred_shape=p,
            label_shape=t,
            index_shape=p[:-1],
            fix=fix,
        )
    )


def _check_class_range(labels, num_classes: int, name: str, ignore_index=None) -> None:
    values = _concrete(labels)
    if values is None or values.size == 0:
        return
    valid = (values >= 0) & (values < num_classes)
    if ignore_index is not None:
        valid |= values == ignore_index
    if valid.all():
        return
    allowed = f"class indices in [0, {num_classes})"
    if ignore_index is not None:
        allowed += f" or ignore_index={ignore_index}"
    raise ValueError(
        _LABEL_RANGE.format(
            name=name,
            allowed=allowed,
            bad=np.unique(values[~valid])[:5].tolist(),
            lo=values.min(),
            hi=values.max(),
            fix="check the number of classes and the label encoding (1-based labels: labels - 1)",
        )
    )


def zero_one(scores: Array, labels: Array, *, reduction: str = "none") -> Array:
    """0-1 loss: 1 where the highest-scoring class is not the label, else 0.

    Ties go to the lowest class index (`argmax`). Its gradient is zero everywhere.

    Args:
      scores: [..., num_classes] scores, logits or probabilities.
      labels: [...] integer class indices, or [..., num_classes] one-hot (argmax is taken).
      reduction: 'none' | 'mean' (error rate) | 'sum' (number of errors).

    Returns:
      [...] float losses in {0, 1} (dtype of `scores` if floating, else float32), or a scalar.
    """
    _check_reduction(reduction, "zero_one")
    index = _is_index_labels(scores, labels, "zero_one", "scores")
    if index:
        _check_class_range(labels, jnp.shape(scores)[-1], "zero_one")
    else:
        labels = jnp.argmax(labels, axis=-1)
    dtype = scores.dtype if jnp.issubdtype(scores.dtype, jnp.floating) else jnp.float32
    wrong = (jnp.argmax(scores, axis=-1) != labels).astype(dtype)
    return _reduce(wrong, reduction, "zero_one")


def squared_error(predictions: Array, targets: Array, *, reduction: str = "none") -> Array:
    """Squared error `(y - t)**2`, elementwise.

    Args:
      predictions: [...] float predictions y.
      targets: [...] float targets t, same shape.
      reduction: 'none' | 'mean' | 'sum' over all elements.

    Returns:
      [...] float losses, or a scalar.
    """
    _check_reduction(reduction, "squared_error")
    _check_same_shape(predictions, targets, "squared_error")
    return _reduce(jnp.square(predictions - targets), reduction, "squared_error")


def l2_loss(predictions: Array, targets: Array, *, reduction: str = "none") -> Array:
    """Half squared error `0.5 * (y - t)**2`, elementwise.

    `l2_loss(y, t, reduction="sum")` is the numpy tutorial's `mean_squared_error`
    (SEEDS.md section 4): `0.5 * sum((y - t)**2)`, e.g. 0.0673 for its `y` and one-hot `t`.

    Args:
      predictions: [...] float predictions y.
      targets: [...] float targets t, same shape.
      reduction: 'none' | 'mean' | 'sum' over all elements.

    Returns:
      [...] float losses, or a scalar.
    """
    _check_reduction(reduction, "l2_loss")
    _check_same_shape(predictions, targets, "l2_loss")
    return _reduce(0.5 * jnp.square(predictions - targets), reduction, "l2_loss")


def absolute_error(predictions: Array, targets: Array, *, reduction: str = "none") -> Array:
    """Absolute error `|y - t|`, elementwise (gradient 0 where y == t).

    Args:
      predictions: [...] float predictions y.
      targets: [...] float targets t, same shape.
      reduction: 'none' | 'mean' | 'sum' over all elements.

    Returns:
      [...] float losses, or a scalar.
    """
    _check_reduction(reduction, "absolute_error")
    _check_same_shape(predictions, targets, "absolute_error")
    return _reduce(jnp.abs(predictions - targets), reduction, "absolute_error")


def mean_squared_error(predictions: Array, targets: Array, *, reduction: str = "none") -> Array:
    """Mean squared error over the last axis (Keras `mean_squared_error`, sklearn MSE).

    Not the tutorial's `0.5 * sum(...)`: that is `l2_loss(y, t, reduction="sum")`.

    Args:
      predictions: [..., d] float predictions.
      targets: [..., d] float targets, same shape.
      reduction: 'none' | 'mean' | 'sum' over the examples `[...]`.

    Returns:
      [...] per-example `mean((y - t)**2, axis=-1)`, or a scalar.
    """
    _check_reduction(reduction, "mean_squared_error")
    _check_same_shape(predictions, targets, "mean_squared_error")
    values = jnp.mean(jnp.square(predictions - targets), axis=-1)
    return _reduce(values, reduction, "mean_squared_error")


def mean_absolute_error(predictions: Array, targets: Array, *, reduction: str = "none") -> Array:
    """Mean absolute error over the last axis (Keras `mean_absolute_error`).

    Args:
      predictions: [..., d] float predictions.
      targets: [..., d] float targets, same shape.
      reduction: 'none' | 'mean' | 'sum' over the examples `[...]`.

    Returns:
      [...] per-example `mean(|y - t|, axis=-1)`, or a scalar.
    """
    _check_reduction(reduction, "mean_absolute_error")
    _check_same_shape(predictions, targets, "mean_absolute_error")
    values = jnp.mean(jnp.abs(predictions - targets), axis=-1)
    return _reduce(values, reduction, "mean_absolute_error")


def _safe_sqrt(x: Array) -> Array:
    # sqrt'(0) is infinite and would give 0 * inf = nan; a perfect fit gets gradient 0 instead.
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def root_mean_squared_error(
    predictions: Array, targets: Array, *, reduction: str = "none"
) -> Array:
    """Root mean squared error.

    `reduction='none'` gives the per-example `sqrt(mean((y - t)**2, axis=-1))`;
    `reduction='mean'` gives the data-set RMSE `sqrt(mean((y - t)**2))` over everything
    (sklearn `root_mean_squared_error`, Keras `RootMeanSquaredError`), which is not the
    mean of the per-example values. A sum of roots has no use, so there is no 'sum'.
    The gradient at a perfect fit is 0 (not nan).

    Args:
      predictions: [..., d] float predictions.
      targets: [..., d] float targets, same shape.
      reduction: 'none' | 'mean'.

    Returns:
      [...] per-example RMSE, or the scalar RMSE.
    """
    _check_reduction(reduction, "root_mean_squared_error", ("none", "mean"))
    _check_same_shape(predictions, targets, "root_mean_squared_error")
    squared = jnp.square(predictions - targets)
    if reduction == "mean":
        return _safe_sqrt(jnp.mean(squared))
    return _safe_sqrt(jnp.mean(squared, axis=-1))


def hinge(scores: Array, labels: Array, *, reduction: str = "none") -> Array:
    """Binary hinge loss (SVM) `max(0, 1 - t * s)` with labels t in {-1, +1}, elementwise.

    Args:
      scores: [...] float decision values s.
      labels: [...] labels t in {-1, +1} (int or float), same shape. 0/1 labels are an
        error when concrete: convert with `2 * labels - 1`.
      reduction: 'none' | 'mean' | 'sum' over all elements.

    Returns:
      [...] float losses, or a scalar.
    """
    _check_reduction(reduction, "hinge")
    _check_same_shape(scores, labels, "hinge", "scores")
    values = _concrete(labels)
    if values is not None and values.size and not np.isin(values, (-1, 1)).all():
        raise ValueError(
            _LABEL_RANGE.format(
                name="hinge",
                allowed="-1 or +1",
                bad=np.unique(values[~np.isin(values, (-1, 1))])[:5].tolist(),
                lo=values.min(),
                hi=values.max(),
                fix="0/1 labels become -1/+1 with 2 * labels - 1",
            )
        )
    return _reduce(jnp.maximum(0.0, 1.0 - labels * scores), reduction, "hinge")


def multiclass_hinge(
    scores: Array, labels: Array, *, margin: float = 1.0, reduction: str = "none"
) -> Array:
    """Crammer-Singer multiclass hinge `max(0, margin + max_{j != y} s_j - s_y)`.

    Crammer & Singer (2001), as sklearn `hinge_loss` and `optax.multiclass_hinge_loss`;
    not Weston-Watkins (cs231n's SVM), which sums the margins over j != y instead of
    taking their maximum.

    Args:
      scores: [..., num_classes] float scores s.
      labels: [...] integer class indices y.
      margin: the required gap between the true class and the best other class.
      reduction: 'none' | 'mean' | 'sum' over the examples `[...]`.

    Returns:
      [...] float losses, or a scalar.
    """
    _check_reduction(reduction, "multiclass_hinge")
    if not _is_index_labels(scores, labels, "multiclass_hinge", "scores"):
        raise ValueError(
            "multiclass_hinge: labels must be integer class indices of shape "
            f"{jnp.shape(scores)[:-1]}; got one-hot of shape {jnp.shape(labels)}. "
            "Fix: jnp.argmax(labels, axis=-1)"
        )
    _check_class_range(labels, jnp.shape(scores)[-1], "multiclass_hinge")
    one_hot = jax.nn.one_hot(labels, scores.shape[-1], dtype=scores.dtype)
    # The j == y term of the max is s_y itself, which turns max_{j != y} into max(0, ...).
    values = jnp.max(scores + margin * (1.0 - one_hot), axis=-1) - jnp.sum(
        scores * one_hot, axis=-1
    )
    return _reduce(values, reduction, "multiclass_hinge")


def binary_cross_entropy(
    probabilities: Array, labels: Array, *, eps: float = 1e-7, reduction: str = "none"
) -> Array:
    """Binary cross-entropy of probabilities, `-(t log p + (1 - t) log(1 - p))`, elementwise.

    p is first clipped to [eps, 1 - eps] (Keras `binary_crossentropy`); outside that range
    the gradient is 0, as in Keras. eps=1e-7 is Keras' epsilon; the sklearn-era 1e-15 is
    below float32 resolution next to 1 and would let log(1 - p) reach -inf.

    Args:
      probabilities: [...] float probabilities p of the positive class.
      labels: [...] float targets t in [0, 1], same shape.
      eps: clipping margin.
      reduction: 'none' | 'mean' | 'sum' over all elements.

    Returns:
      [...] float losses, or a scalar.
    """
    _check_reduction(reduction, "binary_cross_entropy")
    _check_same_shape(probabilities, labels, "binary_cross_entropy", "probabilities")
    p = jnp.clip(probabilities, eps, 1.0 - eps)
    values = -(labels * jnp.log(p) + (1.0 - labels) * jnp.log1p(-p))
    return _reduce(values, reduction, "binary_cross_entropy")


def sigmoid_binary_cross_entropy(logits: Array, labels: Array, *, reduction: str = "none") -> Array:
    """Sigmoid cross-entropy of logits, numerically stable, elementwise.

    `softplus(x) - x * t = max(x, 0) - x t + log(1 + exp(-|x|))`, the formula of Caffe's
    SigmoidCrossEntropyLoss; its gradient is `sigmoid(x) - t`. Caffe's layer output is
    the sum over all elements divided by the batch size (BATCH_SIZE normalisation):
    `sigmoid_binary_cross_entropy(x, t, reduction="sum") / x.shape[0]`.
    Unlike Caffe, which only checks the element counts, the shapes must be equal.

    Args:
      logits: [...] float logits x.
      labels: [...] float targets t in [0, 1], same shape.
      reduction: 'none' | 'mean' | 'sum' over all elements.

    Returns:
      [...] float losses, or a scalar.
    """
    _check_reduction(reduction, "sigmoid_binary_cross_entropy")
    _check_same_shape(logits, labels, "sigmoid_binary_cross_entropy", "logits")
    values = jax.nn.softplus(logits) - logits * labels
    return _reduce(values, reduction, "sigmoid_binary_cross_entropy")


def cross_entropy(
    probabilities: Array, targets: Array, *, eps: float = 1e-7, reduction: str = "none"
) -> Array:
    """Cross-entropy of probabilities, `-sum(t * log(p + eps), axis=-1)`.

    The numpy tutorial's `cross_entropy_error` (SEEDS.md section 4): eps keeps log(0) away.

    Args:
      probabilities: [..., num_classes] float probabilities p.
      targets: [..., num_classes] float one-hot or probability targets t.
      eps: added to p inside the log.
      reduction: 'none' | 'mean' | 'sum' over the examples `[...]`.

    Returns:
      [...] float losses, or a scalar.
    """
    _check_reduction(reduction, "cross_entropy")
    _check_same_shape(probabilities, targets, "cross_entropy", "probabilities")
    values = -jnp.sum(targets * jnp.log(probabilities + eps), axis=-1)
    return _reduce(values, reduction, "cross_entropy")


def categorical_cross_entropy(
    probabilities: Array, targets: Array, *, eps: float = 1e-7, reduction: str = "none"
) -> Array:
    """Keras `categorical_crossentropy` of probabilities.

    p is renormalised to sum to 1 over the last axis, clipped to [eps, 1 - eps], then
    `-sum(t * log p, axis=-1)`.

    Args:
      probabilities: [..., num_classes] float non-negative scores p (e.g. softmax output).
      targets: [..., num_classes] float one-hot or probability targets t.
      eps: clipping margin (Keras' epsilon).
      reduction: 'none' | 'mean' | 'sum' over the examples `[...]`.

    Returns:
      [...] float losses, or a scalar.
    """
    _check_reduction(reduction, "categorical_cross_entropy")
    _check_same_shape(probabilities, targets, "categorical_cross_entropy", "probabilities")
    p = probabilities / jnp.sum(probabilities, axis=-1, keepdims=True)
    p = jnp.clip(p, eps, 1.0 - eps)
    values = -jnp.sum(targets * jnp.log(p), axis=-1)
    return _reduce(values, reduction, "categorical_cross_entropy")


def nll(log_probabilities: Array, labels: Array, *, reduction: str = "none") -> Array:
    """Negative log-likelihood `-log_probabilities[..., label]` (PyTorch NLLLoss, unweighted).

    Args:
      log_probabilities: [..., num_classes] float log-probabilities (e.g. log_softmax).
      labels: [...] integer class indices.
      reduction: 'none' | 'mean' | 'sum' over the examples `[...]`.

    Returns:
      [...] float losses, or a scalar.
    """
    _check_reduction(reduction, "nll")
    if not _is_index_labels(log_probabilities, labels, "nll", "log_probabilities"):
        raise ValueError(
            "nll: labels must be integer class indices of shape "
            f"{jnp.shape(log_probabilities)[:-1]}; got {jnp.shape(labels)} floats. "
            "Fix: jnp.argmax(labels, axis=-1), or cross_entropy for probability targets"
        )
    _check_class_range(labels, jnp.shape(log_probabilities)[-1], "nll")
    values = -jnp.take_along_axis(log_probabilities, labels[..., None], axis=-1)[..., 0]
    return _reduce(values, reduction, "nll")


def softmax_cross_entropy(
    logits: Array,
    labels: Array,
    *,
    class_weights: Array | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> Array:
    """Softmax cross-entropy of logits with exactly `torch.nn.CrossEntropyLoss` semantics.

    With `logp = log_softmax(logits)`, C classes, weights w (1 if None), smoothing e:

    Integer labels y (`[...]`): per example
      `l_i = (1 - e) * w[y_i] * -logp_i[y_i] + (e / C) * sum_c w_c * -logp_i[c]`,
      and 0 where `y_i == ignore_index`. 'mean' is `sum_i l_i / sum_{i not ignored} w[y_i]`
      (the count of non-ignored examples when unweighted): nan when every target is
      ignored (0/0), as in PyTorch.
    Probability labels t (`[..., C]` floats, e.g. one-hot): with `t' = (1 - e) t + e / C`,
      `l_i = -sum_c w_c t'_ic logp_i[c]`; 'mean' divides by the number of examples, not by
      the weights (PyTorch's rule for probability targets); `ignore_index` is not allowed.

    Caffe's SoftmaxWithLoss and Keras' sparse categorical cross-entropy from logits are
    the unweighted, unsmoothed case. Classes are on the last axis (PyTorch: axis 1).

    Args:
      logits: [..., num_classes] float unnormalised scores.
      labels: [...] integer class indices, or [..., num_classes] float probabilities.
      class_weights: optional [num_classes] float rescaling weight per class.
      ignore_index: optional class index whose targets contribute nothing (integer labels).
      label_smoothing: e in [0, 1]; mixes the target with the uniform distribution.
      reduction: 'none' ([...] per example) | 'mean' | 'sum'.

    Returns:
      [...] float losses, or a scalar.

    Example:
      >>> logits = jnp.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
      >>> softmax_cross_entropy(logits, jnp.array([0, 2]))  # doctest: +SKIP
      Array(0.17545..., dtype=float32)
    """
    name = "softmax_cross_entropy"
    _check_reduction(reduction, name)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{name}: label_smoothing={label_smoothing} must lie in [0, 1]")
    index = _is_index_labels(logits, labels, name)
    num_classes = jnp.shape(logits)[-1]
    if class_weights is not None and jnp.shape(class_weights) != (num_classes,):
        raise ValueError(
            f"{name}: class_weights shape {jnp.shape(class_weights)} must be "
            f"({num_classes},), one weight per class of logits {jnp.shape(logits)}"
        )
    log_p = jax.nn.log_softmax(logits, axis=-1)
    weights = (
        jnp.ones((num_classes,), log_p.dtype)
        if class_weights is None
        else jnp.asarray(class_weights, log_p.dtype)
    )

    if not index:
        if ignore_index is not None:
            raise ValueError(
                f"{name}: ignore_index={ignore_index} needs integer class-index labels; "
                f"got probability labels of shape {jnp.shape(labels)}. Fix: give ignored "
                "examples all-zero probability rows, or pass integer labels"
            )
        targets = labels * (1.0 - label_smoothing) + label_smoothing / num_classes
        values = -jnp.sum(weights * targets * log_p, axis=-1)
        return _reduce(values, reduction, name)

    _check_class_range(labels, num_classes, name, ignore_index)
    if ignore_index is None:
        valid = jnp.ones(jnp.shape(labels), bool)
        safe_labels = labels
    else:
        valid = labels != ignore_index
        safe_labels = jnp.where(valid, labels, 0)
    label_log_p = jnp.take_along_axis(log_p, safe_labels[..., None], axis=-1)[..., 0]
    label_weight = jnp.where(valid, weights[safe_labels], 0.0)
    values = -(1.0 - label_smoothing) * label_weight * label_log_p
    if label_smoothing:
        smooth = -jnp.sum(weights * log_p, axis=-1)
        values = values + (label_smoothing / num_classes) * jnp.where(valid, smooth, 0.0)
    if reduction == "mean":
        return jnp.sum(values) / jnp.sum(label_weight)
    return _reduce(values, reduction, name)
