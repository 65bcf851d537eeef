"""Keras 3 `model.fit` on the seed CNN workload (bench/workload.py); KERAS_BACKEND=jax by default.

Run: KERAS_BACKEND=jax .venv-bench/bin/python bench/keras_cnn.py [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workload  # noqa: E402

os.environ.setdefault("KERAS_BACKEND", "jax")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=workload.EPOCHS)
    parser.add_argument("--num-train", type=int, default=workload.NUM_TRAIN)
    parser.add_argument("--num-val", type=int, default=workload.NUM_VAL)
    args = parser.parse_args(argv)

    import keras
    import numpy as np

    keras.utils.set_random_seed(workload.SEED)
    train_x, train_y, val_x, val_y, source = workload.load_cnn_data(args.num_train, args.num_val)
    train_x = train_x.astype(np.float32) / 255.0
    val_x = val_x.astype(np.float32) / 255.0
    dense_init = keras.initializers.RandomNormal(stddev=0.05)
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(4, 5, activation="tanh"),
            keras.layers.Conv2D(8, 3, activation="tanh"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(16, 3, activation="tanh"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="tanh", kernel_initializer=dense_init),
            keras.layers.Dense(10, activation="softmax", kernel_initializer=dense_init),
        ]
    )
    schedule = keras.optimizers.schedules.InverseTimeDecay(
        workload.LEARNING_RATE, decay_steps=1, decay_rate=workload.DECAY
    )
    model.compile(
        optimizer=keras.optimizers.SGD(schedule, momentum=workload.MOMENTUM, nesterov=True),
        loss="sparse_categorical_crossentropy",  # categorical CE on integer labels
        metrics=["accuracy"],
    )

    timer = workload.keras_epoch_timer(keras)
    model.fit(
        train_x,
        train_y,
        batch_size=workload.BATCH,
        epochs=args.epochs,
        shuffle=True,
        verbose=0,
        callbacks=[timer],
    )
    _, val_accuracy = model.evaluate(val_x, val_y, batch_size=workload.BATCH, verbose=0)
    result = workload.cnn_result(
        timer.seconds,
        len(train_y),
        float(val_accuracy),
        data=source,
        keras_version=keras.__version__,
        keras_backend=keras.backend.backend(),
    )
    workload.emit(result)
    return result


if __name__ == "__main__":
    main()
