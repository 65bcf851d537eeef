"""The MNIST CNN of the Keras 1 tutorial (SEEDS.md section 2), as a Flax Linen module."""

import functools
from typing import Literal, NamedTuple, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype, Initializer

from jaxnets.core.types import DATA_AXIS, Array
from jaxnets.models import native_conv
from jaxnets.models.im2col import LAYOUTS, Layout
from jaxnets.models.im2col import conv_im2col as _conv_im2col

ConvImpl = Literal["auto", "native", "im2col", "xla"]
CONV_IMPLS = ("auto", "native", "im2col", "xla")
IMAGE_SHAPE = (28, 28, 1)


class Choices(NamedTuple):
    """What a `MnistCNN` runs as on one platform (`platform_choices`)."""

    conv_impl: str  # 'native', 'im2col' or 'xla'
    batch_groups: int


def platform_choices(
    conv_impl: ConvImpl = "auto",
    batch_groups: int | None = None,
    *,
    platform: str,
    dtype: Dtype = jnp.float32,
) -> Choices:
    """The convolution and batch groups a CNN runs with when lowered for `platform`.

    'auto' is 'native' on CPU in float32 (the C++ kernels; where they do not build, a CPU
    lowering runs their im2col twin, with a warning), 'im2col' on CPU in other dtypes, and
    'xla' on GPU/TPU: there `lax.conv` goes to cuDNN / the TPU's convolution units, while
    im2col writes patch matrices to device memory and the batch-last layouts fight the
    accelerators' tiling (reasoned, not yet measured: `scripts/accelerator_check.py`
    measures it). `batch_groups=None` is 2 on CPU with 'native' or 'im2col' (XLA:CPU runs
    independent sub-batches on its threads concurrently) and 1 elsewhere (an accelerator
    runs one stream of kernels). The model takes these per lowering platform
    (`jax.lax.platform_dependent`), never from the process's default backend.

    Args:
      conv_impl: the model's `conv_impl`.
      batch_groups: the model's `batch_groups` (None: the platform's default).
      platform: a lowering platform: 'cpu', 'cuda', 'rocm' or 'tpu'.
      dtype: the compute dtype (the C++ kernels are float32 only).
    """
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl={conv_impl!r}; use one of {CONV_IMPLS}")
    on_cpu = platform == "cpu"
    impl = conv_impl
    if impl == "auto":
        impl = ("native" if jnp.dtype(dtype) == jnp.float32 else "im2col") if on_cpu else "xla"
    if batch_groups is None:
        batch_groups = 2 if on_cpu and impl != "xla" else 1
    return Choices(impl, batch_groups)


def resolve_conv_impl(impl: ConvImpl, platform: str | None = None) -> str:
    """What `impl` runs as on `platform` (default: that of `jax.devices()`), for reports.

    Unlike the model, which decides per lowering platform, this checks the C++ kernels now:
    'auto' on CPU is 'im2col' where they do not build. Raises ValueError for an unknown name
    and RuntimeError for 'native' where its kernels are unavailable.
    """
    platform = platform or jax.devices()[0].platform
    choice = platform_choices(impl, platform=platform).conv_impl
    if choice == "native" and not native_conv.available():
        if impl == "auto":
            return "im2col"
        raise RuntimeError(
            f"conv_impl='native': the C++ kernels are unavailable "
            f"({native_conv.unavailable_reason()}). Fix: {native_conv.unavailable_fix()}, or "
            "use conv_impl='im2col'"
        )
    return choice


def _conv_native(x: Array, kernel: Array, layout: Layout = "NHWC", fallback: bool = False) -> Array:
    """The patch-free C++ kernels of `native_conv` (batch-last; NHWC is transposed to it)."""
    if layout == "CHWN":
        return native_conv.conv_chwn(x, kernel, fallback=fallback)
    x = x.transpose(3, 1, 2, 0)
    return native_conv.conv_chwn(x, kernel, fallback=fallback).transpose(3, 1, 2, 0)


def _conv(impl: str, fallback: bool):
    """The convolution function `(x, kernel, layout)` of a resolved implementation."""
    if impl == "native":
        return functools.partial(_conv_native, fallback=fallback)
    return {"im2col": _conv_im2col, "xla": _conv_xla}[impl]


def _conv_xla(x: Array, kernel: Array, layout: Layout = "NHWC") -> Array:
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "VALID", dimension_numbers=(layout, "HWIO", layout)
    )


def _max_pool_2x2(x: Array, impl: str) -> Array:
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
    return y, cast(Array, dy)  # sum() of arrays: an array (its start value 0 is never returned)


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
        other platforms than CPU they lower to lax.conv) or 'auto' (per lowering platform,
        `platform_choices`: 'native' on CPU in float32, 'im2col' on CPU otherwise, 'xla' on
        GPU/TPU).
      layout: 'NHWC' (channels-last, as nn.Conv) or 'CHWN' (channels first, batch last: the
        fast layout of 'im2col' and 'native' on CPU) for both input and output.
      dtype: the compute dtype (None: promoted from the input and the parameters).
      param_dtype: the parameters' dtype.
    """

    features: int
    kernel_size: int
    impl: ConvImpl = "xla"
    layout: Layout = "NHWC"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.impl not in CONV_IMPLS:
            raise ValueError(f"ValidConv: impl={self.impl!r}; use one of {CONV_IMPLS}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"ValidConv: layout={self.layout!r}; use one of {LAYOUTS}")
        k = self.kernel_size
        in_channels = x.shape[-1] if self.layout == "NHWC" else x.shape[0]
        kernel = self.param(
            "kernel",
            nn.initializers.glorot_uniform(),
            (k, k, in_channels, self.features),
            self.param_dtype,
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if self.layout == "CHWN":
            bias = bias[:, None, None, None]

        def conv(impl):
            fn = _conv(impl, fallback=self.impl == "auto")
            return lambda x, kernel: fn(x, kernel, self.layout)

        choose = lambda platform: platform_choices(self.impl, platform=platform, dtype=x.dtype)
        return _per_platform(lambda p: choose(p).conv_impl, conv, x, kernel) + bias


def _per_platform(choose, make, *args):
    """`make(choose(platform))(*args)` for the platform the program is lowered for.

    `choose` maps a lowering platform to a (hashable) choice; where CPU and the accelerators
    choose alike there is one program, else `jax.lax.platform_dependent` holds both ('cpu'
    and the default for 'cuda', 'rocm', 'tpu'), and lowering keeps only the target's.
    """
    cpu, other = choose("cpu"), choose("tpu")
    if cpu == other:
        return make(cpu)(*args)
    return jax.lax.platform_dependent(*args, cpu=make(cpu), default=make(other))


class _Weights(nn.Module):
    """One layer's `kernel` (`shape`) and `bias` [shape[-1]] (zeros), for a pure forward.

    Created as `nn.Dense` / `nn.Conv` create theirs (same names, order, keys and values), so
    the parameter tree is theirs while the computation runs outside Flax, inside
    `jax.lax.platform_dependent` branches (where Flax modules cannot be called).
    """

    shape: tuple[int, ...]
    kernel_init: Initializer
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self) -> tuple[Array, Array]:
        kernel = self.param("kernel", self.kernel_init, self.shape, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), self.shape[-1:], self.param_dtype)
        return kernel, bias


def _data_mesh(images: Array):
    """The mesh the program is traced under (`jax.sharding.use_abstract_mesh`, as the engine's
    programs do) when its data axis splits this batch over several devices; else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or DATA_AXIS not in mesh.axis_names:
        return None
    n = mesh.shape[DATA_AXIS]
    return mesh if n > 1 and images.shape[0] % n == 0 else None


def _cnn_forward(weights, images, *, choices: Choices, fallback: bool, sow: bool):
    """The seed CNN on `images` with `weights` {layer: (kernel, bias)}, as `choices` say.

    Returns (logits, intermediates): the sown layer outputs (NHWC) when `sow`, else {}.
    The C++ kernels and im2col are per-device code: under a mesh whose data axis splits the
    batch they run inside `shard_map`, each device on its own examples (XLA would otherwise
    gather the whole batch onto every device for a custom call it cannot partition).
    """
    impl, groups = choices
    conv = _conv(impl, fallback)
    # im2col and native run the convolutions batch-last (CHWN): 2-2.5x faster on XLA:CPU.
    layout = "NHWC" if impl == "xla" else "CHWN"
    # NHWC <-> CHWN swaps axes 0 and 3 (its own inverse).
    swap = (lambda t: t.transpose(3, 1, 2, 0)) if layout == "CHWN" else (lambda t: t)

    def forward(weights, images):
        def conv_tanh(name, x):
            kernel, bias = weights[name]
            bias = bias[:, None, None, None] if layout == "CHWN" else bias
            return jnp.tanh(conv(x, kernel, layout) + bias)

        def dense(name, x):
            kernel, bias = weights[name]
            return x @ kernel + bias

        def run(images: Array) -> tuple[Array, dict[str, Array]]:
            seen = {}
            x = conv_tanh("conv1", swap(images))
            seen["conv1_tanh"] = swap(x)
            x = _max_pool_2x2(conv_tanh("conv2", x), impl)
            seen["pool1"] = swap(x)
            x = swap(_max_pool_2x2(conv_tanh("conv3", x), impl))
            seen["pool2"] = x
            x = seen["flatten"] = x.reshape(x.shape[0], -1)
            x = seen["dense1_tanh"] = jnp.tanh(dense("dense1", x))
            return dense("dense2", x), (seen if sow else {})

        # Independent sub-batches: XLA:CPU runs their operations concurrently (batch_groups).
        parts = [run(part) for part in _split_batch(images, groups)]
        logits = jnp.concatenate([p[0] for p in parts])
        seen = {name: jnp.concatenate([p[1][name] for p in parts]) for name in parts[0][1]}
        return logits, seen

    mesh = None if impl == "xla" else _data_mesh(images)
    if mesh is None:
        return forward(weights, images)
    split = jax.sharding.PartitionSpec(DATA_AXIS)
    return jax.shard_map(
        forward,
        mesh=mesh,
        in_specs=(jax.sharding.PartitionSpec(), split),
        out_specs=split,
        # The C++ primitives carry no varying-axes rule: with the check on, their values
        # come out wrong (measured); off, the weights' cotangents are summed over devices
        # all the same (1 and 8 devices agree to 1e-8 in the gradients, tested).
        check_vma=False,
    )(weights, images)


class MnistCNN(nn.Module):
    """The seed MNIST CNN: 3 tanh convolutions, 2 max pools, 2 dense layers; 35,754 parameters.

    [B,28,28,1] -> conv1 4@5x5 tanh [B,24,24,4] -> conv2 8@3x3 tanh [B,22,22,8] -> pool
    [B,11,11,8] -> conv3 16@3x3 tanh [B,9,9,16] -> pool [B,4,4,16] -> flatten [B,256] ->
    dense1 128 tanh -> dense2 num_classes logits. Softmax lives in the loss
    (`jaxnets.core.losses.softmax_cross_entropy`).

    Initialisers as Keras 1: convolution kernels glorot_uniform, dense kernels
    init='normal' (normal, stddev 0.05), biases zero. Channels-last, so flatten order is
    (h, w, c), not Keras 1's channels-first (c, h, w). The parameter tree is that of
    `nn.Conv`/`nn.Dense` layers named conv1..3, dense1..2, whatever runs them.

    The model does not scale its input: pass float images already in [0, 1] (the data
    pipeline divides uint8 pixels by 255); integer images are rejected.

    Layer outputs are sown into the 'intermediates' collection (`conv1_tanh`, `pool1`, `pool2`,
    `flatten`, `dense1_tanh`) when it is mutable, for inspection; otherwise sowing costs nothing.

    Platform-dependent choices (`conv_impl='auto'`, `batch_groups=None`) are made per
    lowering platform with `jax.lax.platform_dependent` (`platform_choices`): a program
    lowered or exported for TPU from a CPU host gets the TPU's choices, and one program
    exported for several platforms holds each platform's own.

    Attributes:
      num_classes: number of output logits.
      conv_impl: 'auto' (default): 'native' on CPU in float32, 'im2col' on CPU in other
        dtypes, 'xla' on GPU/TPU (`platform_choices`).
        'native': C++ kernels (`jaxnets.models.native_conv`, compiled once per machine when
        a program is first lowered for CPU) that read the batch-last input in place and
        never write a patch matrix; its derivatives are the same kernels, so grad, jvp and
        vmap work to any order; exported (`jax.export`) it runs its pure-JAX twin. 'im2col':
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
        memory traffic, which 'native' does not have. On GPU/TPU 'auto' is 'xla' (cuDNN /
        the TPU's convolution units; reasoned, not yet measured there).
      batch_groups: the batch runs as this many independent sub-batches (sizes differing by
        at most one, never more than the batch), concatenated: the same function (values and
        gradients agree to rounding), but independent chains of operations that XLA:CPU's
        runtime runs concurrently on its threads, where one chain of small ops leaves a core
        idle most of a step. None (default): 2 with 'native' or 'im2col' on CPU (training
        steps 1.13-1.2x faster with 'im2col' on the 2-core CPU than with 1, 1.05-1.1x with
        'native', whose kernels also split their work over XLA's threads; 3 is slower), else
        1 ('xla' gains nothing from 2; GPU/TPU run one stream of kernels: not measured).
      dtype: the compute dtype (e.g. jnp.bfloat16: images, weights and activations are cast
        to it); None: promoted from the images and the parameters (float32). Logits come out
        in at least float32, so losses and metrics are never summed in bfloat16.
      param_dtype: the parameters' dtype (float32: the optimiser updates full-precision
        weights; mixed precision casts them per step).

    Example:
      >>> model = MnistCNN()
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
      >>> model.apply({"params": params}, jnp.zeros((100, 28, 28, 1))).shape
      (100, 10)
    """

    num_classes: int = 10
    conv_impl: ConvImpl = "auto"
    batch_groups: int | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: Array) -> Array:
        """Logits [batch, num_classes] (float32 or wider) of float images [batch, 28, 28, 1]."""
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
        groups = self.batch_groups
        if groups is not None and (
            isinstance(groups, bool) or not isinstance(groups, int) or groups < 1
        ):
            raise ValueError(
                f"MnistCNN: batch_groups={self.batch_groups!r}; use a positive int or None"
            )
        glorot, normal = nn.initializers.glorot_uniform(), nn.initializers.normal(stddev=0.05)
        shapes = {
            "conv1": ((5, 5, 1, 4), glorot),
            "conv2": ((3, 3, 4, 8), glorot),
            "conv3": ((3, 3, 8, 16), glorot),
            "dense1": ((256, 128), normal),
            "dense2": ((128, self.num_classes), normal),
        }
        weights = {
            name: _Weights(shape, init, self.param_dtype, name=name)()
            for name, (shape, init) in shapes.items()
        }
        dtype = self.dtype or jnp.result_type(images, self.param_dtype)
        weights = jax.tree.map(lambda w: w.astype(dtype), weights)
        images = images.astype(dtype)
        sow = self.is_mutable_collection("intermediates")
        if self.conv_impl == "native":
            resolve_conv_impl("native", "cpu")  # the kernels, asked for, must build
        logits, seen = _per_platform(
            lambda platform: platform_choices(
                self.conv_impl, groups, platform=platform, dtype=dtype
            ),
            lambda choices: functools.partial(
                _cnn_forward, choices=choices, fallback=self.conv_impl == "auto", sow=sow
            ),
            weights,
            images,
        )
        for name, value in seen.items():
            self.sow("intermediates", name, value)
        return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
