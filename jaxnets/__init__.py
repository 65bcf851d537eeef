"""jaxnets: a small functional JAX/Flax/Optax training toolkit.

The library is three wings: `jaxnets.core` (the math: losses, metrics, optimisers,
regularisers), `jaxnets.engine` (the step, its programs on the devices, feeds, the loop and its
hooks) and `jaxnets.runs` (a run's bookkeeping on disk: work directory, checkpoints, logs,
configs); besides them `jaxnets.data` and `jaxnets.models`. Every module is also a name of the
package (`from jaxnets import train`), and the names most programs use are here too.
"""

from jaxnets import data, models
from jaxnets.core import (
    accumulation,
    checks,
    ema,
    losses,
    metrics,
    optim,
    regularizers,
    types,
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
    dispatch,
    evaluation,
    feeds,
    hooks,
    indices,
    inputs,
    loop,
    monitoring,
    platform,
    pmap,
    preemption,
    programs,
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
from jaxnets.engine.programs import make_epoch_program
from jaxnets.engine.serving import predict
from jaxnets.engine.sharding import fsdp, make_mesh, replicated
from jaxnets.engine.sweep import fit_sweep
from jaxnets.engine.train import TrainState, create_train_state, make_eval_step, make_train_step
from jaxnets.models import MnistCNN, TwoLayerSigmoid
from jaxnets.runs import (
    checkpoint,
    cli,
    config,
    fingerprint,
    lock,
    orbax_faults,
    run,
    sweep_results,
    warmstart,
    workdir,
    writers,
)
from jaxnets.runs.checkpoint import Checkpointer
from jaxnets.runs.run import open_run
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
    "MnistCNN",
    "NonFinite",
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
    "checks",
    "cli",
    "config",
    "create_train_state",
    "data",
    "dispatch",
    "ema",
    "evaluate",
    "evaluation",
    "feeds",
    "fingerprint",
    "fit",
    "fit_sweep",
    "fsdp",
    "hooks",
    "inputs",
    "inverse_time_decay",
    "kernel_mask",
    "l1_penalty",
    "l1_proximal",
    "l2_penalty",
    "lock",
    "loop",
    "losses",
    "make_epoch_program",
    "make_eval_step",
    "make_evaluation",
    "make_mesh",
    "make_train_step",
    "metrics",
    "models",
    "monitoring",
    "open_run",
    "optim",
    "orbax_faults",
    "indices",
    "platform",
    "pmap",
    "predict",
    "preemption",
    "programs",
    "regularizers",
    "replicated",
    "run",
    "serving",
    "sgd",
    "sharding",
    "sparsity",
    "sweep",
    "sweep_results",
    "train",
    "types",
    "warm_start",
    "warmstart",
    "with_ema",
    "workdir",
    "writers",
]
