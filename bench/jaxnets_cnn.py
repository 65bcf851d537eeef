"""jaxnets on the seed CNN workload (bench/workload.py), with the library's functional API.

Run: python bench/jaxnets_cnn.py [--conv-impl auto] [--steps-per-dispatch K] [--devices 1]
         [--input auto|resident|stream]
Trains through `jaxnets.fit` (the public engine); epoch times are fit's `epoch_seconds`.
Prints per-epoch seconds, images/s, validation accuracy after the last epoch, the convolution
implementation that ran and, with --flops, XLA's FLOP count of one train step (forward +
backward + update, batch 100; of the im2col twin when the native kernels run, whose FLOPs
XLA cannot see).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workload  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--conv-impl", default="auto", choices=("auto", "native", "im2col", "xla"))
    parser.add_argument(
        "--steps-per-dispatch", type=int, default=None, help="default: measured by loop.fit"
    )
    parser.add_argument("--devices", type=int, default=1, help="CPU devices (a mesh over them)")
    parser.add_argument("--epochs", type=int, default=workload.EPOCHS)
    parser.add_argument("--num-train", type=int, default=workload.NUM_TRAIN)
    parser.add_argument("--num-val", type=int, default=workload.NUM_VAL)
    parser.add_argument("--flops", action="store_true", help="report XLA's FLOPs of one step")
    parser.add_argument("--save-every", type=int, default=0, help="async checkpoint every N steps")
    parser.add_argument(
        "--input", default="auto", choices=("auto", "resident", "stream"), help="loop.fit's input"
    )
    parser.add_argument(
        "--hooks",
        default="none",
        choices=("none", "base", "all"),
        help="base: NonFinite, Log every 10 steps (JSONL), Evaluate and a Checkpoint at epoch "
        "ends; all: base + issue 27's health metrics, Throughput, best-2 checkpoints, "
        "EarlyStopping and a Profile window in the first epoch (bench/hooks_overhead.py)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.hooks != "none" and args.save_every:
        raise SystemExit("--hooks base/all save at epoch ends: leave out --save-every")
    if args.devices > 1:  # must precede jax's first use
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={args.devices}"
        )
    import jax

    from jaxnets import (
        adapters,
        checkpoint,
        data,
        evaluation,
        hooks,
        loop,
        losses,
        monitoring,
        optim,
        sharding,
        train,
        writers,
    )
    from jaxnets import metrics as jmetrics
    from jaxnets.models import MnistCNN
    from jaxnets.models.cnn import resolve_conv_impl

    train_x, train_y, val_x, val_y, source = workload.load_cnn_data(args.num_train, args.num_val)
    model = MnistCNN(conv_impl=args.conv_impl)
    schedule = optim.inverse_time_decay(workload.LEARNING_RATE, workload.DECAY)
    tx = optim.sgd(schedule, momentum=workload.MOMENTUM, nesterov=True)
    mesh = sharding.make_mesh(args.devices)

    def make_objective(module):
        return adapters.linen(
            module,
            loss=lambda logits, y: losses.softmax_cross_entropy(logits, y, reduction="none"),
            metrics={"accuracy": jmetrics.accuracy},
            preprocess=lambda x, keys: data.normalize(x),
        )

    objective = make_objective(model)
    sample = {"image": train_x[:1], "label": train_y[:1]}
    state = train.create_train_state(objective.init, tx, sample, key=jax.random.key(workload.SEED))
    health = args.hooks == "all"
    step = train.make_train_step(objective.loss_fn, tx, health=health, learning_rate=schedule)
    validation = evaluation.make_evaluation(
        train.make_eval_step(objective.eval_fn),
        {"image": val_x, "label": val_y},
        batch_size=workload.BATCH,
        mesh=mesh,
    )

    extra = {}
    extra["conv_impl"] = resolve_conv_impl(args.conv_impl)
    if args.flops:
        # XLA counts no FLOPs inside custom calls (the native kernels): count those of the
        # im2col twin, the same arithmetic on the same parameters.
        twin_impl = "xla" if extra["conv_impl"] == "xla" else "im2col"
        twin = make_objective(MnistCNN(conv_impl=twin_impl))
        single = jax.jit(train.make_train_step(twin.loss_fn, tx))
        batch = {"image": train_x[: workload.BATCH], "label": train_y[: workload.BATCH]}
        cost = single.lower(state, batch).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        extra["step_flops"] = float(cost["flops"])

    ckpt_dir = tempfile.mkdtemp(prefix="jaxnets-bench-ckpt-") if args.save_every else None
    ckpt = checkpoint.Checkpointer(ckpt_dir, max_to_keep=2) if ckpt_dir else None
    fit_hooks = []
    if ckpt is not None:
        fit_hooks.append(
            hooks.Periodic(lambda s, st: ckpt.save(s, st, metadata={}), every_steps=args.save_every)
        )
    meter = None
    if args.hooks != "none":
        work = tempfile.mkdtemp(prefix="jaxnets-bench-hooks-")
        every = dict(best_metric="val_loss", keep_best=2) if args.hooks == "all" else {}
        ckpt = checkpoint.Checkpointer(os.path.join(work, "ckpt"), max_to_keep=1, **every)
        ckpt_dir = work
        fit_hooks += [
            hooks.NonFinite(),
            hooks.Log(writers.JsonlWriter(os.path.join(work, "metrics.jsonl")), every_steps=10),
            hooks.Evaluate(
                train.make_eval_step(objective.eval_fn),
                {"image": val_x, "label": val_y},
                batch_size=workload.BATCH,
            ),
            hooks.Checkpoint(ckpt),
        ]
        if args.hooks == "all":
            meter = monitoring.Throughput(10)
            fit_hooks += [
                meter,
                hooks.EarlyStopping("val_loss", patience=1000),
                monitoring.Profile(os.path.join(work, "profile"), steps=(10, 20)),
            ]
    result_fit = loop.fit(
        state,
        step,
        {"image": train_x, "label": train_y},
        data_key=jax.random.key(workload.SEED + 1),
        epochs=args.epochs,
        batch_size=workload.BATCH,
        hooks=fit_hooks,
        mesh=mesh,
        input=args.input,
        steps_per_call=args.steps_per_dispatch,
    )
    state = result_fit.state
    jax.block_until_ready(state)
    epoch_seconds = [r["epoch_seconds"] for r in result_fit.history]
    extra["steps_per_call"] = result_fit.steps_per_call
    if meter is not None:
        extra["throughput"] = meter.summary()
        # The run's cumulative seconds in hooks not counted elsewhere, at each epoch's end.
        extra["hook_seconds"] = [r["seconds_hooks"] for r in result_fit.history]
    if ckpt is not None:
        ckpt.close()
        shutil.rmtree(ckpt_dir)
    val = evaluation.evaluate(validation, state)
    last = result_fit.history[-1]
    result = workload.cnn_result(
        epoch_seconds,
        len(train_y),
        val["accuracy"],
        last_step_loss=last["loss"],  # the last epoch's mean training loss
        data=source,
        config=vars(args),
        jax_version=jax.__version__,
        devices=[str(d) for d in mesh.devices.flat],
        **extra,
    )
    workload.emit(result)
    return result


if __name__ == "__main__":
    main()
