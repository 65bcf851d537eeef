"""One process of the 2-process `jax.distributed` test (run by test_distributed.py).

Usage: python tests/distributed_worker.py PROCESS_ID PORT OUT.npz
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxnets import sharding  # noqa: E402

if __name__ == "__main__":
    process_id, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    sharding.initialize(f"127.0.0.1:{port}", 2, process_id, cpu_collectives="gloo")
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    mode = sys.argv[4] if len(sys.argv) > 4 else "train"
    if mode == "train":
        import test_train  # the same problem as the single-process tests

        state, result = test_train._run(devices=None, epochs=2)
        # Streamed: each process reads only its columns of every global batch.
        import test_inputs

        source = test_inputs._Examples(*test_train._data())
        stream = test_inputs.inputs.Stream(source, transform=test_inputs._drop_name)
        streamed, _ = test_train._run(devices=None, epochs=2, train_data=stream)
        np.save(f"{out}.reads{process_id}.npy", np.asarray(source.reads))
        if sharding.is_main_process():
            leaves = jax.tree.leaves(state.params)
            np.savez(out, *leaves, val_loss=result.history[-1]["val_loss"])
            np.savez(f"{out}.streamed.npz", *jax.tree.leaves(streamed.params))
    else:  # the seed CNN experiment with checkpoints: one epoch, then resume for the second
        import dataclasses
        import json

        import test_mnist_cnn

        config = dataclasses.replace(test_mnist_cnn.TINY, devices=None, workdir=out)
        first = test_mnist_cnn.mnist_cnn.main(dataclasses.replace(config, epochs=1))
        second = test_mnist_cnn.mnist_cnn.main(config)
        if sharding.is_main_process():
            with open(os.path.join(out, "steps.json"), "w") as f:
                json.dump([first["step"], second["step"], second["test"]["loss"]], f)
    jax.distributed.shutdown()
