"""Keras ImageDataGenerator augmentation on the device: vmapped over the batch, keyed.

What Keras' ``ImageDataGenerator.flow`` does to each image, in the same order:
``random_transform`` (rotation about the centre, shift, then flips; bilinear interpolation as
``scipy.ndimage.affine_transform(order=1)``, points outside filled from the nearest edge
pixel) and then ``standardize`` (``x - mean``, ``x / (std + 1e-6)`` with statistics that
``fit_featurewise_stats`` fits on the training split only).

Transform parameters follow keras-preprocessing's matrix in (row, col) coordinates: output
pixel ``o`` reads the input at ``c + R(theta) (o - c + (tx, ty))`` with ``c`` the image centre,
``tx`` a row (height) shift and ``ty`` a column (width) shift in pixels. Keras >= 2.9 swaps the
axes of that matrix, which mirrors the rotation and exchanges the shifts: for the symmetric
ranges Keras samples from, the distribution of augmented images is the same.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxnets.core.types import PRNGKey

KERAS_STD_EPSILON = 1e-6  # ImageDataGenerator.standardize: x /= (self.std + 1e-6)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """The ImageDataGenerator options jaxnets supports (Keras names and defaults).

    Attributes:
      featurewise_center: subtract the per-channel training-set mean.
      featurewise_std_normalization: divide by the per-channel training-set std (+ 1e-6).
      rotation_range: rotate by an angle uniform in [-rotation_range, rotation_range] degrees.
      width_shift_range: shift columns by uniform [-r, r] * width pixels (r in [0, 1)).
      height_shift_range: shift rows by uniform [-r, r] * height pixels (r in [0, 1)).
      horizontal_flip: flip left-right with probability 1/2.
      vertical_flip: flip up-down with probability 1/2.
      fill_mode: how points outside the image are filled; only Keras' default ``"nearest"``.
    """

    featurewise_center: bool = False
    featurewise_std_normalization: bool = False
    rotation_range: float = 0.0
    width_shift_range: float = 0.0
    height_shift_range: float = 0.0
    horizontal_flip: bool = False
    vertical_flip: bool = False
    fill_mode: str = "nearest"

    def __post_init__(self):
        if self.rotation_range < 0:
            raise ValueError(f"rotation_range {self.rotation_range} < 0; give degrees, e.g. 20")
        for name in ("width_shift_range", "height_shift_range"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(
                    f"{name} {value} is outside [0, 1); it is a fraction of the image size "
                    "(0.2 shifts by up to 20%)"
                )
        if self.fill_mode != "nearest":
            raise ValueError(
                f"fill_mode {self.fill_mode!r} is not supported; only 'nearest' (Keras' default)"
            )

    @property
    def is_random(self) -> bool:
        """Whether ``random_transform`` changes anything."""
        return bool(
            self.rotation_range
            or self.width_shift_range
            or self.height_shift_range
            or self.horizontal_flip
            or self.vertical_flip
        )


class TransformParams(NamedTuple):
    """Per-image transform parameters (Keras ``get_random_transform`` names).

    Attributes:
      theta: float32 [B], rotation in degrees.
      tx: float32 [B], row (height) shift in pixels.
      ty: float32 [B], column (width) shift in pixels.
      flip_horizontal: bool [B].
      flip_vertical: bool [B].
    """

    theta: jax.Array
    tx: jax.Array
    ty: jax.Array
    flip_horizontal: jax.Array
    flip_vertical: jax.Array


def fit_featurewise_stats(images) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std over the whole set (Keras ``ImageDataGenerator.fit``).

    Fit on the training split only, on images scaled as the model will see them. Computed on
    the host in float64, once.

    Args:
      images: [N, H, W, C], any real dtype.

    Returns:
      (mean float32 [C], std float32 [C]).
    """
    x = np.asarray(images, dtype=np.float64)
    if x.ndim != 4:
        raise ValueError(f"images have shape {x.shape}; expected [N, H, W, C]")
    return x.mean(axis=(0, 1, 2)).astype(np.float32), x.std(axis=(0, 1, 2)).astype(np.float32)


def standardize(images, stats, config: AugmentConfig) -> jax.Array:
    """The deterministic part: featurewise centring and std normalisation, train and eval.

    Args:
      images: float [..., H, W, C].
      stats: ``(mean [C], std [C])`` from ``fit_featurewise_stats``.
      config: which of the two steps to apply.

    Returns:
      float32, same shape: ``(x - mean) / (std + 1e-6)`` (each part only if enabled).
    """
    x = jnp.asarray(images, jnp.float32)
    mean, std = stats
    if config.featurewise_center:
        x = x - jnp.asarray(mean, jnp.float32)
    if config.featurewise_std_normalization:
        x = x / (jnp.asarray(std, jnp.float32) + KERAS_STD_EPSILON)
    return x


def sample_transform_params(
    key: PRNGKey, config: AugmentConfig, num: int, height: int, width: int
) -> TransformParams:
    """Draws ``num`` images' parameters from Keras' distributions (uniform ranges, fair flips)."""
    k_theta, k_tx, k_ty, k_fh, k_fv = jax.random.split(key, 5)
    r, hs, ws = config.rotation_range, config.height_shift_range, config.width_shift_range
    uniform = lambda k, lim: jax.random.uniform(k, (num,), jnp.float32, -lim, lim)
    return TransformParams(
        theta=uniform(k_theta, r),
        tx=uniform(k_tx, hs) * height,
        ty=uniform(k_ty, ws) * width,
        flip_horizontal=jax.random.bernoulli(k_fh, 0.5, (num,)) & config.horizontal_flip,
        flip_vertical=jax.random.bernoulli(k_fv, 0.5, (num,)) & config.vertical_flip,
    )


def _transform_one(image: jax.Array, p: TransformParams) -> jax.Array:
    h, w = image.shape[0], image.shape[1]
    rows, cols = jnp.meshgrid(
        jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij"
    )
    # Keras flips after the affine warp: read the warped image at the mirrored pixel.
    rows = jnp.where(p.flip_vertical, h - 1 - rows, rows)
    cols = jnp.where(p.flip_horizontal, w - 1 - cols, cols)
    cr, cc = (h - 1) / 2.0, (w - 1) / 2.0
    theta = jnp.deg2rad(p.theta)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    dr, dc = rows - cr + p.tx, cols - cc + p.ty
    src_r = cr + cos * dr - sin * dc
    src_c = cc + sin * dr + cos * dc
    warp = lambda channel: jax.scipy.ndimage.map_coordinates(
        channel, [src_r, src_c], order=1, mode="nearest"
    )
    return jax.vmap(warp, in_axes=2, out_axes=2)(image)


def apply_transform(images, params: TransformParams) -> jax.Array:
    """Applies given per-image parameters (Keras ``apply_transform``), vmapped over the batch.

    Args:
      images: [B, H, W, C] (cast to float32).
      params: a ``TransformParams`` of [B] arrays.

    Returns:
      float32 [B, H, W, C].
    """
    return jax.vmap(_transform_one)(jnp.asarray(images, jnp.float32), params)


def random_transform(images, *, key: PRNGKey, config: AugmentConfig) -> jax.Array:
    """The random part of ImageDataGenerator for a batch, a pure function of ``key``.

    Use the step's key (``jax.random.fold_in(key, step)``) so a resumed run augments the same.

    Args:
      images: [B, H, W, C] float (or uint8, cast to float32 unscaled).
      key: PRNG key.
      config: the ranges.

    Returns:
      float32 [B, H, W, C]; ``images`` as float32 when ``config`` has nothing random.

    Example:
      >>> cfg = AugmentConfig(rotation_range=20, width_shift_range=0.2, horizontal_flip=True)
      >>> out = random_transform(jnp.zeros((8, 28, 28, 1)), key=jax.random.key(0), config=cfg)
      >>> out.shape
      (8, 28, 28, 1)
    """
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4:
        raise ValueError(f"images have shape {images.shape}; expected [B, H, W, C]")
    if not config.is_random:
        return images
    b, h, w, _ = images.shape
    return apply_transform(images, sample_transform_params(key, config, b, h, w))
