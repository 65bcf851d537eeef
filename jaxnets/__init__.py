"""jaxnets: a small functional JAX/Flax/Optax training toolkit."""

from jaxnets import (
    accumulation,
    adapters,
    checkpoint,
    config,
    data,
    ema,
    evaluation,
    feeds,
    hooks,
    loop,
    losses,
    metrics,
    models,
    monitoring,
    optim,
    pmap,
    regularizers,
    serving,
    sharding,
    sweep,
    train,
    warmstart,
    writers,
)
from jaxnets.adapters import Objective
from jaxnets.checkpoint import Checkpointer
from jaxnets.ema import with_ema
from jaxnets.evaluation import evaluate, make_evaluation
from jaxnets.hooks import (
    Checkpoint,
    EarlyStopping,
    Evaluate,
    Hook,
    Log,
    NonFinite,
    Periodic,
    Preemption,
    Progress,
)
from jaxnets.loop import Chunks, fit
from jaxnets.models import MnistCNN, TwoLayerSigmoid
from jaxnets.monitoring import Profile, Throughput
from jaxnets.optim import inverse_time_decay, sgd
from jaxnets.preemption import PreemptionGuard
from jaxnets.regularizers import (
    add_decoupled_weight_decay,
    kernel_mask,
    l1_penalty,
    l1_proximal,
    l2_penalty,
    sparsity,
)
from jaxnets.serving import predict
from jaxnets.sharding import fsdp, make_mesh, replicated
from jaxnets.train import (
    TrainState,
    create_train_state,
    make_epoch_runner,
    make_eval_step,
    make_train_step,
)
from jaxnets.warmstart import warm_start

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "Checkpointer",
    "Chunks",
    "EarlyStopping",
    "Evaluate",
    "Hook",
    "Log",
    "NonFinite",
    "MnistCNN",
    "Objective",
    "Periodic",
    "Preemption",
    "PreemptionGuard",
    "Profile",
    "Progress",
    "Throughput",
    "TrainState",
    "TwoLayerSigmoid",
    "accumulation",
    "adapters",
    "add_decoupled_weight_decay",
    "checkpoint",
    "config",
    "create_train_state",
    "data",
    "ema",
    "evaluate",
    "evaluation",
    "feeds",
    "fsdp",
    "hooks",
    "fit",
    "inverse_time_decay",
    "kernel_mask",
    "l1_penalty",
    "l1_proximal",
    "l2_penalty",
    "loop",
    "losses",
    "make_epoch_runner",
    "make_mesh",
    "make_eval_step",
    "make_evaluation",
    "make_train_step",
    "metrics",
    "models",
    "monitoring",
    "optim",
    "pmap",
    "predict",
    "regularizers",
    "replicated",
    "serving",
    "sharding",
    "sgd",
    "sparsity",
    "sweep",
    "train",
    "warm_start",
    "warmstart",
    "with_ema",
    "writers",
]
