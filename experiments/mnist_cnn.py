"""The seed MNIST CNN (SEEDS.md section 2), trained data-parallel over every device.

Run:
    python -m experiments.mnist_cnn                      # the seed run on the default data
    python -m experiments.mnist_cnn --epochs 3 --augment --workdir runs/cnn_aug
    python -m experiments.mnist_cnn --dataset idx:/usr/share/datasets/fashion-mnist
    python -m experiments.mnist_cnn --dtype bfloat16     # mixed precision (GPU/TPU)
    python -m experiments.mnist_cnn --microbatches 4     # gradient accumulation
    python -m experiments.mnist_cnn --ema-decay 0.999    # + test metrics of the EMA
    python -m experiments.mnist_cnn --warm-start runs/mnist_cnn --workdir runs/finetune

Defaults are the seed's: SGD lr 0.05, momentum 0.9, Nesterov, Keras inverse-time decay 1e-6,
batch 100, 10 epochs, shuffled each epoch, the last 20% of the training set held out for
validation, seed 1024, categorical cross-entropy, float32. `--dtype bfloat16` computes in
bfloat16 while parameters, optimiser state, logits, losses and metric sums stay float32.
Expected: >= 94% test accuracy on the
bundled 5,000-digit MNIST sample (`auto` falls back to it offline), ~98-99% on full MNIST.

The work directory holds config.json, metrics.jsonl, TensorBoard events (tb/), curves.png,
summary.json and checkpoints/; running the same command again resumes from the last
checkpoint (bit-identical to an uninterrupted run on the same devices).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxnets import (
    adapters,
    cli,
    ema,
    evaluation,
    hooks,
    losses,
    optim,
    regularizers,
    run,
    sharding,
    train,
)
from jaxnets import data as jdata
from jaxnets import metrics as jmetrics
from jaxnets.core.checks import NONNEGATIVE, TRAINING_CHECKS, Rule
from jaxnets.data import augment as aug
from jaxnets.models.cnn import MnistCNN
from jaxnets.runs.config import config_to_dict, errors_in_flags

log = logging.getLogger("jaxnets.mnist_cnn")

# Changing any of these changes the result: a run with different values cannot resume.
RESULT_FIELDS = (
    "dataset",
    "batch_size",
    "learning_rate",
    "momentum",
    "nesterov",
    "decay",
    "weight_decay",
    "l1",
    "validation_split",
    "seed",
    "augment",
    "rotation_range",
    "width_shift_range",
    "height_shift_range",
    "horizontal_flip",
    "featurewise_normalization",
    "limit_train",
    "skip_nonfinite",
    "dtype",
    "dataset_used",
    "ema_decay",
    "microbatches",
)
# --dtype: the model's compute dtype. Parameters and optimiser state are always float32.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Config(run.RunConfig):
    dataset: str = dataclasses.field(
        default="auto", metadata={"help": "auto | mnist | fashion_mnist | mnist_sample | idx:DIR"}
    )
    data_dir: str | None = dataclasses.field(default=None, metadata={"help": "TFDS data dir"})
    epochs: int = 10
    batch_size: int = dataclasses.field(default=100, metadata={"help": "global batch"})
    learning_rate: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    decay: float = dataclasses.field(
        default=1e-6, metadata={"help": "Keras inverse-time decay: lr/(1+decay*step)"}
    )
    weight_decay: float = dataclasses.field(default=0.0, metadata={"help": "decoupled L2"})
    l1: float = dataclasses.field(default=0.0, metadata={"help": "proximal L1 strength"})
    skip_nonfinite: bool = dataclasses.field(
        default=False, metadata={"help": "skip updates with a non-finite gradient"}
    )
    validation_split: float = 0.2
    seed: int = 1024
    augment: bool = dataclasses.field(
        default=False, metadata={"help": "Keras ImageDataGenerator augmentation of the seed"}
    )
    rotation_range: float = 20.0
    width_shift_range: float = 0.2
    height_shift_range: float = 0.2
    horizontal_flip: bool = True
    featurewise_normalization: bool = dataclasses.field(
        default=True, metadata={"help": "with --augment: featurewise center + std"}
    )
    dtype: str = dataclasses.field(
        default="float32",
        metadata={"help": "compute dtype: float32 | bfloat16 (parameters stay float32)"},
    )
    ema_decay: float = dataclasses.field(
        default=0.0, metadata={"help": "keep an EMA of the parameters (e.g. 0.999), also tested"}
    )
    microbatches: int = dataclasses.field(
        default=1, metadata={"help": "gradient accumulation: micro-batches per optimiser step"}
    )
    limit_train: int | None = dataclasses.field(
        default=None, metadata={"help": "use only the first N training examples (smoke tests)"}
    )
    workdir: str = "runs/mnist_cnn"

    CHECKS: ClassVar[dict] = {
        **TRAINING_CHECKS,
        "rotation_range": NONNEGATIVE,
        "width_shift_range": NONNEGATIVE,
        "height_shift_range": NONNEGATIVE,
        "limit_train": Rule(int, low=1, optional=True),
        "dtype": Rule(str, choices=tuple(COMPUTE_DTYPES)),
    }


def get_config() -> Config:
    return Config()


def make_preprocess(config: Config, train_images: np.ndarray):
    """uint8 images -> float32 model inputs; random Keras augmentation when keys are given."""
    aug_config = aug.AugmentConfig(
        featurewise_center=config.featurewise_normalization,
        featurewise_std_normalization=config.featurewise_normalization,
        rotation_range=config.rotation_range,
        width_shift_range=config.width_shift_range,
        height_shift_range=config.height_shift_range,
        horizontal_flip=config.horizontal_flip,
    )
    stats = aug.fit_featurewise_stats(jdata.normalize(train_images)) if config.augment else None

    def preprocess(images, *, keys):
        x = jdata.normalize(images)
        if not config.augment:
            return x
        if keys is not None:  # Keras order: random transform, then standardize
            x = jax.vmap(lambda k, im: aug.random_transform(im[None], key=k, config=aug_config)[0])(
                keys, x
            )
        return aug.standardize(x, stats, aug_config)

    return preprocess


@errors_in_flags
def main(config: Config) -> dict:
    """Trains, evaluates on the test split, writes the work directory; returns summary.json."""
    run.claim(config.workdir)  # before loading any data: one run per directory

    # Data: host arrays, validation = the last fraction of the training split (Keras).
    train_set = jdata.load(config.dataset, split="train", data_dir=config.data_dir)
    test_set = jdata.load(train_set.info.name, split="test", data_dir=config.data_dir)
    images, labels = train_set.images, train_set.labels
    if config.limit_train:
        images, labels = images[: config.limit_train], labels[: config.limit_train]
    (x_train, y_train), (x_val, y_val) = jdata.split_validation(
        images, labels, config.validation_split
    )
    log.warning(
        "dataset: %s (%d train, %d val, %d test)",
        train_set.info.source,
        len(y_train),
        len(y_val),
        len(test_set.labels),
    )

    # Model, optimiser, steps.
    model = MnistCNN(dtype=COMPUTE_DTYPES[config.dtype])
    schedule = optim.inverse_time_decay(config.learning_rate, config.decay)
    tx = optim.sgd(
        schedule,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
        l1=config.l1,
    )
    if config.skip_nonfinite:
        import optax

        tx = optax.apply_if_finite(tx, max_consecutive_errors=10)
    if config.ema_decay:
        tx = ema.with_ema(tx, config.ema_decay)
    mesh = sharding.make_mesh(config.devices)
    sharding.check_batch(mesh, config.batch_size)
    objective = adapters.linen(
        model,
        loss=lambda logits, y: losses.softmax_cross_entropy(logits, y, reduction="none"),
        metrics={"accuracy": jmetrics.accuracy},
        preprocess=make_preprocess(config, x_train),
    )
    train_step = train.make_train_step(
        objective.loss_fn,
        tx,
        microbatches=config.microbatches,
        health=config.health,
        learning_rate=schedule,
    )
    eval_step = train.make_eval_step(objective.eval_fn)
    validate = (
        [
            hooks.Evaluate(
                eval_step,
                {"image": x_val, "label": y_val},
                batch_size=config.batch_size,
                input=config.input,
            )
        ]
        if len(y_val)
        else []
    )

    init_key, data_key = jax.random.split(jax.random.key(config.seed))
    state = train.create_train_state(
        objective.init, tx, {"image": x_train[:1], "label": y_train[:1]}, key=init_key
    )

    config_dict = config_to_dict(config)
    config_dict["dataset_used"] = train_set.info.name
    steps_per_epoch = len(y_train) // config.batch_size
    with run.open_run(
        config,
        config_dict,
        state,
        mesh,
        result_fields=RESULT_FIELDS,
        total_steps=config.epochs * steps_per_epoch,
        tx=tx,
    ) as work:
        result = work.fit(
            train_step,
            {"image": x_train, "label": y_train},
            data_key=data_key,
            epochs=config.epochs,
            batch_size=config.batch_size,
            hooks=validate,
            nonfinite="warn" if config.skip_nonfinite else "raise",
        )
        test_data = {"image": test_set.images, "label": test_set.labels}
        test_eval = evaluation.make_evaluation(
            eval_step, test_data, batch_size=config.batch_size, mesh=mesh, input=config.input
        )
        summary = work.summarise(
            result, steps_per_epoch=steps_per_epoch, batch_size=config.batch_size
        )
        summary["dataset"] = {
            "name": train_set.info.name,
            "source": train_set.info.source,
            "train": len(y_train),
            "validation": len(y_val),
            "test": len(test_set.labels),
        }
        summary["test"] = evaluation.evaluate(test_eval, result.state)
        if config.ema_decay:  # the parameter average on the test set
            summary["test_ema"] = evaluation.evaluate(test_eval, ema.swap(result.state))
        summary["sparsity"] = regularizers.sparsity(jax.device_get(result.state.params))
        work.finish(summary, title=f"MNIST CNN on {train_set.info.name}", metric="accuracy")
    return summary


if __name__ == "__main__":
    cli.command_line(get_config, main, __doc__)
