"""The digits CNN end to end: learning, BatchNorm statistics, resume, 1 vs 8 devices."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from experiments import digits
from jaxnets import checkpoint as ckpt
from jaxnets import ema, train, writers

ROOT = Path(__file__).resolve().parents[1]

# 1,079 training digits, batch 64: 16 steps an epoch, on 2 devices.
TINY = dataclasses.replace(
    digits.get_config(),
    epochs=2,
    devices=2,
    steps_per_dispatch=1,  # a scanned chunk of this CNN takes seconds to compile on CPU
    log_every_steps=8,
    progress=False,
    checkpoint_every_minutes=0.0,
)


def _run(tmp_path, name, **overrides):
    return digits.main(dataclasses.replace(TINY, workdir=str(tmp_path / name), **overrides))


def _final_state(summary: dict) -> train.TrainState:
    """The last checkpoint of a run, restored into a freshly built state."""
    config = dataclasses.replace(TINY, **summary["config"])
    objective = digits.make_objective(config)
    sample = {"image": np.zeros((1, 8, 8, 1), np.float32), "label": np.zeros((1,), np.int32)}
    target = train.create_train_state(
        objective.init, digits.make_optimizer(config), sample, key=jax.random.key(0)
    )
    manager = ckpt.Checkpointer(Path(config.workdir) / "checkpoints", read_only=True)
    with manager:
        state, _, step = manager.restore(target)
    assert step == summary["step"]
    return state


def _test_loss(state: train.TrainState, model_state) -> tuple[float, float]:
    """(cross-entropy, accuracy) on the test split, in numpy, from the model applied once."""
    data = digits.load_data(validation_split=0.2, test_split=0.2, seed=TINY.seed)["test"]
    model = digits.DigitsCNN(TINY.dropout_rate, TINY.batch_norm_momentum)
    logits = np.asarray(
        model.apply({"params": state.params, **model_state}, data["image"], train=False),
        np.float64,
    )
    z = logits - logits.max(-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
    labels = data["label"]
    return -log_p[np.arange(len(labels)), labels].mean(), (logits.argmax(-1) == labels).mean()


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("full"), "run")


def test_learns_and_writes_its_outputs(full):
    wd = Path(full["config"]["workdir"])
    assert full["dataset"] == {
        "name": "sklearn_digits",
        "train": 1079,
        "validation": 359,
        "test": 359,
    }
    assert full["num_params"] == 38330  # 144 + 32 + 4608 + 64 + 32832 + 650
    assert full["step"] == 32 and full["epochs_completed"] == 2
    # Measured 0.889 (2 devices, seed 0); chance is 0.1.
    assert full["validation"]["accuracy"] > 0.75
    assert full["test"]["top3_accuracy"] >= full["test"]["accuracy"] > 0.75
    assert json.loads((wd / "summary.json").read_text())["test"] == full["test"]
    records = writers.read_jsonl(wd / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == [8, 16, 24, 32]
    assert all("top3_accuracy" in r for r in records)
    assert all("val_top3_accuracy" in r for r in records if r["kind"] == "epoch")
    assert (wd / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(p.name.startswith("events.out.tfevents") for p in (wd / "tb").iterdir())


def test_batch_norm_statistics_are_learned_and_used_in_evaluation(full):
    state = _final_state(full)
    stats = state.model_state["batch_stats"]
    assert sorted(stats) == ["BatchNorm_0", "BatchNorm_1"]
    for layer in stats.values():
        assert np.abs(np.asarray(layer["mean"])).max() > 1e-2  # init: zeros
        assert np.abs(np.asarray(layer["var"]) - 1).max() > 1e-2  # init: ones
    loss, accuracy = _test_loss(state, state.model_state)
    assert loss == pytest.approx(full["test"]["loss"], rel=1e-5)
    assert accuracy == pytest.approx(full["test"]["accuracy"], abs=1.5 / 359)
    init = {
        k: {"mean": np.zeros_like(v["mean"]), "var": np.ones_like(v["var"])}
        for k, v in stats.items()
    }
    untrained = {"batch_stats": init}
    assert abs(_test_loss(state, untrained)[0] - loss) > 1e-2


@pytest.mark.compat
def test_resume_after_an_epoch_is_bit_identical(full, tmp_path):
    assert _run(tmp_path, "r", epochs=1)["step"] == 16
    resumed = _run(tmp_path, "r")
    assert resumed["params_sha256"] == full["params_sha256"]
    steps = [(r["kind"], r["step"]) for r in writers.read_jsonl(tmp_path / "r/metrics.jsonl")]
    assert len(steps) == len(set(steps)) and ("epoch", 32) in steps


def test_a_finished_run_says_so(full, caplog):
    with caplog.at_level(logging.INFO, logger="jaxnets.runs.run"):
        again = digits.main(dataclasses.replace(TINY, workdir=full["config"]["workdir"]))
    assert "has already finished (step 32 of 32)" in caplog.text
    assert again["params_sha256"] == full["params_sha256"] and again["test"] == full["test"]


def test_the_command_line_says_the_status_lines_in_its_flags(full):
    """The library's status line names arguments (`epochs=`, `restart=True`); the experiment's
    command line says its flags, as its errors do."""
    wd = full["config"]["workdir"]
    flags = ["--workdir", wd, "--epochs", "2", "--devices", "2", "--steps-per-dispatch", "1"]
    flags += ["--log-every-steps", "8", "--no-progress", "--checkpoint-every-minutes", "0"]
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.digits", *flags],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = [line for line in proc.stderr.splitlines() if "has already finished" in line]
    assert said == [
        f"the run in {wd} has already finished (step 32 of 32); to train on, raise --epochs "
        "<more than it had>; to start over, --restart"
    ]


@pytest.mark.slow
def test_one_device_equals_eight_with_dropout_and_batchnorm(tmp_path):
    """The step is a function of the global batch: BatchNorm statistics and dropout masks
    are the global batch's, so the device count does not change the numbers."""
    one = _run(tmp_path, "one", devices=1, epochs=1)
    eight = _run(tmp_path, "eight", devices=8, epochs=1)
    a, b = _final_state(one), _final_state(eight)
    chex.assert_trees_all_close(a.params, b.params, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(a.model_state, b.model_state, atol=1e-5, rtol=1e-5)
    assert eight["test"]["loss"] == pytest.approx(one["test"]["loss"], rel=1e-5)
    assert eight["train"]["loss"] == pytest.approx(one["train"]["loss"], rel=1e-5)


@pytest.mark.slow
def test_ema_microbatches_and_warm_start(full, tmp_path, caplog):
    """--ema-decay, --microbatches and --warm-start together: the EMA's test metrics are
    those of the averaged parameters applied by hand."""
    with caplog.at_level(logging.WARNING, logger="jaxnets.runs.run"):
        out = _run(
            tmp_path,
            "ema",
            epochs=1,
            ema_decay=0.9,
            microbatches=2,
            warm_start=full["config"]["workdir"],
            warm_start_model_state=True,
        )
    assert "warm start from" in caplog.text
    state = _final_state(out)
    loss, accuracy = _test_loss(ema.swap(state), state.model_state)
    assert out["test_ema"]["loss"] == pytest.approx(loss, rel=1e-4)
    assert out["test_ema"]["accuracy"] == pytest.approx(accuracy)
    assert out["test_ema"]["loss"] != pytest.approx(out["test"]["loss"], rel=1e-3)
    assert out["step"] == 16  # step 0 after the warm start: one epoch of 16 steps
    epoch = [
        r for r in writers.read_jsonl(tmp_path / "ema" / "metrics.jsonl") if r["kind"] == "epoch"
    ]
    assert "val_ema_loss" in epoch[-1]
