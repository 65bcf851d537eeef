"""The MNIST CNN of the Keras 1 tutorial (SEEDS.md section 2), as a Flax Linen module."""

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxnets.types import Array

ConvImpl = Literal["xla", "im2col"]
CONV_IMPLS = ("xla", "im2col")
IMAGE_SHAPE = (28, 28, 1)


def _conv_im2col(x: Array, kernel: Array) -> Array:
    """Valid stride-1 convolution as shifted slices + one matmul (fast on XLA:CPU, few channels).

    Args:
      x: [batch, height, width, in_channels].
      kernel: [kh, kw, in_channels, out_channels] (HWIO, the layout of lax.conv / nn.Conv).

    Returns:
      [batch, height - kh + 1, width - kw + 1, out_channels].
    """
    kh, kw, cin, cout = kernel.shape
    ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    # Patch features in (i, j, c) order, the row-major order of the HWIO kernel's first 3 axes.
    patches = jnp.concatenate(
        [x[:, i : i + ho, j : j + wo, :] for i in range(kh) for j in range(kw)], axis=-1
    )
    return patches @ kernel.reshape(kh * kw * cin, cout)


def _conv_xla(x: Array, kernel: Array) -> Array:
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _max_pool_2x2(x: Array, impl: ConvImpl) -> Array:
    """2x2 max pool, stride 2, valid (an odd last row/column is dropped, as in Keras).

    'xla' uses reduce_window (its gradient sends a tie to the first maximum); 'im2col'
    crops to even size and takes the max of a reshape (its gradient splits a tie evenly).
    Both are valid subgradients; they differ only where a 2x2 window holds equal maxima.
    """
    if impl == "xla":
        return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2, :]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class ValidConv(nn.Module):
    """Valid, stride-1 2D convolution with a square kernel, channels-last.

    Parameters are `kernel` [k, k, in, features] (HWIO, glorot_uniform as Keras 1) and
    `bias` [features] (zeros): the tree of `nn.Conv(features, (k, k), padding="VALID")`,
    whichever `impl` computes it, so checkpoints move freely between implementations.

    Attributes:
      features: number of output channels.
      kernel_size: side k of the square kernel.
      impl: 'xla' (lax.conv_general_dilated) or 'im2col' (shifted slices + one matmul).
    """

    features: int
    kernel_size: int
    impl: ConvImpl = "xla"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.impl not in CONV_IMPLS:
            raise ValueError(f"ValidConv: impl={self.impl!r}; use one of {CONV_IMPLS}")
        k = self.kernel_size
        kernel = self.param(
            "kernel", nn.initializers.glorot_uniform(), (k, k, x.shape[-1], self.features)
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias)
        conv = _conv_im2col if self.impl == "im2col" else _conv_xla
        return conv(x, kernel) + bias


class MnistCNN(nn.Module):
    """The seed MNIST CNN: 3 tanh convolutions, 2 max pools, 2 dense layers; 35,754 parameters.

    [B,28,28,1] -> conv1 4@5x5 tanh [B,24,24,4] -> conv2 8@3x3 tanh [B,22,22,8] -> pool
    [B,11,11,8] -> conv3 16@3x3 tanh [B,9,9,16] -> pool [B,4,4,16] -> flatten [B,256] ->
    dense1 128 tanh -> dense2 num_classes logits. Softmax lives in the loss
    (`jaxnets.losses.softmax_cross_entropy`).

    Initialisers as Keras 1: convolution kernels glorot_uniform, dense kernels
    init='normal' (normal, stddev 0.05), biases zero. Channels-last, so flatten order is
    (h, w, c), not Keras 1's channels-first (c, h, w).

    The model does not scale its input: pass float images already in [0, 1] (the data
    pipeline divides uint8 pixels by 255); integer images are rejected.

    Layer outputs are sown into the 'intermediates' collection (`conv1_tanh`, `pool1`, `pool2`,
    `flatten`, `dense1_tanh`) when it is mutable, for inspection; otherwise sowing costs nothing.

    Attributes:
      num_classes: number of output logits.
      conv_impl: 'im2col' (default: shifted slices + one matmul per convolution, max pool
        by reshape) or 'xla' (lax.conv_general_dilated + reduce_window max pool). Same
        parameters, same function (outputs and gradients agree to 1e-5). On the 2-core Zen 3
        CPU, jitted forward+backward of a batch of 100 took 5.2 ms with 'im2col' against
        9.3 ms with 'xla' (1.6-1.8x over repeated runs, scripts/bench_cnn_conv.py); about
        70% of the gain is the pool gradient (reduce_window's select_and_scatter is slow on
        XLA:CPU), the rest the convolutions. Not measured on GPU/TPU, where 'xla'
        (cuDNN/TPU convolutions) may be the better choice.

    Example:
      >>> model = MnistCNN()
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
      >>> model.apply({"params": params}, jnp.zeros((100, 28, 28, 1))).shape
      (100, 10)
    """

    num_classes: int = 10
    conv_impl: ConvImpl = "im2col"

    @nn.compact
    def __call__(self, images: Array) -> Array:
        """Logits [batch, num_classes] float32 of float images [batch, 28, 28, 1] in [0, 1]."""
        if self.conv_impl not in CONV_IMPLS:
            raise ValueError(f"MnistCNN: conv_impl={self.conv_impl!r}; use one of {CONV_IMPLS}")
        if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
            fix = "images[..., None]" if images.shape[1:] == IMAGE_SHAPE[:2] else "resize/reshape"
            raise ValueError(
                f"MnistCNN: images shape {images.shape} must be [batch, 28, 28, 1] "
                f"(channels-last). Fix: {fix}"
            )
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(
                f"MnistCNN: images dtype {images.dtype}; the model takes float images scaled to "
                "[0, 1]. Fix: images.astype(jnp.float32) / 255"
            )
        impl = self.conv_impl
        x = jnp.tanh(ValidConv(4, 5, impl, name="conv1")(images))
        self.sow("intermediates", "conv1_tanh", x)
        x = jnp.tanh(ValidConv(8, 3, impl, name="conv2")(x))
        x = _max_pool_2x2(x, impl)
        self.sow("intermediates", "pool1", x)
        x = jnp.tanh(ValidConv(16, 3, impl, name="conv3")(x))
        x = _max_pool_2x2(x, impl)
        self.sow("intermediates", "pool2", x)
        x = x.reshape(x.shape[0], -1)
        self.sow("intermediates", "flatten", x)
        dense_init = nn.initializers.normal(stddev=0.05)
        x = jnp.tanh(nn.Dense(128, kernel_init=dense_init, name="dense1")(x))
        self.sow("intermediates", "dense1_tanh", x)
        return nn.Dense(self.num_classes, kernel_init=dense_init, name="dense2")(x)
