"""The order of the examples: which go in each step of an epoch (a pure function of the data
key and the epoch), and the padded batches of an evaluation."""

from __future__ import annotations

import math
import warnings

import jax
import numpy as np

from jaxnets.core.types import PRNGKey


def epoch_indices(data_key: PRNGKey, epoch: int, num_examples: int, batch_size: int) -> np.ndarray:
    """Example indices of every step of an epoch: `[num_examples // batch_size, batch_size]`.

    The permutation is a pure function of `(data_key, epoch)`; the last partial batch is
    dropped (a different remainder is dropped each epoch).
    """
    steps = num_examples // batch_size
    if num_examples == 0:
        raise ValueError(
            "the training set has 0 examples: nothing to train on; give at least batch_size "
            f"({batch_size}) examples (check the data's source and any limit or split applied)"
        )
    if steps == 0:
        raise ValueError(
            f"batch size {batch_size} is larger than the {num_examples} training examples; "
            f"use a batch size of {num_examples} or less"
        )
    if num_examples % batch_size:
        _warn_dropped(num_examples, batch_size)
    perm = jax.random.permutation(jax.random.fold_in(data_key, epoch), num_examples)
    return np.asarray(perm[: steps * batch_size], np.int32).reshape(steps, batch_size)


def _warn_dropped(num_examples: int, batch_size: int) -> None:
    """Says once per process (per data size and batch size) what the partial batch drops."""
    if (num_examples, batch_size) in _WARNED_DROPPED:
        return
    _WARNED_DROPPED.add((num_examples, batch_size))
    left = num_examples % batch_size
    small = [d for d in range(1, math.isqrt(num_examples) + 1) if num_examples % d == 0]
    divisors = small + [num_examples // d for d in small]
    near = sorted(
        {max(d for d in divisors if d <= batch_size), min(d for d in divisors if d >= batch_size)}
    )
    warnings.warn(
        f"each epoch trains on {num_examples - left} of the {num_examples} training examples: "
        f"the last {left} ({100 * left / num_examples:.0f}%) of each epoch's shuffled order do "
        f"not fill a batch of {batch_size} and are left out (others each epoch). For every "
        f"example every epoch, use a batch_size that divides {num_examples} (e.g. "
        f"{' or '.join(map(str, near))})",
        UserWarning,
        stacklevel=3,
    )


_WARNED_DROPPED: set[tuple[int, int]] = set()


def eval_indices(num_examples: int, batch_size: int) -> np.ndarray:
    """`[steps, batch_size]` indices covering every example once, padded with -1."""
    steps = math.ceil(num_examples / batch_size)
    idx = np.full(steps * batch_size, -1, np.int32)
    idx[:num_examples] = np.arange(num_examples, dtype=np.int32)
    return idx.reshape(steps, batch_size)
