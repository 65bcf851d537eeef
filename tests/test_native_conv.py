"""The C++ batch-last convolutions (jaxnets.models.native_conv) against lax.conv and numpy."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export  # a submodule jax 0.7.2 does not import by itself

from jaxnets.models import native_conv

pytestmark = pytest.mark.skipif(
    not native_conv.available(), reason=f"native kernels: {native_conv.unavailable_reason()}"
)
DIMENSION_NUMBERS = ("CHWN", "HWIO", "CHWN")


def _lax_conv(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), "VALID", dimension_numbers=DIMENSION_NUMBERS, precision="highest"
    )


def _numpy_conv(x, w):
    """float64 valid cross-correlation, CHWN x HWIO -> CHWN."""
    kh, kw, _, _ = w.shape
    _, h, width, _ = x.shape
    ho, wo = h - kh + 1, width - kw + 1
    out = 0
    for i in range(kh):
        for j in range(kw):
            out = out + np.einsum("chwb,co->ohwb", x[:, i : i + ho, j : j + wo], w[i, j])
    return out


def _random(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# (C, H, W, B, K, O): the seed CNN's three layers with a 50-image group (the vector paths,
# rows whose length is no multiple of the vector chunk: its overlapping last chunk), output
# counts that leave remainders of the 8- and 4-output blocks, single images and short rows
# (the scalar path), a 1x1 kernel, a kernel as large as the image, a non-square image.
SHAPES = [
    (1, 28, 28, 50, 5, 4),
    (4, 24, 24, 50, 3, 8),
    (8, 11, 11, 50, 3, 16),
    (3, 9, 13, 17, 3, 13),
    (2, 10, 10, 40, 3, 7),
    (4, 8, 8, 1, 3, 5),
    (2, 6, 5, 3, 1, 3),
    (3, 5, 7, 20, 5, 2),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_both_gradients_match_lax_conv(shape):
    c, h, w, b, k, o = shape
    x, kernel = _random((c, h, w, b), 0), _random((k, k, c, o), 1)
    y = jax.jit(native_conv.conv_chwn)(x, kernel)
    np.testing.assert_allclose(
        y, _numpy_conv(np.float64(x), np.float64(kernel)), rtol=1e-5, atol=1e-4
    )
    cotangent = _random(y.shape, 2)
    grads = jax.jit(jax.vjp(native_conv.conv_chwn, x, kernel)[1])(cotangent)
    want = jax.vjp(_lax_conv, x, kernel)[1](cotangent)
    for got, ref in zip(grads, want):
        scale = float(jnp.abs(ref).max())
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * scale)


def test_vmap_over_either_operand_or_both_matches_a_loop():
    x, kernel = _random((3, 4, 9, 9, 20), 3), _random((3, 3, 3, 4, 6), 4)
    conv = native_conv.conv_chwn
    np.testing.assert_allclose(
        jax.jit(jax.vmap(conv))(x, kernel),
        np.stack([conv(x[n], kernel[n]) for n in range(3)]),
        rtol=1e-6,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        jax.vmap(conv, (0, None))(x, kernel[0]),
        np.stack([conv(x[n], kernel[0]) for n in range(3)]),
        rtol=1e-6,
        atol=1e-6,
    )
    # Along a non-leading axis of the kernel, nested in a second vmap.
    got = jax.vmap(jax.vmap(conv, (None, 3)), (0, None))(x[:2], kernel[0][..., None])
    assert got.shape == (2, 6, 1, 7, 7, 20)
    np.testing.assert_allclose(got[1, 4], conv(x[1], kernel[0, ..., 4:5]), rtol=1e-6, atol=1e-6)
    # Per-example gradients: vmap of grad.
    per_example = jax.vmap(
        jax.grad(lambda w, x: jnp.sum(jnp.tanh(conv(x[..., None], w)))), (None, 3)
    )(kernel[0], x[0])
    ref = jax.vmap(jax.grad(lambda w, x: jnp.sum(jnp.tanh(_lax_conv(x[..., None], w)))), (None, 3))(
        kernel[0], x[0]
    )
    np.testing.assert_allclose(per_example, ref, rtol=1e-4, atol=1e-4)


def test_second_order_derivatives_match_lax_conv():
    x, kernel = _random((4, 10, 10, 40), 5), _random((3, 3, 4, 8), 6) * 0.3
    tangents = (_random(x.shape, 7), _random(kernel.shape, 8))

    def second_orders(conv):
        grad = jax.grad(lambda x, w: jnp.sum(jnp.tanh(conv(x, w)) ** 2), (0, 1))
        forward_over_reverse = jax.jvp(grad, (x, kernel), tangents)[1]
        directional = lambda x, w: sum(jnp.vdot(g, t) for g, t in zip(grad(x, w), tangents))  # noqa: E731
        reverse_over_reverse = jax.grad(directional, (0, 1))(x, kernel)
        return (*forward_over_reverse, *reverse_over_reverse)

    for got, ref in zip(second_orders(native_conv.conv_chwn), second_orders(_lax_conv)):
        scale = float(jnp.abs(ref).max())
        assert scale > 1e-3
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * scale)


def test_kernels_run_concurrently_on_eight_devices_with_the_same_results():
    assert jax.device_count() == 8
    x, kernel = _random((8, 4, 24, 24, 50), 9), _random((3, 3, 4, 8), 10)
    grad = jax.grad(lambda x, w: jnp.sum(jnp.sin(native_conv.conv_chwn(x, w))), (0, 1))
    got = jax.pmap(grad, in_axes=(0, None))(x, kernel)
    for n in (0, 7):
        want = jax.jit(grad)(x[n], kernel)
        np.testing.assert_allclose(got[0][n], want[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got[1][n], want[1], rtol=1e-6, atol=1e-6)


def test_the_kernels_targets_name_their_build_so_a_changed_kernel_is_another_program(
    tmp_path, monkeypatch
):
    """The steps-per-call record is keyed on the program text: a kernel built from another
    source (or compiler, flags, CPU) must lower to another text, or the record measured with
    the old kernel's speed would be reused (it was: k=1 from a 6.5x slower build)."""
    x, kernel = _random((2, 8, 8, 4), 0), _random((3, 3, 2, 4), 1)
    key = native_conv._build_key()
    text = jax.jit(native_conv.conv_chwn).lower(x, kernel).as_text()
    assert f"@jaxnets_JaxnetsConvForward_{key[:8]}" in text
    changed = tmp_path / "native_conv.cc"
    changed.write_bytes(native_conv._SOURCE.read_bytes() + b"\n// another kernel\n")
    monkeypatch.setattr(native_conv, "_SOURCE", changed)
    native_conv._build_key.cache_clear()
    try:
        assert native_conv._build_key() != key
    finally:
        monkeypatch.undo()
        native_conv._build_key.cache_clear()
    assert native_conv._build_key() == key


def test_lowers_to_the_kernels_on_cpu_and_to_a_convolution_elsewhere():
    x, kernel = _random((2, 8, 8, 4), 0), _random((3, 3, 2, 4), 1)
    fn = jax.jit(jax.grad(lambda x, w: jnp.sum(native_conv.conv_chwn(x, w) ** 2), (0, 1)))
    cpu = fn.lower(x, kernel).as_text()
    for target in ("Forward", "InputGradient", "WeightGradient"):
        assert f"jaxnets_JaxnetsConv{target}" in cpu
    assert "stablehlo.convolution" not in cpu
    gpu = export.export(fn, platforms=["cuda"])(x, kernel).mlir_module()
    assert "jaxnets_" not in gpu and "stablehlo.convolution" in gpu


def test_bad_operands_get_a_clear_error():
    x, kernel = _random((2, 8, 8, 4), 0), _random((3, 3, 2, 4), 1)
    with pytest.raises(ValueError, match=r"float32.*bfloat16.*conv_impl='im2col'"):
        native_conv.conv_chwn(x.astype(jnp.bfloat16), kernel)
    with pytest.raises(ValueError, match=r"\(2, 8, 8, 4\) \(CHWN\) and kernel \(3, 3, 3, 4\)"):
        native_conv.conv_chwn(x, _random((3, 3, 3, 4), 1))
    with pytest.raises(ValueError, match="must be rank 4"):
        native_conv.conv_chwn(x[0], kernel)
    # The gradient primitives, bound directly, check their operands too (no kernel reads out
    # of bounds).
    with pytest.raises(ValueError, match=r"dy \(5, 6, 6, 4\) \(CHWN\) and kernel .* disagree"):
        native_conv._input_gradient_p.bind(_random((5, 6, 6, 4), 0), kernel, fallback=False)
    with pytest.raises(ValueError, match=r"x \(2, 8, 8, 4\) and dy \(4, 6, 6, 3\)"):
        native_conv._weight_gradient_p.bind(x, _random((4, 6, 6, 3), 0), fallback=False)


def test_build_errors_name_the_compiler_and_leave_no_partial_library(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXNETS_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler 'no-such-compiler-here'"):
        native_conv._build()
    failing = tmp_path / "failing-cxx"
    failing.write_text("#!/bin/sh\necho 'fatal: out of cheese' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CXX", str(failing))
    with pytest.raises(RuntimeError, match="out of cheese"):
        native_conv._build()
    assert list((tmp_path / "native").iterdir()) == []


def test_build_is_cached_per_source_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXNETS_CACHE_DIR", str(tmp_path))
    first = native_conv._build()
    stamp = first.stat().st_mtime_ns
    assert native_conv._build() == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "native").iterdir()] == [first.name]


def test_turned_off_by_environment_falls_back_and_says_why():
    code = (
        "import jax, jax.numpy as jnp\n"
        "from jaxnets.models import MnistCNN, native_conv\n"
        "print(native_conv.available(), native_conv.unavailable_reason())\n"
        "m = MnistCNN()\n"
        "p = m.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))\n"
        "print('custom_call' in jax.jit(m.apply).lower(p, jnp.zeros((2, 28, 28, 1))).as_text())\n"
        "try:\n"
        "    MnistCNN(conv_impl='native').apply(p, jnp.zeros((2, 28, 28, 1)))\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    env = dict(os.environ, JAXNETS_NATIVE_CONV="0")
    root = pathlib.Path(__file__).parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "False turned off by JAXNETS_NATIVE_CONV=0"
    assert lines[1] == "False"  # 'auto' lowered to the im2col twin: no kernel call
    assert "unavailable (turned off by JAXNETS_NATIVE_CONV=0)" in lines[2]
    assert "conv_impl='im2col'" in lines[2]


@pytest.mark.parametrize("impl", ["native", "im2col"])
def test_the_cnn_on_a_mesh_runs_its_kernels_per_device_with_the_one_device_gradients(impl):
    """Under the engine's mesh the seed CNN's per-device convolutions run inside shard_map
    (no device gathers the whole batch) and give the one-device gradients."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxnets import adapters, losses, programs, sharding
    from jaxnets.models import MnistCNN

    objective = adapters.linen(
        MnistCNN(conv_impl=impl),
        loss=lambda z, y: losses.softmax_cross_entropy(z, y, reduction="none"),
    )
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.uniform(size=(32, 28, 28, 1)).astype(np.float32),
        "label": rng.integers(0, 10, 32).astype(np.int32),
    }
    params, model_state = objective.init(jax.random.key(0), batch)

    def grads(p, b):
        return jax.grad(lambda p: objective.loss_fn(p, model_state, b, jax.random.key(1))[0])(p)

    got = {}
    for n in (1, 8):
        mesh = sharding.make_mesh(n)
        fn = jax.jit(programs.in_mesh(grads, mesh))
        b = jax.device_put(batch, NamedSharding(mesh, P(sharding.DATA)))
        p = jax.device_put(params, NamedSharding(mesh, P()))
        got[n] = jax.device_get(fn(p, b))
        if n == 8:
            hlo = fn.lower(p, b).compile().as_text()
            assert "all-gather" not in hlo  # each device convolves its own 4 examples
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(got[8])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
