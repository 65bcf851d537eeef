"""Patch-free batch-last convolutions for XLA:CPU: C++ kernels (native_conv.cc) as JAX primitives.

`conv_chwn(x, kernel)` is a valid, stride-1 convolution of x [C, H, W, B] (batch last) with
kernel [KH, KW, C, O] (HWIO), giving [O, H-KH+1, W-KW+1, B]. Three primitives (the product,
its input gradient and its weight gradient), each bilinear and each the transpose of the
others, so grad, jvp (forward mode, Hessian-vector products), vmap and jit all work, to any
order. Lowered for CPU they call the C++ kernels; for other platforms they lower to
`lax.conv_general_dilated`. The choice is made per lowering platform, not by the process's
default backend: a GPU machine that jits for CPU gets the kernels, a CPU host that lowers
for TPU gets a convolution.

The kernels are compiled on first use with the C++ compiler (`$CXX`, else `g++`, with
`-O3 -march=native`) against the XLA FFI headers that jaxlib ships, into `native/` of the
jaxnets cache directory (`$JAXNETS_CACHE_DIR`, else `$XDG_CACHE_HOME/jaxnets`, else
`~/.cache/jaxnets`), keyed by the source, the jaxlib version, the compiler and the CPU; the
build takes about 5 s, once per machine. Where there is no compiler or the build fails,
`available()` is False, `unavailable_reason()` says why, and callers use another
implementation. `JAXNETS_NATIVE_CONV=0` turns the kernels off. Custom calls carry no
compatibility guarantee, so `jax.export` never serializes them: exported for CPU, the
primitives lower to their pure-JAX twin (im2col, the same function to float32 rounding).
With `conv_chwn(..., fallback=True)` the twin is also what a CPU lowering gets where the
kernels are unavailable (a warning says why), so the kernels are built only when a program
is lowered for CPU, never on a GPU or TPU host that lowers for its accelerator.
"""

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
import jaxlib
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jaxnets.core.types import Array
from jaxnets.data.cache import cache_write_failed, default_cache_dir
from jaxnets.models.im2col import conv_im2col

_SOURCE = pathlib.Path(__file__).with_name("native_conv.cc")
_TARGETS = {
    "forward": "JaxnetsConvForward",
    "input_gradient": "JaxnetsConvInputGradient",
    "weight_gradient": "JaxnetsConvWeightGradient",
}
_DIMENSION_NUMBERS = ("CHWN", "HWIO", "CHWN")


def _cpu_identity() -> str:
    """What -march=native compiles for: the CPU model and its instruction-set flags."""
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep))) or platform.machine()


class _Unavailable(RuntimeError):
    """Why the kernels cannot be built, and the fix (`args`: reason, fix)."""


FIX_COMPILER = "install g++ or set $CXX to a C++17 compiler"
FIX_CACHE = "set $JAXNETS_CACHE_DIR to a writable directory (or make {path} writable)"
FIX_BUILD = "check the compiler output above, or set $CXX to another C++17 compiler"


_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


@functools.cache
def _build_key() -> str:
    """What the library is built from: this source, jaxlib, the compiler, its flags and the
    CPU. It names the cached library and the FFI targets, so a program that calls the kernels
    changes with them (the steps-per-call record is keyed on the program: a kernel that runs
    at another speed is measured again)."""
    key = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), jaxlib.__version__, _compiler(), " ".join(_FLAGS)):
        key.update(part if isinstance(part, bytes) else part.encode())
    key.update(_cpu_identity().encode())
    return key.hexdigest()[:16]


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


def _target(name: str) -> str:
    """The FFI target of kernel `name` (a key of `_TARGETS`) for this build."""
    return f"jaxnets_{_TARGETS[name]}_{_build_key()[:8]}"


def _build() -> pathlib.Path:
    """The compiled library, built now if this source/jaxlib/CPU has none cached."""
    compiler, flags = _compiler(), list(_FLAGS)
    if shutil.which(compiler) is None:
        raise _Unavailable(f"no C++ compiler {compiler!r} on PATH", FIX_COMPILER)
    target = pathlib.Path(default_cache_dir()) / "native" / f"native_conv-{_build_key()}.so"
    if target.exists():
        return target
    # Built beside the target and renamed into place: concurrent builds (test workers) never
    # see a half-written library.
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    except OSError as e:
        # The cache only saves the next process a build: build in a temporary directory.
        cache_write_failed(target, e)
        try:
            target = pathlib.Path(tempfile.mkdtemp(prefix="jaxnets-native-")) / target.name
            fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
        except OSError as e2:
            raise _Unavailable(
                f"the kernel cache {target.parent} is not writable ({e2.strerror or e2})",
                FIX_CACHE.format(path=target.parent),
            ) from None
    os.close(fd)
    command = [compiler, *flags, "-I", jax.ffi.include_dir(), str(_SOURCE), "-o", partial]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise _Unavailable(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}", FIX_BUILD)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target


@functools.cache
def _load() -> tuple[bool, str, str]:
    if os.environ.get("JAXNETS_NATIVE_CONV", "1") == "0":
        return False, "turned off by JAXNETS_NATIVE_CONV=0", "unset JAXNETS_NATIVE_CONV"
    if platform.system() == "Windows":
        return False, "not built on Windows", "use conv_impl='im2col' (the same parameters)"
    try:
        library = ctypes.cdll.LoadLibrary(str(_build()))
    except _Unavailable as error:
        return False, *error.args
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        return False, str(error), FIX_BUILD
    for name, symbol in _TARGETS.items():
        capsule = jax.ffi.pycapsule(getattr(library, symbol))
        jax.ffi.register_ffi_target(_target(name), capsule, platform="cpu")
    return True, "", ""


def available() -> bool:
    """Whether the C++ kernels are built and registered (building them on the first call)."""
    return _load()[0]


def unavailable_reason() -> str:
    """Why `available()` is False ('' when it is True)."""
    return _load()[1]


def unavailable_fix() -> str:
    """What makes `available()` True: the fix for `unavailable_reason()` ('' when it is)."""
    return _load()[2]


def _check_stacks(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    lead = {shape[:-4] for shape in shapes}
    if len(lead) != 1 or any(len(shape) < 4 for shape in shapes):
        raise ValueError(f"native conv: operands {shapes} need rank >= 4 and equal leading axes")
    return lead.pop()


def _forward_shape(x, w):
    lead = _check_stacks(x.shape, w.shape)
    c, h, width, b = x.shape[-4:]
    kh, kw, wc, o = w.shape[-4:]
    if wc != c or kh > h or kw > width:
        raise ValueError(f"native conv: x {x.shape} (CHWN) and kernel {w.shape} (HWIO) disagree")
    return jax.core.ShapedArray((*lead, o, h - kh + 1, width - kw + 1, b), x.dtype)


def _input_gradient_shape(dy, w):
    lead = _check_stacks(dy.shape, w.shape)
    o, ho, wo, b = dy.shape[-4:]
    kh, kw, c, w_out = w.shape[-4:]
    if w_out != o:
        raise ValueError(f"native conv: dy {dy.shape} (CHWN) and kernel {w.shape} (HWIO) disagree")
    return jax.core.ShapedArray((*lead, c, ho + kh - 1, wo + kw - 1, b), dy.dtype)


def _weight_gradient_shape(x, dy):
    lead = _check_stacks(x.shape, dy.shape)
    c, h, width, b = x.shape[-4:]
    o, ho, wo, db = dy.shape[-4:]
    if db != b or ho > h or wo > width:
        raise ValueError(f"native conv: x {x.shape} and dy {dy.shape} (CHWN) disagree")
    return jax.core.ShapedArray((*lead, h - ho + 1, width - wo + 1, c, o), x.dtype)


def _stacked(conv, lead: int):
    for _ in range(lead):
        conv = jax.vmap(conv)
    return conv


def _lax_conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=_DIMENSION_NUMBERS)


def _im2col_conv(x, w):
    return conv_im2col(x, w, "CHWN")


def _twins(conv) -> dict:
    """The three products as pure JAX, from one forward convolution `conv` and its vjp."""

    def forward(x, w):
        return _stacked(conv, x.ndim - 4)(x, w)

    def input_gradient(dy, w):
        x = jnp.zeros(_input_gradient_shape(dy, w).shape, dy.dtype)
        return jax.vjp(lambda x: forward(x, w), x)[1](dy)[0]

    def weight_gradient(x, dy):
        w = jnp.zeros(_weight_gradient_shape(x, dy).shape, x.dtype)
        return jax.vjp(lambda w: forward(x, w), w)[1](dy)[0]

    return {
        "forward": forward,
        "input_gradient": input_gradient,
        "weight_gradient": weight_gradient,
    }


_REFERENCE = _twins(_lax_conv)  # other platforms: their own convolutions (cuDNN, the TPU's)
_CPU_TWIN = _twins(_im2col_conv)  # CPU without the kernels, or exported: the fast pure twin


@functools.cache
def _warn_fallback(reason: str) -> None:
    """Once per process and reason: a CPU lowering took the im2col twin of the kernels."""
    if "JAXNETS_NATIVE_CONV=0" not in reason:
        warnings.warn(
            f"jaxnets: the C++ convolution kernels are unavailable ({reason}); MnistCNN runs "
            f"conv_impl='im2col' on CPU, 1.3-1.8x slower. Fix: {unavailable_fix()} "
            "(`python -m jaxnets doctor` checks), or JAXNETS_NATIVE_CONV=0 to silence this",
            RuntimeWarning,
            stacklevel=2,
        )


def _primitive(name: str, shape_rule) -> Primitive:
    prim = Primitive(f"jaxnets_conv_{name}")
    impls = {f: jax.jit(functools.partial(prim.bind, fallback=f)) for f in (False, True)}
    prim.def_impl(lambda *args, fallback: impls[fallback](*args))
    prim.def_abstract_eval(lambda *args, fallback: shape_rule(*args))
    ffi_lowering = jax.ffi.ffi_lowering(_target(name))
    twin_lowering = mlir.lower_fun(_CPU_TWIN[name], multiple_results=False)

    def cpu_lowering(ctx, *args, fallback):
        if ctx.module_context.lowering_parameters.for_export:
            return twin_lowering(ctx, *args)  # no custom call in a serialized program
        if not available():  # registers the FFI targets
            if not fallback:
                raise RuntimeError(
                    f"conv_impl='native': the C++ kernels are unavailable "
                    f"({unavailable_reason()}). Fix: {unavailable_fix()}, or use "
                    "conv_impl='im2col'"
                )
            _warn_fallback(unavailable_reason())
            return twin_lowering(ctx, *args)
        return ffi_lowering(ctx, *args)

    reference_lowering = mlir.lower_fun(_REFERENCE[name], multiple_results=False)
    mlir.register_lowering(prim, cpu_lowering, "cpu")
    mlir.register_lowering(prim, lambda ctx, *args, fallback: reference_lowering(ctx, *args))

    def batch_rule(args, dims, *, fallback):
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
        args = (batching.bdim_at_front(a, d, size) for a, d in zip(args, dims))
        return prim.bind(*args, fallback=fallback), 0

    batching.primitive_batchers[prim] = batch_rule
    return prim


_forward_p = _primitive("forward", _forward_shape)
_input_gradient_p = _primitive("input_gradient", _input_gradient_shape)
_weight_gradient_p = _primitive("weight_gradient", _weight_gradient_shape)

# Each product is bilinear; its transposes are the other two (<a, b> pairs the cotangent with
# the output): conv(x, w) is adjoint to input_gradient(., w) in x and to weight_gradient(x, .)
# in w, and so on around the triangle.
ad.defbilinear(
    _forward_p,
    lambda ct, x, w, **params: _input_gradient_p.bind(ct, w, **params),
    lambda ct, x, w, **params: _weight_gradient_p.bind(x, ct, **params),
)
ad.defbilinear(
    _input_gradient_p,
    lambda ct, dy, w, **params: _forward_p.bind(ct, w, **params),
    lambda ct, dy, w, **params: _weight_gradient_p.bind(ct, dy, **params),
)
ad.defbilinear(
    _weight_gradient_p,
    lambda ct, x, dy, **params: _input_gradient_p.bind(dy, ct, **params),
    lambda ct, x, dy, **params: _forward_p.bind(x, ct, **params),
)


def conv_chwn(x: Array, kernel: Array, *, fallback: bool = False) -> Array:
    """Valid stride-1 convolution, batch last, by the C++ kernels on CPU.

    Args:
      x: [in_channels, height, width, batch] float32.
      kernel: [kh, kw, in_channels, out_channels] float32 (HWIO).
      fallback: False: the kernels must be available now (else RuntimeError). True: decided
        when the program is lowered for CPU (the kernels are built then), and where they are
        unavailable the program runs their im2col twin, with a warning that says why.

    Returns:
      [out_channels, height - kh + 1, width - kw + 1, batch] float32; on CPU equal to
      `lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=("CHWN",
      "HWIO", "CHWN"))` up to float32 rounding (another order of summation).

    Raises:
      RuntimeError: the kernels are not available (`unavailable_reason()` says why) and
        `fallback` is False.
      ValueError: not float32, or shapes that disagree.
    """
    if not fallback and not available():
        raise RuntimeError(f"native conv kernels unavailable: {unavailable_reason()}")
    if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
        raise ValueError(
            f"native conv takes float32, got x {x.dtype} and kernel {kernel.dtype}. "
            "Fix: cast to float32, or use conv_impl='im2col'"
        )
    if x.ndim != 4 or kernel.ndim != 4:
        raise ValueError(f"native conv: x {x.shape} and kernel {kernel.shape} must be rank 4")
    return _forward_p.bind(x, kernel, fallback=bool(fallback))
