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
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnets import adapters, cli, hooks, loop, losses, run, sharding, train, writers
from jaxnets import metrics as jmetrics
from jaxnets.runs.lock import WorkdirLock

ROOT = Path(__file__).parent.parent
_HOLD = (
    "import sys, time\n"
    "from jaxnets.runs.lock import WorkdirLock\n"
    "lock = WorkdirLock(sys.argv[1])\n"
    "print('locked', flush=True)\n"
    "time.sleep(120)\n"
)


def _tiny(n=48, classes=3):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (np.arange(n) % classes).astype(np.int32)
    return {"image": x, "label": y}


class _SignalOnce(hooks.Hook):
    """Sends `signum` to this process after the first chunk (a real signal while training)."""

    every_steps = 1

    def __init__(self, signum):
        self.signum, self.sent = signum, False

    def __call__(self, ctx):
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


def _tiny_run(workdir, *, epochs=2, data=None, signum=None, summaries=None, **flags):
    """A 3-class Dense model trained through `run.open_run` + `loop.fit` (6 steps per epoch).

    `signum`: sent to this process after the first chunk (a real signal while training);
    `summaries`: a list that gets the run's summary.
    """
    data = _tiny() if data is None else data
    objective = adapters.linen(
        nn.Dense(3),
        loss=lambda logits, y: losses.softmax_cross_entropy(logits, y, reduction="none"),
        metrics={"accuracy": jmetrics.accuracy},
    )
    tx = optax.sgd(0.1)
    example = data.read(np.arange(2)) if hasattr(data, "read") else data  # a Stream's rows
    state = train.create_train_state(objective.init, tx, example, key=jax.random.key(0))
    defaults = {"progress": False, "checkpoint_every_minutes": 0.0, "steps_per_dispatch": 1}
    flags = run.RunConfig(workdir=str(workdir), **(defaults | flags))
    steps_per_epoch = len(data if hasattr(data, "read") else data["label"]) // 8
    with run.open_run(
        flags,
        {"epochs": epochs},
        state,
        sharding.make_mesh(1),
        result_fields=(),
        total_steps=epochs * steps_per_epoch,
    ) as work:
        result = work.fit(
            train.make_train_step(objective.loss_fn, tx),
            data,
            data_key=jax.random.key(1),
            epochs=epochs,
            batch_size=8,
            hooks=[] if signum is None else [_SignalOnce(signum)],
        )
        if summaries is not None:
            summaries.append(work.summarise(result, steps_per_epoch=6, batch_size=8))
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
            assert f"kill {owner.pid}" in str(e.value) and "another workdir=<directory>" in str(
                e.value
            )
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
        from jaxnets.runs.lock import claim_workdir

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
        pytest.importorskip("tensorboard", reason="reading events needs the tensorboard extra")
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
        pytest.importorskip("tensorboard", reason="reading events needs the tensorboard extra")
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(wd / "tb"))
        acc.Reload()
        loss = {e.step: e.value for e in acc.Scalars("train/loss")}
        assert sorted(loss) == [3, 6, 9, 12] and loss[9] != 123.0


class TestFlagsAndArguments:
    """Every config field and API argument checked before work, naming the flag / argument."""

    @pytest.mark.parametrize(
        ("field", "value", "message"),
        [
            ("batch_size", 0, "--batch-size 0: must be an int >= 1"),
            ("batch_size", -100, "--batch-size -100: must be an int >= 1"),
            ("batch_size", 2.5, "--batch-size 2.5: must be an int"),
            ("log_every_steps", 0, "--log-every-steps 0: must be an int >= 1"),
            ("epochs", 0, "--epochs 0: must be an int >= 1"),
            ("epochs", -3, "--epochs -3: must be an int >= 1"),
            ("checkpoint_every_steps", -1, "--checkpoint-every-steps -1: must be an int >= 0"),
            ("checkpoint_every_minutes", -1.0, "--checkpoint-every-minutes -1.0: must be a finite"),
            ("learning_rate", 0.0, "--learning-rate 0.0: must be a finite number > 0"),
            ("learning_rate", float("nan"), "--learning-rate nan: must be a finite number > 0"),
            ("momentum", 1.0, "--momentum 1.0: must be a finite number in [0, 1)"),
            ("validation_split", 1.5, "--validation-split 1.5: must be a finite number in [0, 1)"),
            ("keep_checkpoints", 0, "--keep-checkpoints 0: must be an int >= 1"),
            ("devices", 0, "--devices 0: must be an int >= 1 (or none)"),
            ("sharding", "zero3", "--sharding zero3: must be one of 'replicated', 'fsdp'"),
            ("limit_train", 0, "--limit-train 0: must be an int >= 1 (or none)"),
            ("nesterov", 1, "--nesterov 1: must be a bool"),
        ],
    )
    def test_mnist_cnn_config(self, field, value, message):
        import dataclasses

        from experiments import mnist_cnn

        with pytest.raises(ValueError) as e:
            dataclasses.replace(mnist_cnn.get_config(), **{field: value})
        assert str(e.value).startswith(message)

    def test_every_experiments_defaults_pass_and_a_bad_field_is_named(self):
        import dataclasses

        from experiments import diabetes, digits, l1_sparsity, sweep, two_layer_sigmoid

        cases = [
            (diabetes, {"hidden_sizes": (32, 0)}, "--hidden-sizes 32,0: must be an int >= 1"),
            (digits, {"dropout_rate": 1.0}, "--dropout-rate 1.0: must be a finite number in"),
            (l1_sparsity, {"steps": 0}, "--steps 0: must be an int >= 1"),
            (sweep, {"vectorize": "pmap"}, "--vectorize pmap: must be one of 'auto', 'vmap'"),
            (sweep, {"model": "resnet"}, "--model resnet: must be one of 'two_layer'"),
            (two_layer_sigmoid, {"threshold": 0.0}, "--threshold 0.0: must be a finite number"),
        ]
        for module, change, message in cases:
            config = module.get_config()  # the defaults are valid
            with pytest.raises(
                ValueError, match="^" + message.replace("(", r"\(").replace("[", r"\[")
            ):
                dataclasses.replace(config, **change)

    def test_several_bad_flags_are_named_together_and_the_cli_exits_2(self, capsys):
        from experiments import mnist_cnn
        from jaxnets.runs.config import parse_config

        with pytest.raises(SystemExit) as e:
            parse_config(mnist_cnn.get_config(), ["--batch-size", "0", "--epochs", "-1"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "--epochs -1: must be an int >= 1; --batch-size 0: must be an int >= 1" in err

    @pytest.mark.parametrize(
        ("change", "error", "message"),
        [
            ({"batch_size": 0}, ValueError, "batch_size=0: must be an int >= 1"),
            ({"batch_size": 8.0}, ValueError, "batch_size=8.0: must be an int >= 1"),
            ({"epochs": 0}, ValueError, "epochs=0: must be an int >= 1"),
            ({"steps_per_call": 0}, ValueError, "steps_per_call=0: must be an int >= 1"),
            ({"input": "disk"}, ValueError, "input='disk'; use one of"),
            ({"data_key": 1}, TypeError, "data_key must be a PRNG key, e.g. data_key=jax.random"),
        ],
    )
    def test_fit_arguments_are_named_without_flags(self, change, error, message):
        data = _tiny()
        objective = adapters.linen(
            nn.Dense(3),
            loss=lambda logits, y: losses.softmax_cross_entropy(logits, y, reduction="none"),
        )
        tx = optax.sgd(0.1)
        state = train.create_train_state(objective.init, tx, data, key=jax.random.key(0))
        args = {"data_key": jax.random.key(1), "epochs": 1, "batch_size": 8, **change}
        with pytest.raises(error) as e:
            loop.fit(
                state,
                train.make_train_step(objective.loss_fn, tx),
                data,
                **args,
            )
        assert str(e.value).startswith(message)
        assert "--" not in str(e.value)  # a library user has no flags

    def test_make_mesh_and_sweep_arguments(self):
        from jaxnets import sweep

        for devices, error, message in [
            (0, ValueError, "devices=0 asked for, but 8 cpu device(s) are available; use 1..8"),
            (2.0, TypeError, "devices=2.0: must be an int"),
            (True, TypeError, "devices=True: must be an int"),
            ("all", TypeError, "devices='all': must be an int"),
            ([0, 1], TypeError, "devices=[0, 1]: a non-empty sequence of jax devices"),
        ]:
            with pytest.raises(error) as e:
                sharding.make_mesh(devices=devices)
            assert str(e.value).startswith(message) and "--" not in str(e.value)
        objective = adapters.linen(
            nn.Dense(3),
            loss=lambda logits, y: losses.softmax_cross_entropy(logits, y, reduction="none"),
        )
        tx = sweep.make_sweep_tx(sweep.DEFAULTS)
        for change, message in [
            ({"epochs": 0}, "epochs=0: must be an int >= 1"),
            ({"batch_size": -8}, "batch_size=-8: must be an int >= 1"),
            ({"log_every_steps": 0}, "log_every_steps=0: must be an int >= 1"),
        ]:
            args = {"epochs": 1, "batch_size": 8, **change}
            with pytest.raises(ValueError, match="^" + message):
                sweep.fit_sweep(objective, tx, [{"seed": 0}], _tiny(), **args)


class TestModesDoWhatTheySay:
    def _fit(self, tx, mode):
        data = _tiny()
        objective = adapters.linen(  # every step's loss and gradient are NaN: sqrt(< 0)
            nn.Dense(3), loss=lambda logits, y: jnp.sqrt(logits[:, 0] - 1e6)
        )
        state = train.create_train_state(objective.init, tx, data, key=jax.random.key(0))
        return loop.fit(
            state,
            train.make_train_step(objective.loss_fn, tx),
            data,
            data_key=jax.random.key(1),
            epochs=1,
            batch_size=8,
            hooks=[hooks.NonFinite(mode)],
            mesh=sharding.make_mesh(1),
            steps_per_call=1,
        )

    def test_warn_without_skipping_updates_raises(self, caplog):
        with pytest.raises(FloatingPointError) as e:
            self._fit(optax.sgd(0.1), "warn")
        assert str(e.value).startswith(
            "NonFinite('warn') goes on past a non-finite loss (between steps 1 and 1)"
        )
        assert "optax.apply_if_finite" in str(e.value)

    def test_warn_with_apply_if_finite_keeps_finite_params(self, caplog):
        result = self._fit(optax.apply_if_finite(optax.sgd(0.1), 100), "warn")
        leaves = jax.tree.leaves(result.state.params)
        assert all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
        assert "non-finite training loss at step 1 (of steps 1..1)" in caplog.text

    def test_raise_names_the_api_fix_not_a_flag(self):
        with pytest.raises(FloatingPointError) as e:
            self._fit(optax.sgd(0.1), "raise")
        assert "non-finite training loss at step 1 (of steps 1..1)" in str(e.value)
        assert "--" not in str(e.value) and "optax.apply_if_finite" in str(e.value)

    def test_l1_proximal_not_last_is_refused(self):
        from jaxnets import optim, regularizers

        params = {"Dense_0": {"kernel": np.ones((2, 2), np.float32)}}
        bad = [
            (optax.chain(regularizers.l1_proximal(0.1, 0.1), optax.sgd(0.1, momentum=0.9)), 2),
            (optax.chain(regularizers.l1_proximal(0.1, 0.1), optax.scale(-0.1)), 1),
            (
                optax.apply_if_finite(
                    optax.chain(regularizers.l1_proximal(0.1, 0.1), optax.sgd(0.1)), 3
                ),
                2,
            ),
        ]
        for tx, n in bad:
            with pytest.raises(ValueError) as e:
                train.create_train_state(params, tx, key=jax.random.key(0))
            assert str(e.value).startswith(f"l1_proximal is followed by {n} transform(s)")
        good = [
            optax.chain(optax.sgd(0.1), regularizers.l1_proximal(0.1, 0.1)),
            optim.sgd(optim.inverse_time_decay(0.1, 1e-6), momentum=0.9, l1=0.1, weight_decay=0.1),
            optax.apply_if_finite(optim.sgd(0.1, l1=0.1), 10),
        ]
        for tx in good:
            state = train.create_train_state(params, tx, key=jax.random.key(0))
            grads = jax.tree.map(np.ones_like, params)
            _, after = jax.jit(tx.update)(grads, state.opt_state, params)
            # The marker state keeps its type through an update (a scan carry must).
            assert jax.tree.structure(after) == jax.tree.structure(state.opt_state)


class TestLabelsAndInputs:
    def test_labels_outside_the_classes(self):
        from jaxnets.data import check_labels

        with pytest.raises(ValueError) as e:
            check_labels(np.array([0, 1, 10, 3]), 10, what="training labels")
        assert str(e.value).startswith(
            "training labels: label 10 outside [0, 10) (1 of 4 labels; they span [0, 10])"
        )
        with pytest.raises(ValueError, match=r"label -1 outside \[0, 3\)"):
            check_labels(np.array([-1, 0, 2]), 3)
        check_labels(np.array([0, 2, 1]), 3)

    def test_float_labels(self):
        from jaxnets.data import check_labels

        check_labels(np.eye(3, dtype=np.float32)[[0, 2, 1]], 3)  # one-hot is fine
        with pytest.raises(ValueError, match=r"class ids stored as floats: use labels.astype"):
            check_labels(np.array([0.0, 2.0, 1.0]), 3)
        with pytest.raises(ValueError, match=r"float labels of shape \(3, 4\) for 3 classes"):
            check_labels(np.ones((3, 4), np.float32) / 4, 3)
        with pytest.raises(ValueError, match="row 1 sums to 2"):
            check_labels(np.array([[1.0, 0, 0], [1.0, 1.0, 0]]), 3)

    def test_inputs_of_the_wrong_dtype_or_non_finite(self, tmp_path):
        from jaxnets import data as jdata

        with pytest.raises(
            TypeError, match="normalize expects uint8 images in 0..255, got float32"
        ):
            jdata.normalize(np.zeros((2, 28, 28, 1), np.float32))
        bad = _tiny()
        bad["image"][5, 2] = np.nan
        with pytest.raises(ValueError) as e:
            _tiny_run(tmp_path / "nan", data=bad, checkpoint=False)
        assert str(e.value).startswith(
            "training data['image']: 1 of 48 examples hold NaN or Inf (the first is example 5)"
        )

    def test_float_one_hot_labels_train_and_float_ids_say_so(self, tmp_path):
        data = _tiny()
        data["label"] = np.eye(3, dtype=np.float32)[data["label"]]
        result = _tiny_run(tmp_path / "oh", data=data, checkpoint=False, epochs=1)
        assert int(result.state.step) == 6
        data["label"] = _tiny()["label"].astype(np.float32)
        with pytest.raises(ValueError, match="class indices must be integers"):
            _tiny_run(tmp_path / "ids", data=data, checkpoint=False, epochs=1)


class TestCaches:
    @staticmethod
    def _entry(tmp_path):
        from jaxnets.data import cache

        calls = []

        def build():
            calls.append(1)
            return np.arange(4000, dtype=np.uint8).reshape(10, 400), np.arange(10, dtype=np.int32)

        def load():
            return cache.cached(str(tmp_path), "idx-train-abc", build)

        return load, calls, tmp_path / "idx-train-abc.npz"

    @pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "other_source"])
    def test_a_damaged_entry_is_rebuilt_with_a_warning_naming_it(self, tmp_path, damage, caplog):
        load, calls, path = self._entry(tmp_path)
        images, labels, hit = load()
        assert not hit and calls == [1]
        raw = bytearray(path.read_bytes())
        if damage == "truncate":
            path.write_bytes(raw[: len(raw) // 2])
        elif damage == "flip":
            raw[len(raw) // 3] ^= 1  # inside the images' bytes: only the CRC-32 sees it
            path.write_bytes(raw)
        elif damage == "garbage":
            path.write_bytes(b"not a zip file")
        else:  # a valid entry of another source, copied over this one's name
            np.savez(path, images=images, labels=labels, source=np.array("idx-train-xyz"))
        again, again_labels, hit = load()
        assert not hit and calls == [1, 1]  # rebuilt, not trusted and not fatal
        np.testing.assert_array_equal(again, images)
        assert f"the cache entry {path} is unusable" in caplog.text
        assert load()[2]  # the rebuilt entry is used from then on
        assert calls == [1, 1]


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB tmpfs (needs root; skipped where mounting is not allowed)."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=True)


def _fill(disk, leave=0):
    st = os.statvfs(disk)
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))


class TestDiskFull:
    def test_a_save_on_a_full_disk_is_refused_and_the_previous_checkpoint_kept(self, small_disk):
        from jaxnets.runs.checkpoint import Checkpointer

        state = {"w": np.arange(4096, dtype=np.float32)}  # 16 KiB
        with Checkpointer(small_disk / "ck") as ckpt:
            ckpt.save(1, state, metadata={})
        _fill(small_disk, leave=8192)
        with Checkpointer(small_disk / "ck") as ckpt:
            with pytest.raises(OSError) as e:
                ckpt.save(2, {"w": state["w"] + 1}, metadata={})
            assert e.value.errno == 28
            message = str(e.value)
            assert f"{small_disk / 'ck'} has 0.0 MiB free but checkpoint step 2 needs" in message
            assert "the previous checkpoint (step 1) is intact" in message
            assert ckpt.all_steps() == [1]
            restored, _, step = ckpt.restore(state)
        assert step == 1
        np.testing.assert_array_equal(restored["w"], state["w"])
        assert sorted(os.listdir(small_disk / "ck")) == ["1"]  # no half-written step

    def test_a_run_on_a_full_disk_stops_before_training(self, small_disk):
        _tiny_run(small_disk / "wd", epochs=1)
        _fill(small_disk, leave=4096)
        t0 = time.monotonic()
        with pytest.raises(OSError, match=r"MiB free but a checkpoint needs about") as e:
            _tiny_run(small_disk / "wd", epochs=2)
        assert "the previous checkpoint (step 6) is intact" in str(e.value)
        assert time.monotonic() - t0 < 30
        os.remove(small_disk / "filler")  # space freed: the run resumes from step 6
        assert int(_tiny_run(small_disk / "wd", epochs=2).state.step) == 12

    def test_a_disk_that_fills_during_the_write_gives_one_message(self, tmp_path, monkeypatch):
        """Simulated ENOSPC inside Orbax (another writer took the space after the check)."""
        from jaxnets import checkpoint

        state = {"w": np.arange(16, dtype=np.float32)}
        with checkpoint.Checkpointer(tmp_path / "ck", async_save=False) as ckpt:
            ckpt.save(1, state, metadata={})
            real = ckpt._manager.save

            def full(*args, **kwargs):
                raise ValueError('RESOURCE_EXHAUSTED: Error writing "step/.zarray" in OCDBT')

            monkeypatch.setattr(ckpt._manager, "save", full)
            with pytest.raises(OSError) as e:
                ckpt.save(2, state, metadata={})
            assert e.value.errno == 28 and "the disk filled up while a checkpoint" in str(e.value)
            monkeypatch.setattr(ckpt._manager, "save", real)
            assert ckpt.all_steps() == [1]


class TestHints:
    def test_an_unwritable_kernel_cache_is_named_not_a_missing_compiler(
        self, tmp_path, monkeypatch
    ):
        from jaxnets.models import cnn, native_conv

        (tmp_path / "file").write_text("a file where the cache directory should be")
        monkeypatch.setenv("JAXNETS_CACHE_DIR", str(tmp_path / "file" / "cache"))

        def no_temporary_directory(**_):  # the fallback (a temporary directory) fails too
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(native_conv.tempfile, "mkdtemp", no_temporary_directory)
        with pytest.raises(native_conv._Unavailable) as e:
            native_conv._build()
        reason, fix = e.value.args
        assert reason.startswith(f"the kernel cache {tmp_path / 'file' / 'cache' / 'native'} is")
        assert "not writable" in reason
        assert fix.startswith("set $JAXNETS_CACHE_DIR to a writable directory")
        monkeypatch.setattr(native_conv, "available", lambda: False)
        monkeypatch.setattr(native_conv, "unavailable_reason", lambda: reason)
        monkeypatch.setattr(native_conv, "unavailable_fix", lambda: fix)
        native_conv._warn_fallback.cache_clear()
        with pytest.warns(RuntimeWarning) as warned:  # what a CPU lowering of 'auto' says
            native_conv._warn_fallback(reason)
        text = str(warned[0].message)
        assert "not writable" in text and "Fix: set $JAXNETS_CACHE_DIR" in text
        assert "g++" not in text
        with pytest.raises(RuntimeError, match=r"Fix: set \$JAXNETS_CACHE_DIR.*conv_impl='im2col'"):
            cnn.resolve_conv_impl("native", platform="cpu")
        native_conv._warn_fallback.cache_clear()

    def test_library_errors_name_no_experiment_flag(self, tmp_path):
        from jaxnets import checkpoint, workdir

        assert "--" not in checkpoint.START_FRESH and "--" not in workdir.DISK_FULL
        (tmp_path / "file").write_text("x")
        with pytest.raises(PermissionError) as e:
            workdir.check_workdir_writable(tmp_path / "file" / "run")
        assert "--" not in str(e.value) and "use another directory" in str(e.value)


class TestExitStatus:
    @pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
    def test_a_run_stopped_by_a_signal_reports_128_plus_its_number(self, tmp_path, signum):
        summaries = []
        _tiny_run(tmp_path, epochs=3, log_every_steps=1, signum=signum, summaries=summaries)
        (summary,) = summaries
        assert summary["stopped_early"] and summary["step"] < 18
        assert summary["stop_signal"] == signum
        assert cli.exit_status(summary) == 128 + signum  # 130 for SIGINT, 143 for SIGTERM
        saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
        assert saved[-1] == summary["step"]  # saved before it stopped

    def test_a_finished_run_exits_0(self):
        assert cli.exit_status({"stopped_early": False, "stop_signal": None}) == 0


def test_normalize_checks_the_dtype_of_traced_images_too():
    from jaxnets import data as jdata

    out = jax.jit(jdata.normalize)(np.array([[0, 255]], np.uint8))
    np.testing.assert_array_equal(np.asarray(out), [[0.0, 1.0]])
    with pytest.raises(TypeError, match="got float32"):
        jax.jit(jdata.normalize)(np.zeros((1, 2), np.float32))
