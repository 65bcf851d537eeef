"""Warm start: a new run from another run's parameters (and optionally its model state),
with a fresh optimiser and step 0.

Example:
    >>> state = train.create_train_state(objective.init, tx, sample, key=jax.random.key(0))
    >>> state = warm_start(state, tx, "runs/pretrain/checkpoints")   # its latest step
    >>> loop.fit(state, train.make_train_step(objective.loss_fn, tx), data, ...)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnets.engine import train
from jaxnets.runs import fingerprint

PARTS = ("params", "model_state")


def _spec(x: Any) -> str:
    return f"{np.dtype(x.dtype).name}{list(np.shape(x))}"


def tree_differences(source: Any, target: Any, *, prefix: str = "") -> list[str]:
    """The paths where two pytrees differ in structure, shape or dtype, one line each."""
    flat = lambda t: {
        prefix + jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(t)
    }
    s, t = flat(source), flat(target)
    lines = []
    for path in sorted(s.keys() | t.keys()):
        if path not in t:
            lines.append(f"  {path}: in the source, not in the new model")
        elif path not in s:
            lines.append(f"  {path}: in the new model, not in the source")
        elif _spec(s[path]) != _spec(t[path]):
            lines.append(f"  {path}: source {_spec(s[path])}, new model {_spec(t[path])}")
    return lines


def _checkpoint_dir(source: str | os.PathLike) -> Path:
    path = Path(source)
    if (path / "checkpoints").is_dir():  # a run's work directory
        path = path / "checkpoints"
    if not path.is_dir():
        raise FileNotFoundError(f"warm start: source={os.fspath(source)!r} is not a directory")
    return path.resolve()


def _target(tree: Any) -> Any:
    def one(x):
        sharding = getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(
            jax.devices()[0]
        )
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


def read_checkpoint(
    source: str | os.PathLike, like: dict[str, Any], *, step: int | None = None
) -> tuple[dict[str, Any], int]:
    """`{part: tree}` of the parts named in `like` (e.g. "params") of a jaxnets checkpoint,
    restored onto `like`'s shapes and shardings, each leaf's fingerprint verified.

    Args:
      source: a `Checkpointer` directory, or a run's work directory (its `checkpoints/`).
      like: `{"params": tree, ...}` of arrays or ShapeDtypeStructs: the layout wanted.
      step: the checkpoint step (default: the latest).

    Raises:
      FileNotFoundError: no such directory or step.
      ValueError: the trees differ (naming every differing path).
    """
    import orbax.checkpoint as ocp

    directory = _checkpoint_dir(source)
    manager = ocp.CheckpointManager(
        directory,
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
    )
    try:
        steps = sorted(manager.all_steps())
        if not steps or (step is not None and step not in steps):
            raise FileNotFoundError(
                f"warm start: no checkpoint {'' if step is None else f'step {step} '}in "
                f"{directory} (steps: {steps})"
            )
        step = steps[-1] if step is None else step
        saved = manager.item_metadata(step)["state"]
        lines = []
        for part, tree in like.items():
            if part not in saved:
                raise ValueError(f"warm start: the checkpoint in {directory} has no {part!r}")
            lines += tree_differences(saved[part], tree, prefix=part)
        if lines:
            raise ValueError(
                f"warm start from {directory} step {step}: the trees differ at\n"
                + "\n".join(lines)
                + "\nbuild the new model with the source's shapes (or warm start fewer parts)"
            )
        abstract = {part: _target(tree) for part, tree in like.items()}
        restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), abstract)
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    abstract, restore_args=restore_args, partial_restore=True
                ),
                meta=ocp.args.JsonRestore(),
            ),
        )
    finally:
        manager.close()
    tree, meta = dict(restored.state), restored.meta
    prints = {spec[0]: fp for spec, fp in zip(meta["leaves"], meta["fingerprint"])}
    paths_leaves = jax.tree_util.tree_leaves_with_path(tree)
    got = np.asarray(fingerprint.fingerprints([x for _, x in paths_leaves])).tolist()
    for (path, _), fp in zip(paths_leaves, got):
        key = "." + path[0].key + jax.tree_util.keystr(path[1:])  # the TrainState's path
        if prints.get(key) != fp:
            raise ValueError(
                f"warm start: checkpoint step {step} in {directory}: {key[1:]} differs from "
                "what was saved (corrupted); warm start from another step"
            )
    return tree, step


def warm_start(
    state: train.TrainState,
    tx: optax.GradientTransformation,
    source: Any,
    *,
    model_state: bool = False,
    step: int | None = None,
) -> train.TrainState:
    """`state` with another run's parameters, a fresh optimiser state and step 0.

    Args:
      state: the new run's initial state (`create_train_state`): the layout (shapes,
        dtypes, shardings) the parameters are restored onto; its key is kept.
      tx: the new run's optimiser; its state is `tx.init(params)` of the loaded
        parameters (nothing of the source's optimiser is used).
      source: a checkpoint directory (`Checkpointer`'s, or a run's work directory), or a
        `TrainState` (or anything with `.params` / `.model_state`).
      model_state: also take the source's model state (BatchNorm statistics); False keeps
        the new state's.
      step: the source checkpoint's step (default: its latest).

    Raises:
      ValueError: the source's trees differ from the new model's (every differing path
        named, with both shapes); FileNotFoundError: no checkpoint there.
    """
    parts = PARTS if model_state else PARTS[:1]
    like = {part: getattr(state, part) for part in parts}
    if hasattr(source, "params"):
        loaded = {part: getattr(source, part) for part in parts}
        lines = [line for p in parts for line in tree_differences(loaded[p], like[p], prefix=p)]
        if lines:
            raise ValueError(
                "warm start from the given state: the trees differ at\n" + "\n".join(lines)
            )
        loaded = jax.tree.map(lambda x, t: jnp.asarray(x, t.dtype), loaded, like)
    else:
        loaded, _ = read_checkpoint(source, like, step=step)
    params = loaded["params"]
    return train.TrainState(
        jnp.zeros((), jnp.int32),
        params,
        tx.init(params),
        loaded.get("model_state", state.model_state),
        state.key,
    )
