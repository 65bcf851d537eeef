"""The seed CNN experiment end to end: outputs, resume (clean stop and kill -9), bad configs."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import mnist_cnn
from jaxnets import writers

ROOT = Path(__file__).parent.parent
# Small and fast: 400 training digits (320 train / 80 val), batch 40 on 2 devices.
TINY = dataclasses.replace(
    mnist_cnn.get_config(),
    dataset="mnist_sample",
    limit_train=400,
    batch_size=40,
    epochs=2,
    devices=2,
    log_every_steps=4,
    # One step per call, not measured: a measured choice (1 or 8, whichever this machine and
    # its cache say) would leave the signal tests no step boundary to stop at mid-run.
    steps_per_dispatch=1,
    progress=False,
    checkpoint_every_minutes=0.0,
)


def _run(tmp_path, name, **overrides):
    return mnist_cnn.main(dataclasses.replace(TINY, workdir=str(tmp_path / name), **overrides))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("full"), "run")


@pytest.mark.compat
def test_outputs_and_summary(uninterrupted, tmp_path_factory):
    wd = Path(uninterrupted["config"]["workdir"])
    summary = json.loads((wd / "summary.json").read_text())
    assert summary["params_sha256"] == uninterrupted["params_sha256"]
    assert summary["dataset"] == {
        "name": "mnist_sample",
        "source": summary["dataset"]["source"],
        "train": 320,
        "validation": 80,
        "test": 1000,
    }
    assert summary["step"] == 16 and summary["epochs_completed"] == 2
    assert summary["devices"]["count"] == 2
    assert 0.3 < summary["test"]["accuracy"] <= 1.0  # 16 steps on 320 digits: over chance (0.1)
    records = writers.read_jsonl(wd / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == [4, 8, 12, 16]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]
    assert (wd / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((wd / "config.json").read_text())["learning_rate"] == 0.05
    assert any(p.name.startswith("events.out.tfevents") for p in (wd / "tb").iterdir())


@pytest.mark.compat
def test_resume_after_a_finished_epoch_is_bit_identical(uninterrupted, tmp_path):
    first = _run(tmp_path, "r", epochs=1)
    assert first["step"] == 8
    resumed = _run(tmp_path, "r")  # same command with more epochs continues
    assert resumed["params_sha256"] == uninterrupted["params_sha256"]
    steps = [(r["kind"], r["step"]) for r in writers.read_jsonl(tmp_path / "r/metrics.jsonl")]
    assert len(steps) == len(set(steps))  # no duplicated log lines


def test_changed_config_refuses_to_resume(tmp_path):
    _run(tmp_path, "c", epochs=1)
    before = sorted(os.listdir(tmp_path / "c/checkpoints"))
    with pytest.raises(ValueError, match=r"learning_rate: saved 0.05, current 0.1(.|\n)*--restart"):
        _run(tmp_path, "c", learning_rate=0.1)
    assert sorted(os.listdir(tmp_path / "c/checkpoints")) == before  # nothing lost
    fresh = _run(tmp_path, "c", learning_rate=0.1, restart=True, epochs=1)
    assert fresh["step"] == 8


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    _run(tmp_path, "n", epochs=1)
    # Resume from step 8 with an optimiser that diverges (the config itself is unchanged).
    monkeypatch.setattr(
        mnist_cnn.optim, "inverse_time_decay", lambda lr, decay: lambda count: 1e38 + 0.0 * count
    )
    with pytest.raises(FloatingPointError, match="non-finite training loss at step 10 "):
        _run(tmp_path, "n", epochs=2)
    steps = sorted(int(s) for s in os.listdir(tmp_path / "n/checkpoints") if s.isdigit())
    assert steps == [8]
    monkeypatch.undo()
    assert _run(tmp_path, "n", epochs=1)["step"] == 8  # the checkpoint still restores


def _subprocess_run(workdir: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "experiments.mnist_cnn", "--workdir", str(workdir)]
    fields = ("dataset", "limit_train", "batch_size", "devices", "log_every_steps")
    for field in (*fields, "steps_per_dispatch"):
        cmd += ["--" + field.replace("_", "-"), str(getattr(TINY, field))]
    cmd += ["--no-progress", "--checkpoint-every-minutes", "0", *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill_at,train_input",
    [("after_first_checkpoint", "auto"), ("mid_run", "auto"), ("after_first_checkpoint", "stream")],
)
def test_kill_9_then_resume_is_bit_identical(uninterrupted, tmp_path, kill_at, train_input):
    """kill -9 a run that checkpoints every 2 steps (async), rerun: same parameters.

    Streamed, the Grain iterator's position is restored from the checkpoint, and the
    parameters equal the uninterrupted resident run's bit for bit.
    """
    wd = tmp_path / "k"
    proc = _subprocess_run(
        wd, "--epochs", "2", "--checkpoint-every-steps", "2", "--input", train_input
    )
    ckdir = wd / "checkpoints"
    want = 1 if kill_at == "after_first_checkpoint" else 4
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if ckdir.exists() and sum(p.name.isdigit() for p in ckdir.iterdir()) >= want:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stdout.read()
    os.kill(proc.pid, signal.SIGKILL)
    out = proc.communicate()[0]
    streamed = "input (training data): streamed (Grain)" in out
    assert streamed == (train_input == "stream"), out[-2000:]
    resumed = _run(tmp_path, "k", input=train_input)
    assert resumed["params_sha256"] == uninterrupted["params_sha256"]
    steps = [(r["kind"], r["step"]) for r in writers.read_jsonl(wd / "metrics.jsonl")]
    assert len(steps) == len(set(steps))
    assert [s for k, s in steps if k == "train"] == [4, 8, 12, 16]


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_and_resumes_bit_identical(uninterrupted, tmp_path):
    """Preemption (Colab, TPU VMs): SIGTERM -> checkpoint at the next step boundary, exit 143."""
    wd = tmp_path / "t"
    proc = _subprocess_run(wd, "--epochs", "2")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (wd / "metrics.jsonl").exists() and (wd / "metrics.jsonl").read_text():
            break  # training has started (the first log point is written)
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before the signal: " + proc.stdout.read()
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]  # 143: stopped, not done
    summary = json.loads((wd / "summary.json").read_text())
    assert summary["stopped_early"] and 4 <= summary["step"] < 16
    saved = sorted(int(s) for s in os.listdir(wd / "checkpoints") if s.isdigit())
    assert saved[-1] == summary["step"]  # saved where it stopped, mid-epoch or not
    resumed = _run(tmp_path, "t")
    assert resumed["params_sha256"] == uninterrupted["params_sha256"]


@pytest.mark.slow
def test_resume_on_a_different_device_count(uninterrupted, tmp_path):
    """Saved on 2 devices, resumed on 1: same run to float rounding (not bit-exact)."""
    _run(tmp_path, "d", epochs=1, devices=2)
    resumed = _run(tmp_path, "d", devices=1)
    assert resumed["step"] == 16 and resumed["devices"]["count"] == 1
    assert resumed["test"]["loss"] == pytest.approx(uninterrupted["test"]["loss"], rel=1e-4)
    assert resumed["validation"]["loss"] == pytest.approx(
        uninterrupted["validation"]["loss"], rel=1e-4
    )


def test_augment_and_l1_flags(tmp_path):
    """--augment trains on transformed images (deterministically); --l1 gives exact zeros."""
    aug = _run(tmp_path, "a", epochs=1, augment=True, checkpoint=False)
    plain = _run(tmp_path, "p", epochs=1, checkpoint=False)
    assert aug["params_sha256"] != plain["params_sha256"]
    assert math.isfinite(aug["test"]["loss"]) and aug["step"] == 8
    assert all(v == 0.0 for v in plain["sparsity"].values())
    sparse = _run(tmp_path, "l", epochs=1, l1=0.05, checkpoint=False)
    kernels = {k: v for k, v in sparse["sparsity"].items() if k.endswith("kernel")}
    assert max(kernels.values()) > 0.2, kernels  # proximal L1: many weights exactly 0.0
    assert all(v == 0.0 for k, v in sparse["sparsity"].items() if k.endswith("bias"))


@pytest.mark.slow
def test_ema_and_microbatch_flags(uninterrupted, tmp_path):
    """--microbatches 2 on the seed CNN (no batch-dependent layers): the big-batch run's
    parameters; --ema-decay adds the average's test metrics."""
    acc = _run(tmp_path, "acc", microbatches=2, ema_decay=0.5, checkpoint=False)
    assert acc["step"] == uninterrupted["step"]
    assert acc["test"]["loss"] == pytest.approx(uninterrupted["test"]["loss"], rel=1e-4)
    assert math.isfinite(acc["test_ema"]["loss"])
    assert acc["test_ema"]["loss"] != pytest.approx(acc["test"]["loss"], rel=1e-4)


@pytest.mark.slow
def test_no_readable_checkpoint_is_one_message_not_asyncio_noise(tmp_path):
    """Every array file truncated: the CheckpointError is the last thing printed, alone."""
    _run(tmp_path, "x", epochs=1, checkpoint_every_steps=2)
    for data_file in (tmp_path / "x" / "checkpoints").glob("[0-9]*/state/**/d/*"):
        os.truncate(data_file, 100)
    proc = _subprocess_run(tmp_path / "x", "--epochs", "1")
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 1
    assert "Event loop is closed" not in out and "never retrieved" not in out, out[:3000]
    assert out.rstrip().endswith(
        "pass --restart (discards this run's checkpoints) or another --workdir <directory>."
    )
    assert "no readable checkpoint in" in out and "step 8: cannot read its arrays" in out


@pytest.mark.slow
def test_a_run_saved_before_a_field_existed_resumes_with_its_default(tmp_path, monkeypatch):
    """A checkpoint whose config lacks a newer field (dtype) used that field's default."""
    real = mnist_cnn.config_to_dict
    monkeypatch.setattr(
        mnist_cnn, "config_to_dict", lambda c: {k: v for k, v in real(c).items() if k != "dtype"}
    )
    assert _run(tmp_path, "old", epochs=1)["step"] == 8
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"dtype: saved 'float32', current 'bfloat16'"):
        _run(tmp_path, "old", dtype="bfloat16")
    assert _run(tmp_path, "old")["step"] == 16
