"""One process of the 2-process `jax.distributed` test (run by test_distributed.py).

Usage: python tests/distributed_worker.py PROCESS_ID PORT OUT.npz
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxnets import parallel  # noqa: E402

if __name__ == "__main__":
    process_id, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    parallel.initialize(f"127.0.0.1:{port}", 2, process_id, cpu_collectives="gloo")
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    import test_train  # the same problem as the single-process tests

    state, result = test_train._run(devices=None, epochs=2)
    if parallel.is_main_process():
        leaves = jax.tree.leaves(state.params)
        np.savez(out, *leaves, val_loss=result.history[-1]["val_loss"])
    jax.distributed.shutdown()
