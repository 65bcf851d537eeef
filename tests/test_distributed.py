"""Two processes on 127.0.0.1 (2 CPU devices each, gloo) == one process with 4 devices."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import test_train

from jaxnets import indices

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(out, *args):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent)])
    worker = [sys.executable, str(HERE / "distributed_worker.py")]
    procs = [
        subprocess.Popen(
            [*worker, str(i), str(port), str(out), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=400)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]


@pytest.mark.slow
def test_two_processes_equal_one_process_four_devices(tmp_path):
    out = tmp_path / "params.npz"
    _run_two_processes(out)
    got = np.load(out)
    ref_state, ref_result = test_train._run(devices=4, epochs=2)
    ref_leaves = jax.tree.leaves(ref_state.params)
    assert len(ref_leaves) == len(got.files) - 1
    for i, leaf in enumerate(ref_leaves):
        np.testing.assert_allclose(got[f"arr_{i}"], np.asarray(leaf), rtol=1e-5, atol=1e-6)
    assert float(got["val_loss"]) == pytest.approx(ref_result.history[-1]["val_loss"], rel=1e-5)
    # Streamed over the two processes: the same numbers, and each process read exactly its
    # columns of every global batch (within an epoch, disjoint shards that cover it).
    streamed = np.load(f"{out}.streamed.npz")
    for i, leaf in enumerate(ref_leaves):
        np.testing.assert_allclose(streamed[f"arr_{i}"], np.asarray(leaf), rtol=1e-5, atol=1e-6)
    n, batch = len(test_train._data()[1]), 32
    orders = [indices.epoch_indices(jax.random.key(1), e, n, batch) for e in (0, 1)]
    reads = [set(np.load(f"{out}.reads{p}.npy").tolist()) for p in (0, 1)]
    for p in (0, 1):  # 2 devices of 16 examples each per process
        mine = set(np.concatenate([o[:, 16 * p : 16 * p + 16].ravel() for o in orders]).tolist())
        assert reads[p] == mine
    assert reads[0] | reads[1] == set(np.concatenate([o.ravel() for o in orders]).tolist())


@pytest.mark.slow
def test_two_processes_checkpoint_and_resume_the_experiment(tmp_path):
    """Orbax saves from 2 processes (replicated global arrays) and both resume from it."""
    import test_mnist_cnn

    _run_two_processes(tmp_path / "run", "experiment")
    first, second, test_loss = json.loads((tmp_path / "run/steps.json").read_text())
    assert (first, second) == (8, 16)
    saved = sorted(int(s) for s in os.listdir(tmp_path / "run/checkpoints") if s.isdigit())
    assert saved[-1] == 16
    ref = test_mnist_cnn._run(tmp_path, "ref", devices=4)
    assert test_loss == pytest.approx(ref["test"]["loss"], rel=1e-4)
