"""Overhead of issue 27's hooks 1-6 on the seed CNN's steady epoch time, logging every 10 steps.

Runs bench/jaxnets_cnn.py's `main` in this process, interleaved (--repeats rounds of
"base" then "all"):
- base: NonFinite, Log every 10 steps (JSONL), Evaluate and an epoch-end Checkpoint: what a
  run has without the features;
- all: base + health metrics in the step (gradient/parameter norms, learning rate),
  Throughput (rates, FLOPs, time accounting), best-2 checkpoints by val_loss, EarlyStopping
  (never triggering), and a Profile window of steps [10, 20) (in the first epoch, which the
  steady time leaves out, like compilation).
Steady epochs are the third and later: an epoch's time holds the hooks that ran at the
previous epoch's end, and the first evaluation and save compile and set up. Reports the
median steady epoch seconds of each and their ratio (goal: under 1.02), and the host
seconds per steady epoch in the new hooks (Throughput's "hooks" account: Throughput,
EarlyStopping, Profile), as a fraction of the epoch: a bound free of the machine's noise
on their host cost (the health metrics' device cost shows only in the ratio).

Run: python bench/hooks_overhead.py [--repeats 3] [--epochs 4] [--num-train 48000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jaxnets_cnn  # noqa: E402
import workload  # noqa: E402


def health_step_ratio(rounds: int = 15, steps: int = 10) -> dict:
    """The seed CNN's jitted step with and without the health metrics, interleaved: the
    minimum over `rounds` of `steps` steps each (minima are robust to a busy machine)."""
    import time

    import jax

    from jaxnets import adapters, data, losses, optim, train
    from jaxnets.models import MnistCNN

    x, y, _, _, _ = workload.load_cnn_data(workload.BATCH, 10)
    schedule = optim.inverse_time_decay(workload.LEARNING_RATE, workload.DECAY)
    tx = optim.sgd(schedule, momentum=workload.MOMENTUM, nesterov=True)
    objective = adapters.linen(
        MnistCNN(),
        loss=lambda logits, t: losses.softmax_cross_entropy(logits, t, reduction="none"),
        preprocess=lambda v, keys: data.normalize(v),
    )
    batch = {"image": x[: workload.BATCH], "label": y[: workload.BATCH]}
    state = train.create_train_state(objective.init, tx, batch, key=jax.random.key(0))
    fns = {
        h: jax.jit(train.make_train_step(objective.loss_fn, tx, health=h, learning_rate=schedule))
        for h in (False, True)
    }
    for fn in fns.values():  # compile and warm up
        jax.block_until_ready(fn(state, batch))
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for h, fn in fns.items():
            s, start = state, time.perf_counter()
            for _ in range(steps):
                s, _metrics = fn(s, batch)
            jax.block_until_ready(s)
            best[h] = min(best[h], time.perf_counter() - start)
    return {
        "step_ms": {"plain": 1e3 * best[False] / steps, "health": 1e3 * best[True] / steps},
        "health_step_ratio": best[True] / best[False],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-train", type=int, default=workload.NUM_TRAIN)
    parser.add_argument("--num-val", type=int, default=workload.NUM_VAL)
    args = parser.parse_args(argv)
    common = [
        "--epochs",
        str(args.epochs),
        "--num-train",
        str(args.num_train),
        "--num-val",
        str(args.num_val),
    ]
    runs: dict = {"base": [], "all": []}
    epochs_s: dict = {"base": [], "all": []}
    hook_fraction = []
    for _ in range(args.repeats):
        for variant in ("base", "all"):
            res = jaxnets_cnn.main([*common, "--hooks", variant])
            steady = res["epoch_s"][2:] or res["epoch_s"][-1:]
            runs[variant].append(statistics.median(steady))
            epochs_s[variant].append(res["epoch_s"])
            if variant == "all":
                cumulative = res["hook_seconds"]
                per_epoch = [b - a for a, b in zip(cumulative[1:], cumulative[2:])]
                hook_fraction += [h / e for h, e in zip(per_epoch, res["epoch_s"][2:])]
    health = health_step_ratio()
    base, full = statistics.median(runs["base"]), statistics.median(runs["all"])
    pairs = [a / b for a, b in zip(runs["all"], runs["base"])]
    host = statistics.median(hook_fraction) if hook_fraction else float("nan")
    result = {
        "steady_epoch_s": runs,
        "epoch_s": epochs_s,
        "median_base_s": base,
        "median_all_s": full,
        "ratio_of_medians": full / base,
        "paired_ratios": pairs,
        "feature_hooks_host_fraction_per_epoch": hook_fraction,
        **health,
        "epochs": args.epochs,
        "num_train": args.num_train,
    }
    print(
        f"hooks 1-6 on the seed CNN ({args.num_train:,} images, {args.epochs} epochs, "
        f"{args.repeats} interleaved rounds): base {base:.3f} s/epoch, all {full:.3f} s/epoch, "
        f"ratio {full / base:.4f} (paired: {', '.join(f'{p:.3f}' for p in pairs)}); the new "
        f"hooks' host time: {100 * host:.2f}% of a steady epoch (median); the step with "
        f"health metrics / without (min of 15 interleaved rounds): "
        f"{health['health_step_ratio']:.4f} ({health['step_ms']['health']:.2f} vs "
        f"{health['step_ms']['plain']:.2f} ms)"
    )
    workload.emit(result)
    return result


if __name__ == "__main__":
    main()
