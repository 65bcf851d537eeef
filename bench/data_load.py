"""Time from `jaxnets.data.load` of the 60,000 Fashion-MNIST training images to arrays on the
device: the first load (reads and decodes the IDX files, writes the cache) and a cached load.

Run: .venv-bench/bin/python bench/data_load.py [--name idx:/usr/share/datasets/fashion-mnist]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workload  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", default=f"idx:{workload.FASHION_DIR}")
    args = parser.parse_args(argv)
    import jax

    from jaxnets import data

    jax.devices()  # backend start-up is not part of loading
    cache_dir = tempfile.mkdtemp(prefix="jaxnets-bench-cache-")
    res: dict = {"name": args.name}
    try:
        for kind in ("first", "cached"):
            start = time.perf_counter()
            ds = data.load(args.name, split="train", cache_dir=cache_dir)
            jax.block_until_ready(jax.device_put((ds.images, ds.labels)))
            res[f"{kind}_load_s"] = time.perf_counter() - start
        res["images"] = len(ds.labels)
    finally:
        shutil.rmtree(cache_dir)
    workload.emit(res)
    return res


if __name__ == "__main__":
    main()
