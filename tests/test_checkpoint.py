"""Tests for jaxnets.runs.checkpoint: round trips, retention, faults, topology, kill -9, signals."""

import asyncio
import gc
import glob
import json
import os
import signal
import subprocess
import sys
import threading
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from jaxnets.engine.preemption import PreemptionGuard
from jaxnets.runs.checkpoint import Checkpointer, CheckpointError
from jaxnets.runs.workdir import check_resumable, check_workdir_writable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ScaleByAdamState(NamedTuple):  # shaped like optax's, without depending on optax
    count: jax.Array  # int32 []
    mu: dict
    nu: dict


class EmptyState(NamedTuple):
    pass


class TrainState(NamedTuple):
    step: jax.Array  # int32 []
    params: dict
    opt_state: tuple
    key: jax.Array  # typed key, or uint32 [2]


def make_state(seed: int, *, typed_key: bool = True) -> TrainState:
    k0, k1, k2, k3 = jax.random.split(jax.random.key(seed), 4)
    params = {
        "embed": jax.random.normal(k0, (64, 256)),  # big enough to be its own data file
        "dense": {"w": jax.random.normal(k1, (8, 16)), "b": jnp.arange(16.0) * seed},
        "out": {"w": jax.random.normal(k2, (16, 4)).astype(jnp.bfloat16)},
        "mask": jax.random.bernoulli(k3, 0.5, (5,)),
        "codes": jnp.arange(-3, 3, dtype=jnp.int8) * seed,
    }
    mu = jax.tree.map(lambda p: p * 0.1, params)
    nu = jax.tree.map(lambda p: p * p, params)
    opt_state = (ScaleByAdamState(jnp.int32(seed), mu, nu), EmptyState())
    key = jax.random.key(seed) if typed_key else jax.random.PRNGKey(seed)
    return TrainState(jnp.int32(10 * seed), params, opt_state, key)


def assert_trees_equal(actual, expected):
    """Bit-exact equality, same structure and dtypes; typed keys compared by their data."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == e.dtype
        if jax.dtypes.issubdtype(e.dtype, jax.dtypes.prng_key):
            assert jax.random.key_impl(a) == jax.random.key_impl(e)
            a, e = jax.random.key_data(a), jax.random.key_data(e)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def largest_data_file(step_dir: str) -> str:
    """The biggest file of array data (OCDBT data files live in `d/` directories)."""
    return max(glob.glob(f"{step_dir}/state/**/d/*", recursive=True), key=os.path.getsize)


@pytest.mark.compat
@pytest.mark.parametrize("typed_key", [True, False])
@pytest.mark.parametrize("async_save", [True, False])
def test_round_trip_is_bit_exact(tmp_path, typed_key, async_save):
    state = make_state(3, typed_key=typed_key)
    meta = {"config": {"lr": 0.1, "layers": [8, 16]}, "epoch": 2, "batch_in_epoch": 7}
    with Checkpointer(tmp_path, async_save=async_save) as ckpt:
        donated = jax.tree.map(jnp.copy, state)
        assert ckpt.save(30, donated, metadata=meta, metrics={"loss": 0.25})
        for x in jax.tree.leaves(donated):  # as the next donating train step would
            x.delete()
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [30]
        restored, restored_meta, step = ckpt.restore(make_state(0, typed_key=typed_key))
    assert step == 30
    assert restored_meta == meta
    assert_trees_equal(restored, state)
    # A fresh process-like reader sees the same thing.
    with Checkpointer(tmp_path, read_only=True) as reader:
        again, _, _ = reader.restore(jax.eval_shape(lambda: state))
    assert_trees_equal(again, state)


def test_the_on_disk_format_name_is_the_one_earlier_checkpoints_carry(tmp_path):
    """Checkpoints written by earlier versions say `jaxnets.checkpoint/1` in their metadata;
    a name that followed the module's move (`jaxnets.runs.checkpoint`) refused every one of
    them as unreadable metadata. A new checkpoint still writes that name, and one whose
    metadata says it restores."""
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, make_state(1), metadata={"epoch": 0})
        ckpt.wait_until_finished()
    written = [
        json.loads(open(f).read())
        for f in glob.glob(f"{tmp_path}/1/meta/**/*", recursive=True)
        if os.path.isfile(f) and open(f, "rb").read(1) == b"{"
    ]
    assert any(w.get("format") == "jaxnets.checkpoint/1" for w in written), written
    with Checkpointer(tmp_path, read_only=True) as reader:
        state, meta, step = reader.restore(make_state(0))
    assert (step, meta) == (1, {"epoch": 0})
    assert_trees_equal(state, make_state(1))


def test_keep_last_k(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        for step in range(1, 6):
            ckpt.save(step, make_state(step), metadata={})
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [4, 5]
    assert sorted(os.listdir(tmp_path)) == ["4", "5"]
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        assert ckpt.latest_step() == 5
        state, _, step = ckpt.restore(make_state(0))
    assert step == 5
    assert_trees_equal(state, make_state(5))


@pytest.mark.parametrize("mode, best, kept", [("min", 2, [2, 5, 6]), ("max", 5, [5, 6])])
def test_keep_best_by_metric(tmp_path, mode, best, kept):
    losses = {1: 0.5, 2: 0.1, 3: 0.4, 4: 0.3, 5: 0.6}
    with Checkpointer(tmp_path, max_to_keep=2, best_metric="val_loss", best_mode=mode) as ckpt:
        for step, loss in losses.items():
            ckpt.save(step, make_state(step), metadata={}, metrics={"val_loss": loss})
        ckpt.save(6, make_state(6), metadata={})  # no metric (mid-epoch): kept by recency only
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == kept
        assert ckpt.best_step() == best
    with Checkpointer(tmp_path, max_to_keep=2, best_metric="val_loss", best_mode=mode) as ckpt:
        assert ckpt.best_step() == best
        state, _, _ = ckpt.restore(make_state(0), step=best)
    assert_trees_equal(state, make_state(best))


def test_save_interval_and_already_saved_steps(tmp_path):
    with Checkpointer(tmp_path, save_interval_steps=10, async_save=False) as ckpt:
        assert not ckpt.save(5, make_state(1), metadata={})
        assert ckpt.save(10, make_state(1), metadata={})
        assert not ckpt.save(10, make_state(2), metadata={})  # e.g. right after a resume
        assert ckpt.save(15, make_state(2), metadata={}, force=True)
        assert ckpt.all_steps() == [10, 15]


def corrupt(path: str, how: str) -> None:
    if how == "delete":
        os.remove(path)
    elif how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif how == "flip":  # same size, one byte changed: Orbax alone restores it silently
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            byte = f.read(1)[0]
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte ^ 0x01]))


@pytest.mark.parametrize(
    "how, item, reason",
    [
        ("delete", "data", "cannot read its arrays"),
        ("truncate", "data", "cannot read its arrays"),
        ("flip", "data", r"its data differs from what was saved, in state\S*\['embed'\]"),
        ("truncate", "meta", "cannot read its metadata: JSONDecodeError"),
    ],
)
# Orbax abandons the other reads of a checkpoint whose first read failed; their coroutines
# raise when garbage-collected. Collect them here so the noise stays with these tests.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupted_latest_falls_back_to_previous(tmp_path, how, item, reason):
    with Checkpointer(tmp_path) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, make_state(step), metadata={"saved_at": step})
    step_dir = os.path.join(tmp_path, "3")
    corrupt(largest_data_file(step_dir) if item == "data" else f"{step_dir}/meta/metadata", how)

    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 3
        with pytest.warns(
            RuntimeWarning, match=rf"checkpoint step 3 .* unreadable \({reason}.*step 2"
        ):
            state, meta, step = ckpt.restore(make_state(0))
        assert (step, meta) == (2, {"saved_at": 2})
        assert_trees_equal(state, make_state(2))
        # The bad step is set aside (not deleted) so the resumed run can save step 3 again.
        assert ckpt.all_steps() == [1, 2]
        assert os.listdir(os.path.join(tmp_path, "corrupted"))[0].startswith("3-")
        assert ckpt.save(3, make_state(3), metadata={"saved_at": 3})
        ckpt.wait_until_finished()
        state, _, step = ckpt.restore(make_state(0))
    assert step == 3
    assert_trees_equal(state, make_state(3))
    gc.collect()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_no_valid_checkpoint_raises_and_deletes_nothing(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        for step in (1, 2):
            ckpt.save(step, make_state(step), metadata={})
    for step in (1, 2):
        corrupt(largest_data_file(os.path.join(tmp_path, str(step))), "truncate")
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointError) as info:
            ckpt.restore(make_state(0))
    message = str(info.value)
    assert "no readable checkpoint" in message
    assert "step 2: cannot read its arrays" in message and "step 1:" in message
    assert "save to an empty directory" in message and "--restart" not in message  # a library
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]
    gc.collect()


def test_missing_checkpoints_raise(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(FileNotFoundError, match="no checkpoint in"):
            ckpt.restore(make_state(0))
        ckpt.save(1, make_state(1), metadata={})
        with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 7 .* steps: \[1\]"):
            ckpt.restore(make_state(0), step=7)


def test_target_that_does_not_fit_is_an_error_not_a_fallback(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, make_state(1), metadata={})
        ckpt.save(2, make_state(2), metadata={})
        wrong = make_state(0, typed_key=False)
        wrong = wrong._replace(params={**wrong.params, "extra": jnp.zeros(3)})
        wrong.params["dense"]["w"] = jnp.zeros((8, 32))
        with pytest.raises(ValueError) as info:
            ckpt.restore(wrong)
        assert ckpt.all_steps() == [1, 2]
    message = str(info.value)
    assert "state.params['dense']['w']: saved float32[8, 16], target float32[8, 32]" in message
    assert "state.params['extra']: not in the checkpoint" in message
    assert "state.key: saved PRNG key (threefry2x32) stored as uint32[2], target uint32[2]" in (
        message
    )


def test_save_rejects_bad_input(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match="metadata must be JSON-serialisable"):
            ckpt.save(1, make_state(1), metadata={"lr": jnp.float32(0.1)})
        with pytest.raises(ValueError, match=r"state leaf \['name'\] is a str"):
            ckpt.save(1, {"name": "x"}, metadata={})
        assert ckpt.all_steps() == []
    with pytest.raises(ValueError, match="max_to_keep=0 would delete every checkpoint"):
        Checkpointer(tmp_path, max_to_keep=0)
    with Checkpointer(tmp_path, read_only=True) as reader:
        with pytest.raises(ValueError, match="read_only"):
            reader.save(1, make_state(1), metadata={})


def test_check_resumable_lists_every_differing_field():
    saved = {"batch_size": 128, "seed": 0, "learning_rate": 0.1, "epochs": 3, "model": "cnn"}
    current = {"batch_size": 64, "seed": 1, "learning_rate": 0.1, "epochs": 5, "nesterov": True}
    with pytest.raises(ValueError) as info:
        check_resumable(saved, current, ignore=("epochs",))
    message = str(info.value)
    assert "in 4 field(s)" in message
    assert "  batch_size: saved 128, current 64" in message
    assert "  seed: saved 0, current 1" in message
    assert "  model: saved 'cnn', current <absent>" in message
    assert "  nesterov: saved <absent>, current True" in message
    assert "epochs" not in message and "learning_rate" not in message
    assert "restart=True" in message and "workdir=<directory>" in message  # arguments: a library
    check_resumable(saved, {**saved, "epochs": 10}, ignore=("epochs",))
    check_resumable(saved, current, keys=("learning_rate",))


def sharded_state(seed: int, sharding_for) -> TrainState:
    """make_state with every leaf placed by `sharding_for(leaf)`."""
    return jax.tree.map(lambda x: jax.device_put(x, sharding_for(x)), make_state(seed))


def mesh_sharding(n: int):
    mesh = jax.make_mesh((n,), ("x",), devices=jax.devices()[:n])

    def sharding_for(x):  # shard the leading axis where it divides, replicate the rest
        spec = PartitionSpec("x") if x.ndim and x.shape[0] % n == 0 else PartitionSpec()
        return NamedSharding(mesh, spec)

    return sharding_for


def single_device(x):
    return SingleDeviceSharding(jax.devices()[0])


@pytest.mark.compat
@pytest.mark.parametrize(
    "save_on, restore_on",
    [
        (mesh_sharding(8), single_device),
        (single_device, mesh_sharding(8)),
        (mesh_sharding(8), mesh_sharding(4)),
        (mesh_sharding(2), mesh_sharding(8)),
    ],
    ids=["8->1", "1->8", "8->4", "2->8"],
)
def test_restore_on_another_topology(tmp_path, save_on, restore_on):
    assert jax.device_count() == 8
    state = sharded_state(4, save_on)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(4, state, metadata={})
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=restore_on(x)),
            make_state(0),
        )
        restored, _, _ = ckpt.restore(target)
    assert_trees_equal(restored, make_state(4))
    for r, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target), strict=True):
        assert r.sharding.is_equivalent_to(t.sharding, r.ndim)


# A training run that saves a large state asynchronously and waits to be killed.
KILL_SCRIPT = """
import sys, time, jax
from jaxnets.runs.checkpoint import Checkpointer
directory, size = sys.argv[1], int(sys.argv[2])
ckpt = Checkpointer(directory, max_to_keep=2)
for step in (1, 2, 3):
    state = {"w": jax.random.normal(jax.random.key(step), (size,)), "key": jax.random.key(step)}
    ckpt.save(step, state, metadata={"step": step})
    print("returned", step, flush=True)
    ckpt.wait_until_finished()
    print("committed", step, flush=True)
time.sleep(120)
"""


def killed_state(step: int, size: int) -> dict:
    return {"w": jax.random.normal(jax.random.key(step), (size,)), "key": jax.random.key(step)}


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["returned 3", "committed 3"])
def test_kill_9_leaves_a_valid_checkpoint(tmp_path, moment):
    size = 1 << 23  # 32 MiB of float32: the write outlasts the kill
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    with subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(tmp_path), str(size)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    ) as proc:
        try:
            for line in proc.stdout:
                if line.strip() == moment:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
        finally:
            proc.kill()  # no-op once killed; ends the child if the test fails first
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    unfinished = glob.glob(f"{tmp_path}/*.orbax-checkpoint-tmp*")

    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        state, meta, step = ckpt.restore(jax.eval_shape(lambda: killed_state(0, size)))
        assert meta == {"step": step}
        assert_trees_equal(state, killed_state(step, size))
        if moment == "committed 3":
            assert (step, unfinished) == (3, [])
        else:  # killed mid-write: step 3 is either complete or invisible, never half-valid
            assert step == 3 or (step == 2 and unfinished)
        # Leftover temporary directories are cleared and the run can save again.
        assert not glob.glob(f"{tmp_path}/*.orbax-checkpoint-tmp*")
        assert ckpt.save(step + 1, killed_state(step + 1, 8), metadata={"step": step + 1})
    print(f"kill at {moment!r}: restored step {step}, unfinished dirs {len(unfinished)}")


def test_wait_until_finished_inside_a_running_event_loop(tmp_path):
    state = make_state(5)
    result = {}

    async def notebook_cell():
        with Checkpointer(tmp_path) as ckpt:
            ckpt.save(5, state, metadata={"where": "notebook"})
            ckpt.wait_until_finished()
            result["steps"] = ckpt.all_steps()
            result["restored"] = ckpt.restore(make_state(0))

    thread = threading.Thread(target=asyncio.run, args=(notebook_cell(),), daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "wait_until_finished hung inside an event loop"
    assert result["steps"] == [5]
    restored, meta, step = result["restored"]
    assert (meta, step) == ({"where": "notebook"}, 5)
    assert_trees_equal(restored, state)


def test_preemption_guard_sets_flag_and_restores_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with PreemptionGuard() as guard:
        assert not guard.should_stop
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.should_stop and guard.received == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C still interrupts
            os.kill(os.getpid(), signal.SIGINT)
    assert {s: signal.getsignal(s) for s in before} == before


def test_check_workdir_writable(tmp_path):
    check_workdir_writable(tmp_path / "new" / "run")
    assert os.path.isdir(tmp_path / "new" / "run") and os.listdir(tmp_path / "new" / "run") == []
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(PermissionError, match=r"work directory .*file/run is not writable"):
        check_workdir_writable(tmp_path / "file" / "run")
    with pytest.raises(OSError, match=r"MiB free but a checkpoint of this run needs"):
        check_workdir_writable(tmp_path, required_bytes=1 << 62)


def test_check_workdir_read_only(tmp_path):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o500)
    try:
        if os.access(readonly, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes (file-as-parent case tested)")
        with pytest.raises(PermissionError, match="not writable .* another directory"):
            check_workdir_writable(readonly)
        with pytest.raises(PermissionError, match="not writable"):
            Checkpointer(readonly / "ckpt")
    finally:
        readonly.chmod(0o700)


def test_python_scalars_and_numpy_leaves_round_trip(tmp_path):
    state = {"step": 7, "lr": 0.5, "counts": np.arange(3, dtype=np.int32), "w": jnp.ones(2)}
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(7, state, metadata={})
        restored, _, _ = ckpt.restore(
            {"step": 0, "lr": 0.0, "counts": np.zeros(3, np.int32), "w": jnp.zeros(2)}
        )
    assert restored["step"] == 7 and type(restored["step"]) is int
    assert restored["lr"] == 0.5 and type(restored["lr"]) is float
    assert isinstance(restored["counts"], np.ndarray)
    np.testing.assert_array_equal(restored["counts"], state["counts"])
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.ones(2, np.float32))


def test_asyncio_reports_of_abandoned_reads_are_dropped_and_nothing_else():
    """A failed restore abandons TensorStore reads; asyncio reports each as a Task (its
    coroutine named) or, depending on timing, a bare Future holding TensorStore's error. Both
    are dropped (the CheckpointError says what is wrong); any other report is kept."""
    import logging

    from jaxnets.runs.orbax_faults import _abandoned_read_log

    def record(msg):
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, None)

    read = 'Error reading "key/.zarray" in OCDBT database at local file "/x/4/state/"'
    assert _abandoned_read_log(
        record("Task exception was never retrieved\nfuture: <Task coro=<async_deserialize()>>")
    )
    assert _abandoned_read_log(
        record(f"Future exception was never retrieved\nfuture: <Future exception={read}>")
    )
    assert _abandoned_read_log(
        record('Future exception was never retrieved\nError opening "zarr" driver: ...')
    )
    assert not _abandoned_read_log(record("Future exception was never retrieved\nKeyError: 3"))
    assert not _abandoned_read_log(record("Task exception was never retrieved\n<Task coro=f()>"))
    assert not _abandoned_read_log(record("Executing <Task ...> took 0.2 seconds"))
