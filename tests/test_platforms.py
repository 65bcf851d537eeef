"""Platform-dependent choices follow the target (lowering platform, plan's devices), not the
process: lowered for cpu, cuda and tpu from this CPU machine, and exported for all three."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import export  # a submodule jax 0.7.2 does not import by itself

from jaxnets import adapters, dispatch, loop, losses, train
from jaxnets import metrics as jmetrics
from jaxnets.models import MnistCNN, ValidConv, cnn, native_conv

PLATFORMS = ("cpu", "cuda", "tpu")
KERNELS = ("JaxnetsConvForward", "JaxnetsConvInputGradient", "JaxnetsConvWeightGradient")


def test_choices_per_platform_and_dtype():
    choices = cnn.platform_choices
    assert choices(platform="cpu") == ("native", 2)
    assert choices(platform="cpu", dtype=jnp.bfloat16) == ("im2col", 2)
    for accelerator in ("cuda", "rocm", "tpu"):
        assert choices(platform=accelerator) == ("xla", 1)
        assert choices(platform=accelerator, dtype=jnp.bfloat16) == ("xla", 1)
        assert choices("im2col", platform=accelerator) == ("im2col", 1)
    assert choices("xla", platform="cpu") == ("xla", 1)
    assert choices("native", 3, platform="tpu") == ("native", 3)
    with pytest.raises(ValueError, match="conv_impl='fft'"):
        choices("fft", platform="cpu")


def _model_and_params():
    model = MnistCNN()
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
    return model, params


def _lowered(fn, *args, platform):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("platform", PLATFORMS)
def test_forward_lowered_per_platform_takes_that_platforms_choices(platform):
    model, params = _model_and_params()
    text = _lowered(model.apply, {"params": params}, jnp.zeros((4, 28, 28, 1)), platform=platform)
    if platform == "cpu":
        # native kernels, 3 convolutions in each of 2 batch groups, no lax.conv
        assert text.count("@jaxnets_JaxnetsConvForward") == 3 * 2
        assert "stablehlo.convolution" not in text
    else:
        # lax.conv (cuDNN / TPU convolutions) once per layer: one batch group, no custom call
        assert text.count("stablehlo.convolution") == 3
        assert "stablehlo.custom_call" not in text


def _default_train_step():
    """The train step of experiments/mnist_cnn.py's defaults, on one device."""
    objective = adapters.linen(
        MnistCNN(),
        loss=lambda logits, y: losses.softmax_cross_entropy(logits, y, reduction="none"),
        metrics={"accuracy": jmetrics.accuracy},
    )
    tx = optax.sgd(0.05, momentum=0.9, nesterov=True)
    batch = {"image": jnp.zeros((8, 28, 28, 1)), "label": jnp.zeros((8,), jnp.int32)}
    state = train.create_train_state(objective.init, tx, batch, key=jax.random.key(0))
    return train.make_train_step(objective.loss_fn, tx), state, batch


@pytest.mark.parametrize("platform", PLATFORMS)
def test_default_training_step_lowered_per_platform(platform):
    step, state, batch = _default_train_step()
    text = _lowered(step, state, batch, platform=platform)
    if platform == "cpu":
        for kernel in KERNELS:
            assert f"@jaxnets_{kernel}" in text
    else:
        assert "stablehlo.custom_call" not in text  # no CPU-only kernel off CPU
        assert "stablehlo.convolution" in text


@pytest.mark.slow
def test_export_for_cpu_tpu_cuda_has_no_custom_call_and_runs_the_same_function():
    step, state, batch = _default_train_step()
    batch = {
        "image": jax.random.uniform(jax.random.key(1), (8, 28, 28, 1)),
        "label": jnp.arange(8) % 10,
    }
    exported = export.export(jax.jit(step), platforms=["cpu", "tpu", "cuda"])(state, batch)
    assert exported.platforms == ("cpu", "tpu", "cuda")
    assert (
        "stablehlo.custom_call" not in exported.mlir_module()
    )  # the kernels exported as their twin
    got, want = exported.call(state, batch), jax.jit(step)(state, batch)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        if jnp.issubdtype(a.dtype, jnp.floating):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_valid_conv_auto_takes_the_lowering_platforms_convolution():
    conv = ValidConv(4, 3, impl="auto", layout="CHWN")
    x = jnp.ones((2, 8, 8, 5))
    variables = conv.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, variables["params"]) == {"bias": (4,), "kernel": (3, 3, 2, 4)}
    cpu = _lowered(conv.apply, variables, x, platform="cpu")
    tpu = _lowered(conv.apply, variables, x, platform="tpu")
    assert "@jaxnets_JaxnetsConvForward" in cpu and "stablehlo.convolution" not in cpu
    assert "stablehlo.custom_call" not in tpu and "stablehlo.convolution" in tpu


def test_cpu_lowering_without_the_kernels_runs_their_im2col_twin(monkeypatch):
    model, params = _model_and_params()
    images = jax.random.uniform(jax.random.key(2), (4, 28, 28, 1))
    want = jax.jit(MnistCNN(conv_impl="im2col").apply)({"params": params}, images)
    monkeypatch.setattr(native_conv, "available", lambda: False)
    monkeypatch.setattr(native_conv, "unavailable_reason", lambda: "no C++ compiler 'g++'")
    monkeypatch.setattr(native_conv, "unavailable_fix", lambda: native_conv.FIX_COMPILER)
    native_conv._warn_fallback.cache_clear()
    with pytest.warns(RuntimeWarning, match=r"no C\+\+ compiler 'g\+\+'.*install g\+\+"):
        text = _lowered(model.apply, {"params": params}, images, platform="cpu")
    assert "stablehlo.custom_call" not in text
    with pytest.warns(RuntimeWarning):
        native_conv._warn_fallback.cache_clear()
        got = jax.jit(model.apply)({"params": params}, images)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match=r"no C\+\+ compiler 'g\+\+'.*conv_impl='im2col'"):
        MnistCNN(conv_impl="native").apply({"params": params}, images)


def test_scan_candidates_come_from_the_plans_devices():
    tpu, cpu = types.SimpleNamespace(platform="tpu"), types.SimpleNamespace(platform="cpu")
    assert dispatch.scan_candidates([tpu] * 8) == 50
    assert dispatch.scan_candidates([types.SimpleNamespace(platform="cuda")]) == 50
    assert dispatch.scan_candidates([cpu]) == 10
    assert dispatch.scan_candidates(jax.devices()) == 10
    # chunks of 50 are never cut by the log cadence: a 600-step epoch is 12 calls of 50
    assert loop.chunk_plan(0, 600, 50) == [50] * 12
