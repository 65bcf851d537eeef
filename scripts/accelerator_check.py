"""The prepared accelerator check: run once on a GPU or TPU machine (under 8 minutes).

Run from the repository root (`make accel-check`, or with the project's venv):
    python scripts/accelerator_check.py            # on a GPU/TPU machine
    python scripts/accelerator_check.py --quick    # end to end on CPU in seconds (tested)

It prints the devices; runs the test files that matter on that platform (with the platform
as jax's default); times a jitted forward+backward of the seed CNN for conv_impl 'xla' vs
'im2col' vs the default ('auto': 'xla' on GPU/TPU, reasoned, not measured before this);
times seed-CNN training epochs through `loop.fit` on the full Fashion-MNIST shape (60,000
images of 28x28x1; the real data where TFDS has it prepared, else synthetic data of that
shape: speed does not depend on the pixels) at batch 100 and 1,024 with 1, 10 and 50 steps
per device call; times a vmapped sweep of 64 seed CNNs against 64 sequential runs; and
bfloat16 against float32. Writes bench/results/<timestamp>-<platform>.json (every figure)
and the same name .md (the tables), and prints the tables. Sections past the time budget
are skipped and say so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The test files whose facts depend on the platform: choices per lowering platform, export,
# mixed precision, the models' implementations agreeing with lax.conv.
TEST_FILES = ("tests/test_platforms.py", "tests/test_precision.py", "tests/test_models.py")
QUICK_TESTS = ("tests/test_platforms.py::test_choices_per_platform_and_dtype",)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: end to end on CPU")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--budget-minutes", type=float, default=7.5)
    parser.add_argument("--no-tests", action="store_true", help="skip the test files")
    return parser.parse_args(argv)


def run_tests(platform: str, quick: bool) -> dict:
    """pytest on the platform's test files, with that platform as jax's default."""
    env = dict(os.environ, JAX_PLATFORMS=platform)
    args = QUICK_TESTS if quick else TEST_FILES
    command = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *args]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        tail, returncode = done.stdout.strip().splitlines()[-1:] or [""], done.returncode
        failed = [line for line in done.stdout.splitlines() if line.startswith("FAILED")]
    except subprocess.TimeoutExpired:
        tail, returncode, failed = ["timed out after 300 s"], None, []
    return {
        "command": " ".join(command[1:]),
        "returncode": returncode,
        "summary": tail[0],
        "failed": failed,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def best_seconds(fn, *args, repeats: int, calls: int) -> float:
    """Min over `repeats` of the mean seconds per call of `calls` back-to-back calls."""
    import jax

    jax.block_until_ready(fn(*args))  # compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def _objective(model):
    from jaxnets import adapters, losses
    from jaxnets import metrics as jmetrics

    return adapters.linen(
        model,
        loss=lambda logits, y: losses.softmax_cross_entropy(logits, y, reduction="none"),
        metrics={"accuracy": jmetrics.accuracy},
        preprocess=lambda x, keys: x.astype("float32") / 255.0,
    )


def time_forward_backward(batches, repeats: int, calls: int) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from jaxnets import losses
    from jaxnets.models import MnistCNN

    rows = []
    params = jax.jit(MnistCNN(conv_impl="xla").init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    for batch in batches:
        x = jax.random.uniform(jax.random.key(1), (batch, 28, 28, 1))
        y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
        for name, options in (
            ("xla", {"conv_impl": "xla"}),
            ("im2col", {"conv_impl": "im2col"}),
            ("default", {}),
            ("default bf16", {"dtype": jnp.bfloat16}),
        ):
            model = MnistCNN(**options)

            def loss(p, x, y, model=model):
                return losses.softmax_cross_entropy(model.apply(p, x), y)

            step = jax.jit(jax.value_and_grad(loss))
            seconds = best_seconds(step, params, x, y, repeats=repeats, calls=calls)
            rows.append({"impl": name, "batch": batch, "ms": 1e3 * seconds})
    return rows


def load_images(n: int, quick: bool):
    """(images uint8 [n, 28, 28, 1], labels int32 [n], source): Fashion-MNIST or synthetic."""
    import numpy as np

    tfds_dir = Path(os.environ.get("TFDS_DATA_DIR", Path.home() / "tensorflow_datasets"))
    if not quick and (tfds_dir / "fashion_mnist").is_dir():
        from jaxnets import data as jdata

        train = jdata.load("fashion_mnist", split="train")
        return train.images[:n], train.labels[:n], "fashion_mnist (TFDS)"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, (n,), dtype=np.int32)
    return images, labels, "synthetic, Fashion-MNIST shape"


def time_epochs(images, labels, batches, steps_per_call, dtypes=("float32",)) -> list[dict]:
    """Seconds of the second epoch through `loop.fit` (the first includes compilation)."""
    import jax
    import jax.numpy as jnp
    import optax

    from jaxnets import loop, sharding, train
    from jaxnets.models import MnistCNN

    data = {"image": images, "label": labels}
    rows = []
    n = len(jax.devices())
    for dtype in dtypes:
        objective = _objective(MnistCNN(dtype=jnp.dtype(dtype)))
        tx = optax.sgd(0.05, momentum=0.9, nesterov=True)
        for batch in batches:
            devices = max(d for d in range(1, n + 1) if batch % d == 0 and n % d == 0)
            mesh = sharding.make_mesh(devices)
            step = train.make_train_step(objective.loss_fn, tx)
            for k in steps_per_call:
                sample = {"image": images[:1], "label": labels[:1]}
                state = train.create_train_state(objective.init, tx, sample, key=jax.random.key(0))
                result = loop.fit(
                    state,
                    step,
                    data,
                    data_key=jax.random.key(1),
                    epochs=2,
                    batch_size=batch,
                    mesh=mesh,
                    steps_per_call=k,
                )
                seconds = result.history[-1]["epoch_seconds"]
                rows.append(
                    {
                        "dtype": dtype,
                        "batch": batch,
                        "devices": devices,
                        "steps_per_call": result.steps_per_call,
                        "epoch_seconds": seconds,
                        "images_per_second": (len(labels) // batch) * batch / seconds,
                        "train_accuracy": result.history[-1].get("accuracy"),
                    }
                )
    return rows


def time_sweep(images, labels, models: int, steps: int, batch: int) -> dict:
    """`models` seed CNNs as one vmapped program against `models` sequential runs."""
    import jax
    import numpy as np
    import optax

    from jaxnets import train
    from jaxnets.models import MnistCNN

    objective = _objective(MnistCNN())
    tx = optax.sgd(0.05, momentum=0.9, nesterov=True)
    step = train.make_train_step(objective.loss_fn, tx)
    data = jax.device_put({"image": images, "label": labels})
    rng = np.random.default_rng(0)
    idx = jax.device_put(rng.integers(0, len(labels), (steps, batch), dtype=np.int32))
    sample = {"image": images[:1], "label": labels[:1]}

    def scanned(step_fn):
        def run(state, data, idx):
            def body(s, ix):
                return step_fn(s, jax.tree.map(lambda a: a[ix], data))[0], None

            return jax.lax.scan(body, state, idx)[0]

        return jax.jit(run)

    keys = jax.random.split(jax.random.key(0), models)
    states = jax.vmap(lambda k: train.create_train_state(objective.init, tx, sample, key=k))(keys)
    vmapped = scanned(jax.vmap(step, in_axes=(0, None)))
    one = scanned(step)
    single = jax.tree.map(lambda x: x[0], states)
    jax.block_until_ready((vmapped(states, data, idx), one(single, data, idx)))  # compile
    t0 = time.perf_counter()
    jax.block_until_ready(vmapped(states, data, idx))
    together = time.perf_counter() - t0
    t0 = time.perf_counter()
    for m in range(models):
        out = one(jax.tree.map(lambda x, m=m: x[m], states), data, idx)
    jax.block_until_ready(out)
    sequential = time.perf_counter() - t0
    return {
        "models": models,
        "steps": steps,
        "batch": batch,
        "vmapped_seconds": together,
        "sequential_seconds": sequential,
        "speedup": sequential / together,
    }


def markdown(report: dict) -> str:
    lines = [f"# Accelerator check {report['timestamp']} on {report['device_summary']}", ""]
    tests = report.get("tests")
    if tests:
        lines += [f"tests: `{tests['command']}`: {tests['summary']}", ""]
    if report.get("forward_backward"):
        lines += ["| fwd+bwd | batch | ms |", "|---|---|---|"]
        lines += [
            f"| {r['impl']} | {r['batch']} | {r['ms']:.2f} |" for r in report["forward_backward"]
        ]
        lines.append("")
    if report.get("epochs"):
        lines += [
            f"Epochs of {report['epoch_images']:,} images ({report['data_source']}), 2nd epoch:",
            "",
            "| dtype | batch | devices | steps/call | s/epoch | images/s |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['dtype']} | {r['batch']} | {r['devices']} | {r['steps_per_call']} | "
            f"{r['epoch_seconds']:.3f} | {r['images_per_second']:,.0f} |"
            for r in report["epochs"]
        ]
        lines.append("")
    if report.get("sweep"):
        s = report["sweep"]
        lines.append(
            f"Sweep: {s['models']} seed CNNs x {s['steps']} steps of {s['batch']}: vmapped "
            f"{s['vmapped_seconds']:.2f} s, sequential {s['sequential_seconds']:.2f} s "
            f"({s['speedup']:.1f}x)"
        )
        lines.append("")
    if report["skipped"]:
        lines.append(f"skipped (time budget): {', '.join(report['skipped'])}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    import jax

    devices = jax.devices()
    platform = devices[0].platform
    print(f"jax {jax.__version__}: {len(devices)} device(s):")
    for d in devices:
        print(f"  {d.id}: {d.platform} {d.device_kind}")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    report = {
        "timestamp": stamp,
        "quick": args.quick,
        "jax": jax.__version__,
        "platform": platform,
        "device_summary": f"{len(devices)} x {platform} ({devices[0].device_kind})",
        "devices": [{"id": d.id, "platform": d.platform, "kind": d.device_kind} for d in devices],
        "skipped": [],
        "section_seconds": {},
    }
    q = args.quick
    sizes = {
        "batches": (100,) if q else (100, 1024),
        "images": 600 if q else 60_000,
        "steps_per_call": (1, 3) if q else (1, 10, 50),
        "sweep": (2, 2, 20) if q else (64, 50, 100),  # models, steps, batch
        "repeats": (1, 1) if q else (10, 10),  # repeats, calls
    }
    sections = [
        ("tests", lambda: None if args.no_tests else run_tests(platform, q)),
        ("forward_backward", lambda: time_forward_backward(sizes["batches"], *sizes["repeats"])),
    ]
    images, labels, source = load_images(sizes["images"], q)
    report["epoch_images"], report["data_source"] = len(labels), source
    big, k = sizes["batches"][-1], sizes["steps_per_call"][-1]
    sections += [
        ("epochs", lambda: time_epochs(images, labels, sizes["batches"], sizes["steps_per_call"])),
        # bf16 epochs on CPU run the slow im2col path: only on a real run, not --quick.
        (
            "epochs_bfloat16",
            lambda: None if q else time_epochs(images, labels, (big,), (k,), ("bfloat16",)),
        ),
        ("sweep", lambda: time_sweep(images, labels, *sizes["sweep"])),
    ]
    budget = 60 * args.budget_minutes
    for name, section in sections:
        if time.perf_counter() - start > budget:
            report["skipped"].append(name)
            continue
        t0 = time.perf_counter()
        report[name] = section()
        report["section_seconds"][name] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {report['section_seconds'][name]} s")
    if report.get("epochs_bfloat16"):
        report["epochs"] = report.get("epochs", []) + report.pop("epochs_bfloat16")
    report["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{stamp}-{platform}{'-quick' if q else ''}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    path.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {path} and {path.with_suffix('.md')} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
