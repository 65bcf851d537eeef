"""`serving.predict` over the mesh and `serving.export` reloaded in a fresh process that
cannot import jaxnets."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from jaxnets import adapters, losses, serving, sharding, train


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.Dropout(0.5, deterministic=not train)(nn.relu(x))
        return nn.Dense(3)(x)


def _trained():
    objective = adapters.linen(Net(), loss=losses.softmax_cross_entropy)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(32, 5)).astype(np.float32),
        "label": rng.integers(0, 3, 32).astype(np.int32),
    }
    tx = optax.adam(1e-2)
    state = train.create_train_state(objective.init, tx, batch, key=jax.random.key(0))
    step = jax.jit(train.make_train_step(objective.loss_fn, tx))
    for _ in range(3):
        state, _ = step(state, batch)
    return objective, jax.device_get(state), rng.normal(size=(37, 5)).astype(np.float32)


def _reference(state, x):
    variables = {"params": state.params, **state.model_state}
    return np.asarray(Net().apply(variables, x, train=False))


def test_predict_equals_the_model_on_1_and_8_devices():
    objective, state, x = _trained()
    expected = _reference(state, x)
    for devices in (1, 8):
        got = serving.predict(objective, state, x, batch_size=16, mesh=sharding.make_mesh(devices))
        assert got.shape == (37, 3)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # a plain function and a (params, model_state) pair work the same
    apply = lambda p, ms, inputs: Net().apply({"params": p, **ms}, inputs, train=False)
    got = serving.predict(apply, (state.params, state.model_state), x)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


RELOAD = """
import sys
sys.modules["jaxnets"] = None  # importing jaxnets here fails: the export must not need it
sys.modules["flax"] = None
import numpy as np
from jax import export
forward = export.deserialize(open(sys.argv[1], "rb").read())
np.save(sys.argv[3], np.asarray(forward.call(np.load(sys.argv[2]))))
"""


def test_export_runs_in_a_fresh_process_without_jaxnets(tmp_path):
    objective, state, x = _trained()
    path = tmp_path / "model.jax"
    exported = serving.export(objective, state, x[:1], path=path)
    np.testing.assert_allclose(exported.call(x), _reference(state, x), atol=1e-5, rtol=0)
    np.save(tmp_path / "x.npy", x)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    out = subprocess.run(
        [sys.executable, "-c", RELOAD, str(path), str(tmp_path / "x.npy"), str(tmp_path / "y")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), _reference(state, x), atol=1e-5)
    # A fixed batch refuses other sizes.
    fixed = serving.export(objective, state, x[:4], polymorphic_batch=False)
    with pytest.raises(ValueError, match="shape"):
        fixed.call(x)


def test_a_model_that_needs_a_fixed_batch_says_so():
    def apply(params, model_state, x):
        if x.shape[0] < 2:  # a Python comparison of the batch size: no symbolic batch
            return x
        return x * params

    with pytest.raises(ValueError, match="polymorphic_batch=False"):
        serving.export(apply, (np.float32(2.0), {}), np.ones((3, 2), np.float32))
    fixed = serving.export(
        apply, (np.float32(2.0), {}), np.ones((3, 2), np.float32), polymorphic_batch=False
    )
    np.testing.assert_array_equal(fixed.call(np.ones((3, 2), np.float32)), 2.0)
