"""The diabetes regression end to end: metrics against numpy, R^2 as sums, resume, restart."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import diabetes
from jaxnets import checkpoint as ckpt
from jaxnets import metrics as jmetrics
from jaxnets import train, writers

# 266 training examples, batch 32: 8 steps an epoch, on 2 devices.
TINY = dataclasses.replace(
    diabetes.get_config(),
    epochs=4,
    devices=2,
    steps_per_dispatch=1,
    log_every_steps=4,
    progress=False,
    checkpoint_every_minutes=0.0,
)


def _run(tmp_path, name, **overrides):
    return diabetes.main(dataclasses.replace(TINY, workdir=str(tmp_path / name), **overrides))


def _predictions(summary: dict) -> dict[str, np.ndarray]:
    """The final checkpoint's predictions `[n, 1]` on every split, from one model apply."""
    config = TINY
    objective = diabetes.make_objective(config)
    data, _ = diabetes.load_data(validation_split=0.2, test_split=0.2, seed=config.seed)
    sample = jax.tree.map(lambda v: v[:1], data["train"])
    target = train.create_train_state(
        objective.init, diabetes.make_optimizer(config), sample, key=jax.random.key(0)
    )
    with ckpt.Checkpointer(Path(summary["config"]["workdir"]) / "checkpoints", read_only=True) as m:
        state, _, step = m.restore(target)
    assert step == summary["step"]
    model = diabetes.MLP(tuple(config.hidden_sizes))
    return {
        name: np.asarray(model.apply({"params": state.params}, split["x"]), np.float64)
        for name, split in data.items()
    }


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("full"), "run")


@pytest.fixture(scope="module")
def splits():
    return diabetes.load_data(validation_split=0.2, test_split=0.2, seed=TINY.seed)


def test_r_squared_by_hand():
    y = jnp.array([[1.0], [2.0], [3.0], [10.0]])
    p = jnp.array([[1.0], [2.0], [4.0], [0.0]])
    mask = jnp.array([True, True, True, False])
    r2 = diabetes.RSquared.from_predictions(p, y, mask)
    assert float(r2.compute()) == pytest.approx(1 - 1 / 2)  # SS_res 1, SS_tot 2
    halves = jmetrics.merge(
        diabetes.RSquared.from_predictions(p[:2], y[:2], mask[:2]),
        diabetes.RSquared.from_predictions(p[2:], y[2:], mask[2:]),
    )
    assert float(halves.compute()) == pytest.approx(0.5)  # sums merge, R^2 does not average
    assert float(diabetes.RSquared.from_predictions(p[:2], y[:2]).compute()) == 1.0
    with pytest.raises(ValueError, match=r"targets \[batch, 1\]"):
        diabetes.RSquared.from_predictions(p, y[:, 0])


def test_data_is_standardised_with_training_statistics(splits):
    data, target = splits
    assert {k: v["y"].shape for k, v in data.items()} == {
        "train": (266, 1),
        "validation": (88, 1),
        "test": (88, 1),
    }
    assert data["train"]["x"].dtype == data["train"]["y"].dtype == np.float32
    np.testing.assert_allclose(data["train"]["x"].mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(data["train"]["y"].std(0), 1, atol=1e-6)
    assert 140 < target.mean[0] < 165 and 70 < target.std[0] < 85  # the target's units


def test_logged_metrics_equal_numpy_on_the_final_model(full, splits):
    data, target = splits
    pred = _predictions(full)
    wd = Path(full["config"]["workdir"])
    last = [r for r in writers.read_jsonl(wd / "metrics.jsonl") if r["kind"] == "epoch"][-1]
    err = pred["validation"] - data["validation"]["y"]
    assert last["val_mse"] == pytest.approx(np.mean(err**2), rel=1e-5)
    assert last["val_loss"] == pytest.approx(np.mean(err**2), rel=1e-5)
    assert last["val_mae"] == pytest.approx(np.mean(np.abs(err)), rel=1e-5)
    y, p = data["test"]["y"], pred["test"]
    r2 = 1 - np.sum((y - p) ** 2) / np.sum((y - y.mean()) ** 2)
    assert full["test"]["r2"] == pytest.approx(r2, abs=1e-5)
    assert 0.3 < r2 < 1  # measured 0.46 after 4 epochs (2 devices)
    # In the target's own units, against the raw scikit-learn targets.
    from sklearn import datasets

    raw = datasets.load_diabetes().target
    raw_test = raw[np.random.default_rng(TINY.seed).permutation(len(raw))[:88]][:, None]
    raw_pred = target.invert(p)
    units = full["test_original_units"]
    assert units["mse"] == pytest.approx(np.mean((raw_pred - raw_test) ** 2), rel=1e-5)
    assert units["mae"] == pytest.approx(np.mean(np.abs(raw_pred - raw_test)), rel=1e-5)
    assert units["r2"] == pytest.approx(r2, abs=1e-5)


def test_summary_and_log_hold_the_custom_metric(full):
    wd = Path(full["config"]["workdir"])
    summary = json.loads((wd / "summary.json").read_text())
    assert set(summary["test"]) == {"loss", "mae", "mse", "r2"}
    assert set(summary["validation"]) == {"loss", "mae", "mse", "r2"}
    assert summary["num_params"] == 10 * 32 + 32 + 32 + 1
    records = writers.read_jsonl(wd / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(4, 33, 4))
    assert all(np.isfinite(r["r2"]) for r in records)
    assert (wd / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_is_bit_identical_and_restart_starts_over(full, tmp_path):
    assert _run(tmp_path, "r", epochs=2)["step"] == 16
    resumed = _run(tmp_path, "r")
    assert resumed["params_sha256"] == full["params_sha256"]
    steps = [(r["kind"], r["step"]) for r in writers.read_jsonl(tmp_path / "r/metrics.jsonl")]
    assert len(steps) == len(set(steps)) and ("epoch", 32) in steps
    with pytest.raises(
        ValueError, match=r"learning_rate: saved 0.005, current 0.01(.|\n)*--restart"
    ):
        _run(tmp_path, "r", learning_rate=0.01)
    with pytest.raises(ValueError, match=r"hidden_sizes: saved \[32\], current \[16\]"):
        _run(tmp_path, "r", hidden_sizes=(16,))  # a different layout: the field is named
    fresh = _run(tmp_path, "r", epochs=1, restart=True)
    assert fresh["step"] == 8 and fresh["params_sha256"] != full["params_sha256"]
    records = writers.read_jsonl(tmp_path / "r/metrics.jsonl")
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1]
    assert sorted(
        int(p.name) for p in (tmp_path / "r/checkpoints").iterdir() if p.name.isdigit()
    ) == [8]
