"""A small CNN with BatchNorm and Dropout on scikit-learn's bundled 8x8 digits.

Run:
    python -m experiments.digits                         # 30 epochs, all devices
    python -m experiments.digits --epochs 5 --workdir runs/digits_short --devices 1

Data: `sklearn.datasets.load_digits()`, 1,797 real 8x8 images of handwritten digits (shipped
with scikit-learn, no download), pixels 0..16 scaled to [0, 1] as float32 `[n, 8, 8, 1]`,
labels int32. A shuffle seeded by `--seed`, then 20% test, 20% validation (`--test-split`,
`--validation-split`), the rest (1,079) for training. SGD with Nesterov momentum, batch 64.

Expected (measured with the defaults on a 2-core CPU, 1 device): test accuracy 0.989,
top-3 accuracy 1.000, test loss 0.050, validation accuracy 0.975 (30 epochs, 480 steps, the
default `steps_per_dispatch` measures single steps as the faster), in 17 s wall time.

Several devices: the step is a function of the global batch (jitted over a mesh), so
BatchNorm normalises with the statistics of the whole global batch and Dropout draws its
mask for the global batch, with no axis name in the model: a run on N devices equals the
1-device run to float rounding, dropout on (tested).

Options of the run (tested): `--ema-decay 0.99` keeps an exponential moving average of the
parameters (`jaxnets.core.ema`), validated (`val_ema_*`) and tested (`test_ema` in summary.json)
next to the parameters themselves; `--microbatches 2` accumulates the gradient of each batch
over 2 micro-batches (`jaxnets.core.accumulation`: BatchNorm then normalises each micro-batch by
its own statistics); `--warm-start runs/digits` starts a fresh run from that run's parameters
(`--warm-start-model-state`: and its BatchNorm statistics) with a fresh optimiser at step 0.

The work directory holds config.json, metrics.jsonl, TensorBoard events (tb/), curves.png,
summary.json and checkpoints/; running the same command again resumes from the last
checkpoint (bit-identical to an uninterrupted run on the same devices) or says the run has
finished; `--restart` starts over.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import flax.linen as nn
import jax
import numpy as np
import optax

from jaxnets import adapters, cli, ema, evaluation, hooks, losses, optim, run, sharding, train
from jaxnets import metrics as jmetrics
from jaxnets.core.checks import FRACTION, TRAINING_CHECKS
from jaxnets.runs.config import config_to_dict, errors_in_flags

log = logging.getLogger("jaxnets.digits")

# Changing any of these changes the result: a run with different values cannot resume.
RESULT_FIELDS = (
    "batch_size",
    "learning_rate",
    "momentum",
    "nesterov",
    "weight_decay",
    "dropout_rate",
    "batch_norm_momentum",
    "validation_split",
    "test_split",
    "seed",
    "ema_decay",
    "microbatches",
)


@dataclasses.dataclass(frozen=True)
class Config(run.RunConfig):
    epochs: int = 30
    batch_size: int = dataclasses.field(default=64, metadata={"help": "global batch"})
    learning_rate: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = dataclasses.field(default=1e-4, metadata={"help": "decoupled L2"})
    dropout_rate: float = dataclasses.field(
        default=0.3, metadata={"help": "before the last layer (0: off, device-count independent)"}
    )
    batch_norm_momentum: float = dataclasses.field(
        default=0.9, metadata={"help": "decay of BatchNorm's running averages"}
    )
    validation_split: float = 0.2
    test_split: float = 0.2
    seed: int = 0
    ema_decay: float = dataclasses.field(
        default=0.0,
        metadata={"help": "keep an EMA of the parameters (e.g. 0.99), validated and tested too"},
    )
    microbatches: int = dataclasses.field(
        default=1, metadata={"help": "gradient accumulation: micro-batches per optimiser step"}
    )
    log_every_steps: int = 8
    workdir: str = "runs/digits"

    CHECKS: ClassVar[dict] = {
        **TRAINING_CHECKS,
        "dropout_rate": FRACTION,
        "batch_norm_momentum": FRACTION,
    }


def get_config() -> Config:
    return Config()


def load_data(*, validation_split: float, test_split: float, seed: int) -> dict[str, dict]:
    """The digits as `{"train" | "validation" | "test": {"image": [n, 8, 8, 1], "label": [n]}}`.

    Images float32 in [0, 1] (pixels are 0..16), labels int32; the examples are shuffled
    with `np.random.default_rng(seed)`, then the first `test_split` of them are the test
    set, the next `validation_split` the validation set.
    """
    if not (0 <= validation_split and 0 <= test_split and validation_split + test_split < 1):
        raise ValueError(
            f"validation_split={validation_split}, test_split={test_split}: each must be >= 0 "
            "and together < 1, e.g. --validation-split 0.2 --test-split 0.2"
        )
    try:
        from sklearn import datasets
    except ImportError:
        raise ImportError(
            "experiments.digits reads the digits bundled with scikit-learn: "
            "pip install scikit-learn"
        ) from None
    digits = datasets.load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(test_split * len(labels)))
    n_val = int(round(validation_split * len(labels)))
    parts = np.split(order, [n_test, n_test + n_val])
    names = ("test", "validation", "train")
    return {name: {"image": images[ix], "label": labels[ix]} for name, ix in zip(names, parts)}


class DigitsCNN(nn.Module):
    """Conv 16 3x3, BN, relu; Conv 32 3x3, BN, relu; 2x2 max pool; Dense 64; Dropout; Dense 10."""

    dropout_rate: float = 0.3
    batch_norm_momentum: float = 0.9

    @nn.compact
    def __call__(self, x, train: bool):
        def norm(y):
            return nn.BatchNorm(use_running_average=not train, momentum=self.batch_norm_momentum)(y)

        x = nn.relu(norm(nn.Conv(16, (3, 3), use_bias=False)(x)))
        x = nn.relu(norm(nn.Conv(32, (3, 3), use_bias=False)(x)))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(10)(x)


def make_objective(config: Config) -> adapters.Objective:
    """The model's init, loss and eval functions: cross-entropy, accuracy and top-3."""
    model = DigitsCNN(config.dropout_rate, config.batch_norm_momentum)
    return adapters.linen(
        model,
        loss=lambda logits, y: losses.softmax_cross_entropy(logits, y, reduction="none"),
        metrics={"accuracy": jmetrics.accuracy, "top3_accuracy": jmetrics.top_k_accuracy(3)},
    )


def make_optimizer(config: Config) -> optax.GradientTransformation:
    tx = optim.sgd(
        config.learning_rate,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )
    return ema.with_ema(tx, config.ema_decay) if config.ema_decay else tx


@errors_in_flags
def main(config: Config) -> dict:
    """Trains, evaluates on the test split, writes the work directory; returns summary.json."""
    data = load_data(
        validation_split=config.validation_split, test_split=config.test_split, seed=config.seed
    )
    sizes = {name: len(split["label"]) for name, split in data.items()}
    log.warning("digits: %(train)d train, %(validation)d validation, %(test)d test", sizes)

    mesh = sharding.make_mesh(config.devices)
    sharding.check_batch(mesh, config.batch_size)
    objective = make_objective(config)
    tx = make_optimizer(config)
    train_step = train.make_train_step(
        objective.loss_fn,
        tx,
        microbatches=config.microbatches,
        health=config.health,
        learning_rate=config.learning_rate,
    )
    eval_step = train.make_eval_step(objective.eval_fn)
    # With --ema-decay, the average is validated and tested too (val_ema_*, test_ema).
    eval_steps = {"": eval_step}
    if config.ema_decay:
        eval_steps["_ema"] = ema.ema_eval_step(eval_step)
    validate = [
        hooks.Evaluate(step, data["validation"], batch_size=config.batch_size, prefix=f"val{s}_")
        for s, step in eval_steps.items()
        if sizes["validation"]
    ]

    init_key, data_key = jax.random.split(jax.random.key(config.seed))
    sample = jax.tree.map(lambda x: x[:1], data["train"])
    state = train.create_train_state(objective.init, tx, sample, key=init_key)
    steps_per_epoch = sizes["train"] // config.batch_size

    with run.open_run(
        config,
        config_to_dict(config),
        state,
        mesh,
        result_fields=RESULT_FIELDS,
        total_steps=config.epochs * steps_per_epoch,
        tx=tx,
    ) as work:
        result = work.fit(
            train_step,
            data["train"],
            data_key=data_key,
            epochs=config.epochs,
            batch_size=config.batch_size,
            hooks=validate,
        )
        summary = work.summarise(
            result, steps_per_epoch=steps_per_epoch, batch_size=config.batch_size
        )
        summary["dataset"] = {"name": "sklearn_digits", **sizes}
        for s, step in eval_steps.items():
            summary[f"test{s}"] = {}
            if sizes["test"]:
                test = evaluation.make_evaluation(
                    step, data["test"], batch_size=config.batch_size, mesh=mesh
                )
                summary[f"test{s}"] = evaluation.evaluate(test, result.state)
        summary["num_params"] = sum(x.size for x in jax.tree.leaves(result.state.params))
        work.finish(summary, title="DigitsCNN on scikit-learn digits", metric="accuracy")
    return summary


if __name__ == "__main__":
    cli.command_line(get_config, main, __doc__)
