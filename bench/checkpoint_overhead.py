"""Epoch time of the jaxnets seed CNN with asynchronous Orbax checkpoints every N steps vs none.

Runs bench/jaxnets_cnn.py's `main` twice in this process (no checkpoints, then checkpoints
every --save-every steps), each for --epochs epochs, and reports the steady epoch times.

Run: .venv-bench/bin/python bench/checkpoint_overhead.py [--save-every 100]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jaxnets_cnn  # noqa: E402
import workload  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--num-train", type=int, default=workload.NUM_TRAIN)
    args = parser.parse_args(argv)
    common = ["--epochs", str(args.epochs), "--num-train", str(args.num_train), "--num-val", "100"]
    plain = jaxnets_cnn.main(common)
    saved = jaxnets_cnn.main([*common, "--save-every", str(args.save_every)])
    res = {
        "save_every_steps": args.save_every,
        "epoch_s_none": plain["steady_epoch_s"],
        "epoch_s_async_ckpt": saved["steady_epoch_s"],
        "overhead_fraction": saved["steady_epoch_s"] / plain["steady_epoch_s"] - 1,
        "epochs_none": plain["epoch_s"],
        "epochs_async_ckpt": saved["epoch_s"],
    }
    workload.emit(res)
    return res


if __name__ == "__main__":
    main()
