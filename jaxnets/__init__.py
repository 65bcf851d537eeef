"""jaxnets: a small functional JAX/Flax/Optax training toolkit."""

from jaxnets import (
    adapters,
    checkpoint,
    config,
    data,
    loop,
    losses,
    metrics,
    models,
    optim,
    parallel,
    regularizers,
    sweep,
    train,
    writers,
)
from jaxnets.adapters import Objective
from jaxnets.checkpoint import Checkpointer
from jaxnets.loop import Periodic, evaluate, fit, make_evaluation
from jaxnets.models import MnistCNN, TwoLayerSigmoid
from jaxnets.optim import inverse_time_decay, sgd
from jaxnets.parallel import make_data_parallel
from jaxnets.preemption import PreemptionGuard
from jaxnets.regularizers import (
    add_decoupled_weight_decay,
    kernel_mask,
    l1_penalty,
    l1_proximal,
    l2_penalty,
    sparsity,
)
from jaxnets.train import (
    TrainState,
    create_train_state,
    make_epoch_runner,
    make_eval_step,
    make_train_step,
)

__version__ = "0.1.0"

__all__ = [
    "Checkpointer",
    "MnistCNN",
    "Objective",
    "Periodic",
    "PreemptionGuard",
    "TrainState",
    "TwoLayerSigmoid",
    "adapters",
    "add_decoupled_weight_decay",
    "checkpoint",
    "config",
    "create_train_state",
    "data",
    "evaluate",
    "fit",
    "inverse_time_decay",
    "kernel_mask",
    "l1_penalty",
    "l1_proximal",
    "l2_penalty",
    "loop",
    "losses",
    "make_data_parallel",
    "make_epoch_runner",
    "make_eval_step",
    "make_evaluation",
    "make_train_step",
    "metrics",
    "models",
    "optim",
    "parallel",
    "regularizers",
    "sgd",
    "sparsity",
    "sweep",
    "train",
    "writers",
]
