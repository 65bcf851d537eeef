"""What jaxnets refuses, and faults it survives: every case a clear error naming the fix."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from jaxnets import adapters, loop, losses, parallel, run, train, writers
from jaxnets import metrics as jmetrics
from jaxnets.lock import WorkdirLock

ROOT = Path(__file__).parent.parent
_HOLD = (
    "import sys, time\n"
    "from jaxnets.lock import WorkdirLock\n"
    "lock = WorkdirLock(sys.argv[1])\n"
    "print('locked', flush=True)\n"
    "time.sleep(120)\n"
)


def _tiny(n=48, classes=3):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (np.arange(n) % classes).astype(np.int32)
    return {"image": x, "label": y}


def _tiny_run(workdir, *, epochs=2, data=None, **flags):
    """A 3-class Dense model trained through `run.open_run` + `loop.fit` (6 steps per epoch)."""
    data = _tiny() if data is None else data
    objective = adapters.linen(
        nn.Dense(3),
        loss=lambda logits, y: losses.softmax_cross_entropy(logits, y, reduction="none"),
        metrics={"accuracy": jmetrics.accuracy},
    )
    tx = optax.sgd(0.1)
    dp = parallel.make_data_parallel(devices=1)
    state = train.create_train_state(objective.init, tx, data, key=jax.random.key(0))
    flags = run.RunConfig(
        workdir=str(workdir),
        progress=False,
        checkpoint_every_minutes=0.0,
        steps_per_dispatch=1,
        **flags,
    )
    steps_per_epoch = len(data["label"]) // 8
    with run.open_run(
        flags,
        {"epochs": epochs},
        state,
        dp,
        result_fields=(),
        total_steps=epochs * steps_per_epoch,
    ) as work:
        result = loop.fit(
            work.state,
            train.make_train_step(objective.loss_fn, tx),
            dp,
            data,
            data_key=jax.random.key(1),
            epochs=epochs,
            batch_size=8,
            **work.fit_options(epochs=epochs),
        )
    return result


def _hold_lock(path):
    """A real second process holding `path`'s lock; returns it once it holds it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(path)], env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


class TestOneRunPerWorkdir:
    def test_second_process_is_refused_at_once_naming_the_owner(self, tmp_path):
        owner = _hold_lock(tmp_path / "wd")
        try:
            t0 = time.monotonic()
            with pytest.raises(BlockingIOError) as e:
                WorkdirLock(tmp_path / "wd")
            assert time.monotonic() - t0 < 1.0  # refused, not waiting
            assert f"in use by another run (pid {owner.pid}" in str(e.value)
            assert f"kill {owner.pid}" in str(e.value) and "another --workdir" in str(e.value)
        finally:
            owner.kill()
            owner.wait()

    def test_open_run_is_refused_while_another_process_runs(self, tmp_path):
        owner = _hold_lock(tmp_path / "wd")
        try:
            with pytest.raises(BlockingIOError, match=f"pid {owner.pid}"):
                _tiny_run(tmp_path / "wd")
            assert not (tmp_path / "wd" / "checkpoints").exists()  # nothing touched
        finally:
            owner.kill()
            owner.wait()

    def test_a_kill_9ed_owner_does_not_block_the_next_run(self, tmp_path):
        owner = _hold_lock(tmp_path / "wd")
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        result = _tiny_run(tmp_path / "wd", epochs=1)
        assert int(result.state.step) == 6
        with WorkdirLock(tmp_path / "wd"):  # released when the run closed
            pass

    def test_one_process_may_claim_its_own_directory_twice(self, tmp_path):
        from jaxnets.lock import claim_workdir

        first = claim_workdir(tmp_path / "wd")
        assert claim_workdir(tmp_path / "wd") is first
        first.release()
        second = claim_workdir(tmp_path / "wd")
        assert second is not first
        second.release()


class TestResumeInTensorBoard:
    """Read with TensorBoard's own EventAccumulator: a resumed run keeps every step."""

    @staticmethod
    def _scalars(tb_dir):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(tb_dir))
        acc.Reload()
        return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

    def test_resumed_and_finished_runs_keep_the_checkpoint_steps_scalars(self, tmp_path):
        wd = tmp_path / "wd"
        _tiny_run(wd, epochs=1, log_every_steps=3)
        first = self._scalars(wd / "tb")
        assert first["epoch/loss"] == [6] and first["train/loss"] == [3, 6]
        files = sorted((wd / "tb").iterdir())
        _tiny_run(wd, epochs=1, log_every_steps=3)  # a second `make run`: already finished
        assert sorted((wd / "tb").iterdir()) == files  # no writer opened
        assert self._scalars(wd / "tb") == first
        _tiny_run(wd, epochs=2, log_every_steps=3)  # resumed from step 6
        scalars = self._scalars(wd / "tb")
        assert scalars["epoch/loss"] == [6, 12]
        assert scalars["train/loss"] == [3, 6, 9, 12]
        assert scalars["epoch/accuracy"] == [6, 12]

    def test_an_interrupted_runs_later_events_are_dropped(self, tmp_path):
        wd = tmp_path / "wd"
        _tiny_run(wd, epochs=1, log_every_steps=3)
        stale = writers.TensorBoardWriter(wd / "tb")  # what a run killed after step 6 logged
        stale.write({"kind": "train", "step": 9, "loss": 123.0})
        stale.close()
        _tiny_run(wd, epochs=2, log_every_steps=3)
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(wd / "tb"))
        acc.Reload()
        loss = {e.step: e.value for e in acc.Scalars("train/loss")}
        assert sorted(loss) == [3, 6, 9, 12] and loss[9] != 123.0
