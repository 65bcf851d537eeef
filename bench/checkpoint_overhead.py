"""Epoch time of the jaxnets seed CNN with asynchronous Orbax checkpoints vs none.

For each save interval in --save-every (default: once per epoch, which is what
`experiments.mnist_cnn` does by default, and every 100 steps) runs bench/jaxnets_cnn.py's
`main` in this process, interleaved with runs without checkpoints (--repeats rounds), and
reports the median steady epoch times. It also measures what one save costs: the CPU time
(all threads) of `Checkpointer.save` + `wait_until_finished` on an idle machine, which is
what the saves take away from training on a CPU whose cores are all busy.

Run: .venv-bench/bin/python bench/checkpoint_overhead.py [--save-every 480,100] [--repeats 4]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jaxnets_cnn  # noqa: E402
import workload  # noqa: E402


def cost_of_one_save(saves: int = 20) -> dict:
    """Wall and CPU (user + system, all threads) milliseconds per save of the CNN's state."""
    import time

    import jax
    import jax.numpy as jnp

    from jaxnets import adapters, checkpoint, losses, optim, train
    from jaxnets.models import MnistCNN

    tx = optim.sgd(optim.inverse_time_decay(0.05, 1e-6), momentum=0.9, nesterov=True)
    objective = adapters.linen(MnistCNN(), loss=losses.softmax_cross_entropy)
    sample = {"image": jnp.zeros((1, 28, 28, 1)), "label": jnp.zeros((1,), jnp.int32)}
    state = train.create_train_state(objective.init, tx, sample, key=jax.random.key(0))
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
    directory = tempfile.mkdtemp(prefix="jaxnets-bench-save-")
    try:
        ckpt = checkpoint.Checkpointer(directory, max_to_keep=2)
        for step in range(1, 4):  # warm-up: first-save set-up and compilation
            ckpt.save(step, state, metadata={})
            ckpt.wait_until_finished()
        cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        cpu0, wall0 = cpu(), time.perf_counter()
        for step in range(4, 4 + saves):
            ckpt.save(step, state, metadata={})
            ckpt.wait_until_finished()
        cpu_ms = 1e3 * (cpu() - cpu0) / saves
        wall_ms = 1e3 * (time.perf_counter() - wall0) / saves
        ckpt.close()
    finally:
        shutil.rmtree(directory)
    return {"state_bytes": nbytes, "save_cpu_ms": cpu_ms, "save_wall_ms": wall_ms}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--save-every", default=None, help="comma list; default: epoch,100")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--num-train", type=int, default=workload.NUM_TRAIN)
    args = parser.parse_args(argv)
    steps_per_epoch = args.num_train // workload.BATCH
    intervals = (
        [int(s) for s in args.save_every.split(",")] if args.save_every else [steps_per_epoch, 100]
    )
    common = ["--epochs", str(args.epochs), "--num-train", str(args.num_train), "--num-val", "100"]
    runs: dict = {"none": [], **{str(n): [] for n in intervals}}
    for _ in range(args.repeats):
        runs["none"].append(jaxnets_cnn.main(common)["steady_epoch_s"])
        for n in intervals:
            saved = jaxnets_cnn.main([*common, "--save-every", str(n)])
            runs[str(n)].append(saved["steady_epoch_s"])
    none = statistics.median(runs["none"])
    res = {
        "steps_per_epoch": steps_per_epoch,
        "epoch_s_none": none,
        "intervals": [
            {
                "save_every_steps": n,
                "saves_per_epoch": steps_per_epoch / n,
                "epoch_s": statistics.median(runs[str(n)]),
                "overhead_fraction": statistics.median(runs[str(n)]) / none - 1,
            }
            for n in intervals
        ],
        "raw_epoch_s": runs,
        **cost_of_one_save(),
    }
    workload.emit(res)
    return res


if __name__ == "__main__":
    main()
