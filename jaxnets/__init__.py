"""jaxnets: a small functional JAX/Flax/Optax training toolkit."""

# The library is three wings: `core` (the math: losses, metrics, optimisers, regularisers),
# `engine` (the step, its programs on the devices, feeds, the loop and its hooks) and `runs`
# (a run's bookkeeping on disk: work directory, checkpoints, logs, configs); besides them
# `data` and `models`. Every module is also a name here: `from jaxnets import train`.
from jaxnets import data, models
from jaxnets.core import (
    accumulation,
    ema,
    losses,
    metrics,
    optim,
    regularizers,
)
from jaxnets.core.ema import with_ema
from jaxnets.core.optim import inverse_time_decay, sgd
from jaxnets.core.regularizers import (
    add_decoupled_weight_decay,
    kernel_mask,
    l1_penalty,
    l1_proximal,
    l2_penalty,
    sparsity,
)
from jaxnets.engine import (
    adapters,
    evaluation,
    feeds,
    hooks,
    loop,
    monitoring,
    pmap,
    serving,
    sharding,
    sweep,
    train,
)
from jaxnets.engine.adapters import Objective
from jaxnets.engine.evaluation import evaluate, make_evaluation
from jaxnets.engine.hooks import (
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
from jaxnets.engine.loop import Chunks, fit
from jaxnets.engine.monitoring import Profile, Throughput
from jaxnets.engine.preemption import PreemptionGuard
from jaxnets.engine.serving import predict
from jaxnets.engine.sharding import fsdp, make_mesh, replicated
from jaxnets.engine.train import (
    TrainState,
    create_train_state,
    make_epoch_runner,
    make_eval_step,
    make_train_step,
)
from jaxnets.models import MnistCNN, TwoLayerSigmoid
from jaxnets.runs import checkpoint, config, warmstart, writers
from jaxnets.runs.checkpoint import Checkpointer
from jaxnets.runs.warmstart import warm_start

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
