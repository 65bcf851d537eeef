"""jaxnets on the seed CNN workload (bench/workload.py), with the library's functional API.

Run: python bench/jaxnets_cnn.py [--conv-impl auto] [--steps-per-dispatch K] [--devices 1]
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
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workload  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--conv-impl", default="auto", choices=("auto", "native", "im2col", "xla"))
    parser.add_argument(
        "--steps-per-dispatch", type=int, default=None, help="default: the library's"
    )
    parser.add_argument("--devices", type=int, default=1, help="CPU devices (pmap over them)")
    parser.add_argument("--backend", default="pmap", choices=("pmap", "shard_map"))
    parser.add_argument("--epochs", type=int, default=workload.EPOCHS)
    parser.add_argument("--num-train", type=int, default=workload.NUM_TRAIN)
    parser.add_argument("--num-val", type=int, default=workload.NUM_VAL)
    parser.add_argument("--flops", action="store_true", help="report XLA's FLOPs of one step")
    parser.add_argument("--save-every", type=int, default=0, help="async checkpoint every N steps")
    parser.add_argument("--profile-dir", default=None, help="jax.profiler trace of epoch 2")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.devices > 1:  # must precede jax's first use
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={args.devices}"
        )
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxnets import checkpoint, data, losses, optim, parallel, train
    from jaxnets.models import MnistCNN
    from jaxnets.models.cnn import resolve_conv_impl

    train_x, train_y, val_x, val_y, source = workload.load_cnn_data(args.num_train, args.num_val)
    model = MnistCNN(conv_impl=args.conv_impl)
    tx = optim.sgd(
        optim.inverse_time_decay(workload.LEARNING_RATE, workload.DECAY),
        momentum=workload.MOMENTUM,
        nesterov=True,
    )
    state = train.create_train_state(
        model, tx, jnp.zeros((1, 28, 28, 1)), key=jax.random.key(workload.SEED)
    )
    preprocess = lambda x, keys: data.normalize(x)
    loss_fn = lambda logits, y: losses.softmax_cross_entropy(logits, y, reduction="none")
    dp = parallel.make_data_parallel(backend=args.backend, devices=args.devices)
    step = train.make_train_step(
        model.apply, loss_fn, tx, preprocess=preprocess, axis_name=dp.axis_name
    )
    run = train.make_epoch_runner(step, dp)
    evaluation = train.make_evaluation(
        train.make_eval_step(model.apply, loss_fn, preprocess=preprocess, axis_name=dp.axis_name),
        dp,
        val_x,
        val_y,
        batch_size=workload.BATCH,
    )

    extra = {}
    extra["conv_impl"] = resolve_conv_impl(args.conv_impl)
    if args.flops:
        # XLA counts no FLOPs inside custom calls (the native kernels): count those of the
        # im2col twin, the same arithmetic on the same parameters.
        twin = MnistCNN(conv_impl="xla" if extra["conv_impl"] == "xla" else "im2col")
        single = jax.jit(train.make_train_step(twin.apply, loss_fn, tx, preprocess=preprocess))
        batch = (jnp.asarray(train_x[: workload.BATCH]), jnp.asarray(train_y[: workload.BATCH]))
        cost = single.lower(state, batch).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        extra["step_flops"] = float(cost["flops"])

    state = dp.replicate(state)
    on_device = dp.replicate((train_x, train_y))
    data_key = jax.random.key(workload.SEED + 1)
    k = args.steps_per_dispatch or train.default_steps_per_dispatch()
    ckpt_dir = tempfile.mkdtemp(prefix="jaxnets-bench-ckpt-") if args.save_every else None
    ckpt = checkpoint.Checkpointer(ckpt_dir, max_to_keep=2) if ckpt_dir else None
    epoch_seconds = []
    done = 0
    for epoch in range(args.epochs):
        if args.profile_dir and epoch == 1:
            jax.profiler.start_trace(args.profile_dir)
        start = time.perf_counter()
        idx = train.epoch_indices(data_key, epoch, len(train_y), workload.BATCH)
        idx = dp.process_columns(idx)
        for lo in range(0, len(idx), k):
            state, metrics = run(state, on_device, dp.shard_columns(idx[lo : lo + k]))
            done += len(idx[lo : lo + k])
            if ckpt is not None and done % args.save_every == 0:
                ckpt.save(done, state, metadata={"epoch": epoch})
        jax.block_until_ready(state)
        epoch_seconds.append(time.perf_counter() - start)
        if args.profile_dir and epoch == 1:
            jax.profiler.stop_trace()
    if ckpt is not None:
        ckpt.close()
        shutil.rmtree(ckpt_dir)
    val = train.evaluate(evaluation, state.params)
    last = train.summarize(jax.tree.map(np.sum, jax.device_get(dp.unreplicate(metrics))))
    result = workload.cnn_result(
        epoch_seconds,
        len(train_y),
        val["accuracy"],
        last_step_loss=last["loss"],
        data=source,
        config=vars(args),
        jax_version=jax.__version__,
        devices=[str(d) for d in dp.devices],
        **extra,
    )
    workload.emit(result)
    return result


if __name__ == "__main__":
    main()
