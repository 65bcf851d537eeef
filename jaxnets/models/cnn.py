"""The MNIST CNN of the Keras 1 tutorial (SEEDS.md section 2), as a Flax Linen module."""

import functools
import warnings
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxnets.models import native_conv
from jaxnets.types import Array

ConvImpl = Literal["auto", "native", "im2col", "xla"]
CONV_IMPLS = ("auto", "native", "im2col", "xla")
# NHWC: [batch, height, width, channels]; CHWN: [channels, height, width, batch].
Layout = Literal["NHWC", "CHWN"]
LAYOUTS = ("NHWC", "CHWN")
IMAGE_SHAPE = (28, 28, 1)


def _conv_im2col(x: Array, kernel: Array, layout: Layout = "NHWC") -> Array:
    """Valid stride-1 convolution as shifted slices + one matmul (fast on XLA:CPU, few channels).

    In 'NHWC' the patches are [batch * ho * wo, kh * kw * in] (features minor); in 'CHWN' they
    are [kh * kw * in, ho * wo * batch] (batch minor), built and consumed as long contiguous
    rows, which XLA:CPU copies and multiplies about twice as fast for 1-16 channels.

    Args:
      x: [batch, height, width, in_channels] ('NHWC') or [in_channels, height, width, batch]
        ('CHWN').
      kernel: [kh, kw, in_channels, out_channels] (HWIO, the layout of lax.conv / nn.Conv).
      layout: the layout of `x` and of the result.

    Returns:
      [batch, ho, wo, out_channels] ('NHWC') or [out_channels, ho, wo, batch] ('CHWN'), with
      ho = height - kh + 1, wo = width - kw + 1.
    """
    kh, kw, cin, cout = kernel.shape
    ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    # Patch features in (i, j, c) order, the row-major order of the HWIO kernel's first 3 axes.
    slices = [x[:, i : i + ho, j : j + wo, :] for i in range(kh) for j in range(kw)]
    weights = kernel.reshape(kh * kw * cin, cout)
    if layout == "NHWC":
        return jnp.concatenate(slices, axis=-1) @ weights
    batch = x.shape[-1]
    # Stacked row by row: [kh, kw, cin, ho, wo, batch]. XLA:CPU fuses a concatenate with its
    # operands only up to 8 operands (kMaxConcatenateArguments in
    # xla/service/cpu/cpu_instruction_fusion.cc); one stack of kh * kw slices would leave
    # every slice copied to its own buffer and then copied again. Two nested stacks of <= 8
    # (kernels up to 8x8) become one loop fusion that writes the patches once: 1.04-1.2x
    # faster seed-CNN train steps, same values bit for bit.
    rows = [jnp.stack(slices[i * kw : (i + 1) * kw]) for i in range(kh)]
    patches = jnp.stack(rows).reshape(kh * kw * cin, ho * wo * batch)
    return (weights.T @ patches).reshape(cout, ho, wo, batch)


@functools.cache
def _warn_native_unavailable(reason: str) -> None:
    """Once per process and reason: 'auto' took the slower im2col on CPU."""
    if "JAXNETS_NATIVE_CONV=0" not in reason:
        warnings.warn(
            f"jaxnets: the C++ convolution kernels are unavailable ({reason}); MnistCNN uses "
            f"conv_impl='im2col' on CPU, 1.3-1.8x slower. Fix: {native_conv.unavailable_fix()} "
            "(`python -m jaxnets doctor` checks), or JAXNETS_NATIVE_CONV=0 to silence this",
            RuntimeWarning,
            stacklevel=3,
        )


def resolve_conv_impl(impl: ConvImpl) -> ConvImpl:
    """'auto' -> 'native' on CPU where its kernels build (else 'im2col'), 'im2col' elsewhere.

    Raises ValueError for an unknown name and RuntimeError for 'native' where its kernels are
    unavailable (the message says why and what to use instead).
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl={impl!r}; use one of {CONV_IMPLS}")
    on_cpu = jax.default_backend() == "cpu"
    if impl == "auto":
        if not on_cpu:
            return "im2col"
        if not native_conv.available():
            _warn_native_unavailable(native_conv.unavailable_reason())
            return "im2col"
        return "native"
    if impl == "native" and not native_conv.available():
        raise RuntimeError(
            f"conv_impl='native': the C++ kernels are unavailable "
            f"({native_conv.unavailable_reason()}). Fix: {native_conv.unavailable_fix()}, or "
            "use conv_impl='im2col'"
        )
    return impl


def _conv_native(x: Array, kernel: Array, layout: Layout = "NHWC") -> Array:
    """The patch-free C++ kernels of `native_conv` (batch-last; NHWC is transposed to it)."""
    if layout == "CHWN":
        return native_conv.conv_chwn(x, kernel)
    return native_conv.conv_chwn(x.transpose(3, 1, 2, 0), kernel).transpose(3, 1, 2, 0)


def _conv_xla(x: Array, kernel: Array, layout: Layout = "NHWC") -> Array:
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "VALID", dimension_numbers=(layout, "HWIO", layout)
    )


def _max_pool_2x2(x: Array, impl: ConvImpl) -> Array:
    """2x2 max pool, stride 2, valid (an odd last row/column is dropped, as in Keras).

    'xla' uses reduce_window (its gradient sends a tie to the first maximum); 'im2col'
    takes the max of the four stride-2 quadrants (its gradient splits a tie evenly, as
    jax.grad of `max` does). Both are valid subgradients; they differ only where a 2x2
    window holds equal maxima. `x` is NHWC for 'xla'; for 'im2col' any layout with height
    and width on axes 1 and 2 (NHWC or CHWN).
    """
    if impl == "xla":
        return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    return _max_pool_quadrants(x)


def _quadrants(x: Array) -> list[Array]:
    """The four stride-2 sub-grids of axes 1 and 2: top-left, top-right, bottom-left, ..."""
    h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
    return [x[:, i:h:2, j:w:2, :] for i in (0, 1) for j in (0, 1)]


@jax.custom_jvp
def _max_pool_quadrants(x: Array) -> Array:
    q = _quadrants(x)
    return jnp.maximum(jnp.maximum(q[0], q[1]), jnp.maximum(q[2], q[3]))


@_max_pool_quadrants.defjvp
def _max_pool_quadrants_jvp(primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    """The derivative of a reshape-and-max pool (a tie splits the tangent evenly), written so
    that XLA:CPU makes its transpose, the gradient, one loop fusion: 1.05-1.1x faster seed-CNN
    train steps than the derived rule, which stores a float tie indicator and reduces it to
    counts. A JVP (not a VJP) rule, so forward mode (jvp, jacfwd, Hessian-vector products)
    works too."""
    (x,), (dx,) = primals, tangents
    y = _max_pool_quadrants(x)
    hits = [q == y for q in _quadrants(x)]
    count = sum(hit.astype(y.dtype) for hit in hits)
    dy = sum(jnp.where(hit, dq, 0) for hit, dq in zip(hits, _quadrants(dx))) / count
    return y, dy


def _split_batch(x: Array, groups: int) -> list[Array]:
    """`x` cut along axis 0 into min(groups, len(x)) parts whose sizes differ by at most one."""
    groups = min(groups, x.shape[0]) or 1
    size, extra = divmod(x.shape[0], groups)
    bounds = [i * size + min(i, extra) for i in range(groups + 1)]
    return [x[lo:hi] for lo, hi in zip(bounds, bounds[1:])]


class ValidConv(nn.Module):
    """Valid, stride-1 2D convolution with a square kernel.

    Parameters are `kernel` [k, k, in, features] (HWIO, glorot_uniform as Keras 1) and
    `bias` [features] (zeros): the tree of `nn.Conv(features, (k, k), padding="VALID")`,
    whichever `impl` and `layout` compute it, so checkpoints move freely between them.

    Attributes:
      features: number of output channels.
      kernel_size: side k of the square kernel.
      impl: 'xla' (lax.conv_general_dilated), 'im2col' (shifted slices + one matmul),
        'native' (the C++ kernels of `jaxnets.models.native_conv`, float32, batch-last; on
        other platforms than CPU they lower to lax.conv) or 'auto' ('native' on CPU where
        its kernels build and the parameters are float32, else 'im2col').
      layout: 'NHWC' (channels-last, as nn.Conv) or 'CHWN' (channels first, batch last: the
        fast layout of 'im2col' and 'native' on CPU) for both input and output.
    """

    features: int
    kernel_size: int
    impl: ConvImpl = "xla"
    layout: Layout = "NHWC"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.impl not in CONV_IMPLS:
            raise ValueError(f"ValidConv: impl={self.impl!r}; use one of {CONV_IMPLS}")
        impl = resolve_conv_impl(self.impl)
        if self.layout not in LAYOUTS:
            raise ValueError(f"ValidConv: layout={self.layout!r}; use one of {LAYOUTS}")
        k = self.kernel_size
        in_channels = x.shape[-1] if self.layout == "NHWC" else x.shape[0]
        kernel = self.param(
            "kernel", nn.initializers.glorot_uniform(), (k, k, in_channels, self.features)
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias)
        if impl == "native" and x.dtype != jnp.float32 and self.impl == "auto":
            impl = "im2col"  # the C++ kernels are float32 only
        conv = {"im2col": _conv_im2col, "xla": _conv_xla, "native": _conv_native}[impl]
        if self.layout == "CHWN":
            bias = bias[:, None, None, None]
        return conv(x, kernel, self.layout) + bias


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
      conv_impl: 'auto' (default): 'native' on CPU where its kernels build, else 'im2col'.
        'native': C++ kernels (`jaxnets.models.native_conv`, compiled once per machine)
        that read the batch-last input in place and never write a patch matrix; its
        derivatives are the same kernels, so grad, jvp and vmap work to any order. 'im2col':
        shifted slices + one matmul per convolution. Both run batch-last (CHWN between the
        input and the flatten) with the max pool over stride-2 quadrants. 'xla':
        lax.conv_general_dilated + reduce_window max pool, NHWC. Same parameters, same
        function (outputs and gradients agree to 1e-5). A jitted forward + backward of a
        batch of 100 on the 2-core Intel Xeon VM (`scripts/bench_cnn_conv.py`): 3.2-3.4 ms
        'native', 4.2-4.6 ms 'im2col', 17-24 ms 'xla'; a 48k-image training epoch
        (`bench/jaxnets_cnn.py`) 1.3-1.9 s 'native' against 2.2-2.6 s 'im2col'. On an AMD EPYC
        Zen 5, 'im2col' took 2.5 ms against 10.5 ('native' not measured there). What
        'im2col' took: batch-last patches (in NHWC the 25-72 patch features sit on the minor
        axis, which XLA:CPU gathers and multiplies slowly: 2.4x), patch stacks XLA:CPU fuses
        (<= 8 operands per concatenate: 1.04-1.2x), a pool gradient written as one fusion
        (1.05-1.1x) and two batch groups (1.13-1.2x); it is bound by the patch matrices'
        memory traffic, which 'native' does not have. Not measured on GPU/TPU, where 'xla'
        (cuDNN/TPU convolutions) may be the better choice.
      batch_groups: the batch runs as this many independent sub-batches (sizes differing by
        at most one, never more than the batch), concatenated: the same function (values and
        gradients agree to rounding), but independent chains of operations that XLA:CPU's
        runtime runs concurrently on its threads, where one chain of small ops leaves a core
        idle most of a step. None (default): 2 with 'native' or 'im2col' on CPU (training
        steps 1.13-1.2x faster with 'im2col' on the 2-core CPU than with 1, 1.05-1.1x with
        'native', whose kernels also split their work over XLA's threads; 3 is slower), else
        1 ('xla' gains nothing from 2; GPU/TPU run one stream of kernels: not measured).

    Example:
      >>> model = MnistCNN()
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
      >>> model.apply({"params": params}, jnp.zeros((100, 28, 28, 1))).shape
      (100, 10)
    """

    num_classes: int = 10
    conv_impl: ConvImpl = "auto"
    batch_groups: int | None = None

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
        impl = resolve_conv_impl(self.conv_impl)
        groups = self.batch_groups
        if groups is None:
            groups = 2 if impl != "xla" and jax.default_backend() == "cpu" else 1
        if not isinstance(groups, int) or groups < 1:
            raise ValueError(
                f"MnistCNN: batch_groups={self.batch_groups!r}; use a positive int or None"
            )
        # im2col runs the convolutions batch-last (CHWN): 2-2.5x faster training on XLA:CPU.
        layout = "NHWC" if impl == "xla" else "CHWN"
        # NHWC <-> CHWN swaps axes 0 and 3 (its own inverse).
        swap = (lambda t: t.transpose(3, 1, 2, 0)) if layout == "CHWN" else (lambda t: t)
        sow = self.is_mutable_collection("intermediates")
        conv1 = ValidConv(4, 5, self.conv_impl, layout, name="conv1")
        conv2 = ValidConv(8, 3, self.conv_impl, layout, name="conv2")
        conv3 = ValidConv(16, 3, self.conv_impl, layout, name="conv3")
        dense1 = nn.Dense(128, kernel_init=nn.initializers.normal(stddev=0.05), name="dense1")
        dense2 = nn.Dense(
            self.num_classes, kernel_init=nn.initializers.normal(stddev=0.05), name="dense2"
        )

        def run(images: Array) -> tuple[Array, dict[str, Array]]:
            seen = {}
            x = swap(images)
            x = jnp.tanh(conv1(x))
            if sow:
                seen["conv1_tanh"] = swap(x)
            x = jnp.tanh(conv2(x))
            x = _max_pool_2x2(x, impl)
            if sow:
                seen["pool1"] = swap(x)
            x = jnp.tanh(conv3(x))
            x = seen["pool2"] = swap(_max_pool_2x2(x, impl))
            x = seen["flatten"] = x.reshape(x.shape[0], -1)
            x = seen["dense1_tanh"] = jnp.tanh(dense1(x))
            return dense2(x), seen

        # Independent sub-batches: XLA:CPU runs their operations concurrently (batch_groups).
        parts = [run(part) for part in _split_batch(images, groups)]
        logits = jnp.concatenate([p[0] for p in parts])
        if sow:
            for name in parts[0][1]:
                self.sow("intermediates", name, jnp.concatenate([p[1][name] for p in parts]))
        return logits
