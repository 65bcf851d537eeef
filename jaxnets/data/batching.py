"""Batches of examples: the size of a batch pytree, epoch order as a pure function of (key,
epoch), Keras validation split, uint8 scaling."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxnets.core.types import Batch, PRNGKey


def epoch_permutation(key: PRNGKey, epoch: int | jax.Array, num_examples: int) -> jax.Array:
    """The example order of ``epoch``: a permutation from ``jax.random.fold_in(key, epoch)``.

    A pure function of ``(key, epoch)``, so the batch of any step can be recomputed after a
    restart: step ``s`` of an epoch uses ``perm[s * batch : (s + 1) * batch]``. Jittable (with
    ``num_examples`` static).

    Args:
      key: the data-order key of the run.
      epoch: the epoch number (int or int32 scalar array).
      num_examples: the size of the training split.

    Returns:
      int32 [num_examples], a permutation of ``range(num_examples)``.
    """
    return jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)


def split_validation(images, labels, fraction: float):
    """Holds out the LAST ``fraction`` of the examples, before any shuffling (Keras semantics).

    Keras ``fit(validation_split=f)`` keeps ``x[:int(n * (1 - f))]`` for training and the rest
    for validation.

    Args:
      images: [N, ...] numpy or jax array.
      labels: [N] numpy or jax array.
      fraction: in ``[0, 1)``.

    Returns:
      ``((train_images, train_labels), (val_images, val_labels))``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction {fraction} is outside [0, 1); use e.g. 0.2")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    split_at = int(len(images) * (1.0 - fraction))
    if split_at == 0:
        need = math.ceil(1 / (1.0 - fraction)) if fraction else 1
        raise ValueError(
            f"holding out {fraction:g} of {len(images)} examples for validation leaves none for "
            f"training; give at least {need} examples, or hold out a smaller fraction"
        )
    return (images[:split_at], labels[:split_at]), (images[split_at:], labels[split_at:])


def normalize(images: jax.Array | np.ndarray) -> jax.Array:
    """uint8 images in 0..255 to float32 in [0, 1] (``x / 255``), on the device.

    Args:
      images: uint8 [..., H, W, C].

    Returns:
      float32, same shape.

    Raises:
      TypeError: the images are not uint8 (float images are most often already scaled:
        dividing them by 255 again would silently train on near-zero inputs).
    """
    dtype = np.dtype(images.dtype if hasattr(images, "dtype") else np.asarray(images).dtype)
    if dtype != np.uint8:
        raise TypeError(NOT_UINT8.format(dtype=dtype))
    return jnp.asarray(images).astype(jnp.float32) / 255.0


NOT_UINT8 = (
    "normalize expects uint8 images in 0..255, got {dtype}: images already scaled (e.g. to "
    "[0, 1]) would be divided by 255 again; pass the raw uint8 pixels, or leave normalize out "
    "for images you have scaled yourself"
)


def num_examples(data: Batch, what: str = "data") -> int:
    """The common leading size of a batch pytree; a clear error when the leaves disagree."""
    leaves = jax.tree_util.tree_leaves_with_path(data)
    if not leaves:
        raise ValueError(
            f"{what} is empty: give a pytree of arrays, e.g. {{'image': x, 'label': y}}"
        )
    sizes: dict[str, int | None] = {
        jax.tree_util.keystr(p): (int(np.shape(x)[0]) if np.ndim(x) else None) for p, x in leaves
    }
    if None in sizes.values() or len(set(sizes.values())) != 1:
        shown = ", ".join(f"{p or 'data'}: {s}" for p, s in sizes.items())
        raise ValueError(
            f"{what}: every array needs the same leading example axis, got leading sizes "
            f"{shown}; pass the same examples' arrays, e.g. {{'image': x[:n], 'label': y[:n]}}"
        )
    (size,) = set(sizes.values())
    assert size is not None  # refused above
    return size
