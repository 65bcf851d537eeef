"""Streaming a data set far larger than what is resident: the seed CNN on 1,000,000 images.

Run: python bench/stream_1m.py [--num-images 1000000] [--steps 400]
Writes a `.npy` pair of N random 28x28x1 uint8 images and int32 labels to a temporary
directory (784 MB for N = 1,000,000; deleted afterwards, never committed), then trains the
seed CNN on it through `loop.fit(inputs.Stream(inputs.open_npy(...)))` for `--steps` steps (a
fraction of an epoch) in a fresh process, sampling its memory every 20 ms. Prints images/s
after the first chunk, and the peak anonymous memory (what the process allocated: the model,
XLA, the read-ahead buffers), the peak file-backed memory (pages of the memory-mapped file the
kernel keeps mapped, reclaimable) and the peak total RSS, against the data set's size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workload  # noqa: E402


def _status() -> dict[str, int]:
    """RssAnon, RssFile, VmHWM of this process in bytes (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


class _Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak: dict[str, int] = {}
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            for k, v in _status().items():
                self.peak[k] = max(self.peak.get(k, 0), v)
            time.sleep(0.02)


def generate(directory: str, n: int) -> dict[str, str]:
    paths = {
        "image": os.path.join(directory, "images.npy"),
        "label": os.path.join(directory, "labels.npy"),
    }
    rng = np.random.default_rng(0)
    images = np.lib.format.open_memmap(paths["image"], "w+", np.uint8, (n, 28, 28, 1))
    for lo in range(0, n, 100_000):
        hi = min(n, lo + 100_000)
        images[lo:hi] = rng.integers(0, 256, (hi - lo, 28, 28, 1), dtype=np.uint8)
    images.flush()
    del images
    np.save(paths["label"], rng.integers(0, 10, n).astype(np.int32))
    return paths


def train(directory: str, steps: int) -> dict:
    sampler = _Sampler()
    sampler.start()
    import jax

    from jaxnets import adapters, data, hooks, inputs, loop, losses, optim, sharding
    from jaxnets import metrics as jmetrics
    from jaxnets import train as jtrain
    from jaxnets.models import MnistCNN

    source = inputs.open_npy(
        {
            "image": os.path.join(directory, "images.npy"),
            "label": os.path.join(directory, "labels.npy"),
        }
    )
    tx = optim.sgd(
        optim.inverse_time_decay(workload.LEARNING_RATE, workload.DECAY),
        momentum=workload.MOMENTUM,
        nesterov=True,
    )
    mesh = sharding.make_mesh(1)
    objective = adapters.linen(
        MnistCNN(),
        loss=lambda logits, y: losses.softmax_cross_entropy(logits, y, reduction="none"),
        metrics={"accuracy": jmetrics.accuracy},
        preprocess=lambda x, keys: data.normalize(x),
    )
    state = jtrain.create_train_state(
        objective.init, tx, source.read_batch(np.arange(1)), key=jax.random.key(0)
    )
    step_fn = jtrain.make_train_step(objective.loss_fn, tx)
    logs: list[tuple[float, int]] = []

    class Timing(hooks.Hook):
        """(time, step) every 10 steps; stops after `steps`."""

        every_steps = 10

        def __call__(self, ctx):
            logs.append((time.perf_counter(), ctx.step))

        def should_stop(self, ctx):
            return ctx.step >= steps

    result = loop.fit(
        state,
        step_fn,
        inputs.Stream(source),
        data_key=jax.random.key(1),
        epochs=1,
        batch_size=workload.BATCH,
        hooks=[Timing()],
        mesh=mesh,
    )
    jax.block_until_ready(result.state)
    sampler.stop.set()
    sampler.join()
    (t0, s0), (t1, s1) = logs[0], logs[-1]
    return {
        "num_images": len(source),
        "data_bytes": source.nbytes,
        "steps": s1,
        "steps_per_call": result.steps_per_call,
        "images_per_s": (s1 - s0) * workload.BATCH / (t1 - t0),
        "peak_anon_bytes": sampler.peak["RssAnon"],
        "peak_file_bytes": sampler.peak["RssFile"],
        "peak_rss_bytes": _status()["VmHWM"],
        "devices": [str(d) for d in mesh.devices.flat],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-images", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--train-dir", default=None, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.train_dir:
        result = train(args.train_dir, args.steps)
        workload.emit(result)
        return result
    directory = tempfile.mkdtemp(prefix="jaxnets-bench-1m-")
    try:
        t0 = time.perf_counter()
        generate(directory, args.num_images)
        generate_s = time.perf_counter() - t0
        out = subprocess.run(
            [sys.executable, __file__, "--train-dir", directory, "--steps", str(args.steps)],
            capture_output=True,
            text=True,
            check=False,
        )
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not lines:
            raise RuntimeError(
                f"the streamed run failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
            )
        import json

        result = json.loads(lines[-1][len("RESULT ") :])
        result["generate_s"] = generate_s
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    workload.emit(result)
    return result


if __name__ == "__main__":
    main()
