"""jaxnets.data.augment against Keras' ImageDataGenerator maths (scipy, numpy references)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from jaxnets.data import augment
from jaxnets.data.augment import AugmentConfig, TransformParams

SEED_CONFIG = AugmentConfig(
    featurewise_center=True,
    featurewise_std_normalization=True,
    rotation_range=20,
    width_shift_range=0.2,
    height_shift_range=0.2,
    horizontal_flip=True,
)


def keras_apply_transform(x, theta, tx, ty, flip_horizontal, flip_vertical):
    """keras-preprocessing's apply_transform for one [H, W, C] image, written out with scipy."""
    h, w = x.shape[:2]
    t = np.deg2rad(theta)
    rotation = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    shift = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]])
    matrix = rotation @ shift
    o_x, o_y = h / 2 - 0.5, w / 2 - 0.5
    offset = np.array([[1, 0, o_x], [0, 1, o_y], [0, 0, 1]])
    reset = np.array([[1, 0, -o_x], [0, 1, -o_y], [0, 0, 1]])
    matrix = offset @ matrix @ reset
    out = np.stack(
        [
            scipy.ndimage.affine_transform(
                x[..., c].astype(np.float64), matrix[:2, :2], matrix[:2, 2], order=1, mode="nearest"
            )
            for c in range(x.shape[-1])
        ],
        axis=-1,
    )
    if flip_horizontal:
        out = out[:, ::-1]
    if flip_vertical:
        out = out[::-1]
    return out


def test_fixed_transforms_equal_scipy_affine_transform():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (6, 28, 20, 2)).astype(np.float32)  # non-square, 2 channels
    params = TransformParams(
        theta=jnp.array([0.0, 17.0, -20.0, 90.0, 5.5, -3.0]),
        tx=jnp.array([0.0, 3.3, -5.6, 0.0, 0.5, 2.0]),
        ty=jnp.array([0.0, -2.2, 4.0, 1.5, -3.5, 0.0]),
        flip_horizontal=jnp.array([False, True, False, True, False, True]),
        flip_vertical=jnp.array([False, False, True, True, False, True]),
    )
    out = np.asarray(augment.apply_transform(images, params))
    assert out.dtype == np.float32 and out.shape == images.shape
    np.testing.assert_array_equal(out[0], images[0])
    for i in range(len(images)):
        p = [np.asarray(f)[i].item() for f in params]
        ref = keras_apply_transform(images[i], *p)
        np.testing.assert_allclose(out[i], ref, atol=1e-4 * 255, rtol=1e-4)


def test_sampled_parameters_lie_in_and_cover_their_ranges():
    n, h, w = 20000, 28, 24
    p = augment.sample_transform_params(jax.random.key(0), SEED_CONFIG, n, h, w)
    theta, tx, ty = (np.asarray(a) for a in (p.theta, p.tx, p.ty))
    for values, limit in ((theta, 20.0), (tx, 0.2 * h), (ty, 0.2 * w)):
        assert np.abs(values).max() <= limit
        assert values.min() < -0.99 * limit and values.max() > 0.99 * limit
        # Uniform: each tenth of the range holds about a tenth of the draws.
        counts, _ = np.histogram(values, bins=10, range=(-limit, limit))
        assert np.all(np.abs(counts / n - 0.1) < 0.015)
    assert abs(np.asarray(p.flip_horizontal).mean() - 0.5) < 0.02
    assert not np.asarray(p.flip_vertical).any()  # vertical_flip is off


def test_same_key_same_batch_different_key_different():
    images = jnp.asarray(np.random.default_rng(1).uniform(0, 1, (16, 28, 28, 1)), jnp.float32)
    key = jax.random.key(7)
    a = augment.random_transform(images, key=key, config=SEED_CONFIG)
    b = augment.random_transform(images, key=jax.random.key(7), config=SEED_CONFIG)
    c = augment.random_transform(images, key=jax.random.fold_in(key, 1), config=SEED_CONFIG)
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(c)).mean() > 1e-2
    jitted = jax.jit(augment.random_transform, static_argnames="config")
    np.testing.assert_allclose(jitted(images, key=key, config=SEED_CONFIG), a, atol=1e-5)


def test_random_transform_is_the_apply_of_the_sampled_parameters():
    images = jnp.asarray(np.random.default_rng(2).uniform(0, 1, (5, 28, 28, 1)), jnp.float32)
    key = jax.random.key(3)
    out = np.asarray(augment.random_transform(images, key=key, config=SEED_CONFIG))
    p = augment.sample_transform_params(key, SEED_CONFIG, 5, 28, 28)
    for i in range(5):
        ref = keras_apply_transform(np.asarray(images[i]), *[np.asarray(f)[i].item() for f in p])
        np.testing.assert_allclose(out[i], ref, atol=1e-4)


def test_no_random_option_is_the_identity():
    images = np.random.default_rng(3).integers(0, 256, (4, 28, 28, 1)).astype(np.uint8)
    out = augment.random_transform(images, key=jax.random.key(0), config=AugmentConfig())
    np.testing.assert_array_equal(out, images.astype(np.float32))


def test_featurewise_stats_and_standardize_against_numpy():
    rng = np.random.default_rng(4)
    train = rng.uniform(0, 1, (50, 8, 8, 3)) * np.array([1.0, 2.0, 0.5])
    mean, std = augment.fit_featurewise_stats(train)
    assert mean.shape == std.shape == (3,) and mean.dtype == np.float32
    for c in range(3):
        values = train[..., c].ravel()
        np.testing.assert_allclose(mean[c], values.sum() / values.size, rtol=1e-6)
        np.testing.assert_allclose(
            std[c], np.sqrt(((values - values.mean()) ** 2).mean()), rtol=1e-6
        )
    test = rng.uniform(0, 1, (4, 8, 8, 3))
    out = np.asarray(augment.standardize(test, (mean, std), SEED_CONFIG))
    np.testing.assert_allclose(out, (test - mean) / (std + 1e-6), rtol=1e-5, atol=1e-6)
    only_center = dataclasses.replace(SEED_CONFIG, featurewise_std_normalization=False)
    np.testing.assert_allclose(
        augment.standardize(test, (mean, std), only_center), test - mean, atol=1e-6
    )
    neither = AugmentConfig()
    np.testing.assert_allclose(augment.standardize(test, (mean, std), neither), test, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"width_shift_range": 1.5}, r"width_shift_range 1.5 is outside \[0, 1\)"),
        ({"height_shift_range": -0.1}, r"height_shift_range -0.1 is outside"),
        ({"rotation_range": -5}, "rotation_range -5 < 0"),
        ({"fill_mode": "wrap"}, "fill_mode 'wrap' is not supported"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AugmentConfig(**kwargs)
