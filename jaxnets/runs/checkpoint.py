"""Checkpoints: kill-safe Orbax saves of a training state with JSON metadata, verified restore.

The on-disk layout (readable with plain Orbax) is in the README, "Checkpoints on disk".
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from jaxnets.core.types import PyTree
from jaxnets.runs import fingerprint
from jaxnets.runs.orbax_faults import (
    await_background_cleanup,
    disk_bytes,
    disk_errors,
    silence_abandoned_reads,
)
from jaxnets.runs.workdir import check_free_space, check_workdir_writable

# The on-disk format name, in every checkpoint's metadata: not a module path (it did not move with
# the module), and changing it would refuse every checkpoint written before.
FORMAT = "jaxnets.checkpoint/1"
_STATE, _META = "state", "meta"
_QUARANTINE = "corrupted"
# The library's words (a run's `open_run` adds the experiments' flags).
START_FRESH = "To start fresh, train from a new state and save to an empty directory."


class CheckpointError(RuntimeError):
    """No readable checkpoint where one was expected (corrupted, truncated, or missing)."""


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _leaf_spec(x: Any) -> tuple[list[int], str]:
    if hasattr(x, "dtype") and hasattr(x, "shape"):
        return list(x.shape), str(x.dtype)
    return [], type(x).__name__


def _flatten_for_save(state: PyTree) -> tuple[PyTree, list[list[Any]]]:
    """Typed PRNG keys -> their raw uint32 data; returns the tree to save and its leaf specs."""
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    leaves, specs = [], []
    for path, x in paths_leaves:
        impl = None
        if _is_key(x):
            impl = str(jax.random.key_impl(x))
            x = jax.random.key_data(x)
        if not (isinstance(x, (jax.Array, np.ndarray, np.generic, int, float, bool))):
            raise ValueError(
                f"state leaf {jax.tree_util.keystr(path)} is a {type(x).__name__}; checkpoints "
                "hold arrays and Python scalars only (put other values in metadata=)"
            )
        leaves.append(x)
        specs.append([jax.tree_util.keystr(path), *_leaf_spec(x), impl])
    return jax.tree_util.tree_unflatten(treedef, leaves), specs


def _abstract_target(target: PyTree) -> tuple[PyTree, list[list[Any]]]:
    """The restore layout: ShapeDtypeStructs with the target's shardings, keys as raw data."""
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    leaves, specs = [], []
    for path, x in paths_leaves:
        impl = None
        if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
            sharding = getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(
                jax.devices()[0]
            )
            shape, dtype = x.shape, x.dtype
            if _is_key(x):
                data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype))
                impl = "?" if isinstance(x, jax.ShapeDtypeStruct) else str(jax.random.key_impl(x))
                shape, dtype = data.shape, data.dtype
            x = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        leaves.append(x)
        specs.append([jax.tree_util.keystr(path), *_leaf_spec(x), impl])
    return jax.tree_util.tree_unflatten(treedef, leaves), specs


def _layout_mismatch(saved: list[list[Any]], target: list[list[Any]]) -> list[str]:
    saved_by_path = {s[0]: s for s in saved}
    target_by_path = {t[0]: t for t in target}
    lines = []
    for path in sorted(saved_by_path.keys() | target_by_path.keys()):
        s, t = saved_by_path.get(path), target_by_path.get(path)
        if s is None:
            lines.append(f"  state{path}: not in the checkpoint")
        elif t is None:
            lines.append(f"  state{path}: in the checkpoint but not in the target")
        elif s[1:3] != t[1:3] or (s[3] is None) != (t[3] is None):
            lines.append(f"  state{path}: saved {_describe(s)}, target {_describe(t)}")
        elif t[3] not in (None, "?") and s[3] != t[3]:
            lines.append(f"  state{path}: saved PRNG impl {s[3]}, target {t[3]}")
    return lines


def _describe(spec: list[Any]) -> str:
    what = f"{spec[2]}{spec[1]}"
    return f"PRNG key ({spec[3]}) stored as {what}" if spec[3] else what


def _to_json(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"{what} must be JSON-serialisable (dicts, lists, str, int, float, bool, None): {e}; "
            "convert arrays with .tolist() or float()"
        ) from None


class Checkpointer:
    """Orbax-backed checkpoints of a training state, for `fit()` or a hand-written loop.

    Each checkpoint `<directory>/<step>/` holds the state pytree (arrays through Orbax,
    sharded as saved) and a JSON item with the caller's metadata, metrics, the leaf layout
    and a fingerprint of every leaf. A save is written to `<step>.orbax-checkpoint-tmp-*`
    and renamed when complete, so a process killed mid-save leaves no step that looks
    valid. `restore` checks the fingerprints, and if the latest step is unreadable it warns,
    moves it to `<directory>/corrupted/` and falls back to the previous one.

    Example:
        >>> with Checkpointer(workdir / "checkpoints", max_to_keep=3) as ckpt:
        ...     if ckpt.latest_step() is not None:
        ...         state, meta, step = ckpt.restore(state)
        ...     for step in range(step, num_steps):
        ...         state, metrics = train_step(state, batch(step))
        ...         ckpt.save(step + 1, state, metadata={"config": cfg})

    Args:
      directory: where the step directories live (created if missing).
      max_to_keep: how many of the most recent checkpoints to keep (None: all).
      best_metric: if set, the `keep_best` checkpoints with the best
        `metrics[best_metric]` are also kept, whatever their age (`hooks.Checkpoint` gives
        each epoch-end save the epoch record's numbers, e.g. "val_loss").
      best_mode: "min" or "max": which value of `best_metric` is best.
      keep_best: how many best checkpoints to keep (with `best_metric`).
      save_interval_steps: `save` only writes when `step % save_interval_steps == 0`
        (unless `force=True`); None writes every call.
      async_save: write in a background thread; `save` returns once the arrays are
        copied off the device.
      read_only: never write, delete or move anything (e.g. for an evaluator).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        best_metric: str | None = None,
        best_mode: str = "min",
        keep_best: int = 1,
        save_interval_steps: int | None = None,
        async_save: bool = True,
        read_only: bool = False,
    ):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(
                f"max_to_keep={max_to_keep} would delete every checkpoint; use >= 1 or None"
            )
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode={best_mode!r}; use 'min' or 'max'")
        if isinstance(keep_best, bool) or not isinstance(keep_best, int) or keep_best < 1:
            raise ValueError(f"keep_best={keep_best!r}; use an int >= 1")
        if save_interval_steps is not None and save_interval_steps < 1:
            raise ValueError(f"save_interval_steps={save_interval_steps}; use >= 1 or None")
        self.directory = os.path.abspath(os.fspath(directory))
        if not read_only:
            check_workdir_writable(self.directory)
        elif not os.path.isdir(self.directory):
            raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
        self._best_metric = best_metric
        self._interval = save_interval_steps
        self._read_only = read_only
        policies: list[Any] = [checkpoint_managers.LatestN(n=max_to_keep)]
        best_fn = None
        if best_metric is not None:
            best_fn = lambda metrics: float(metrics[best_metric])
            policies.append(
                checkpoint_managers.BestN(
                    get_metric_fn=best_fn,
                    reverse=best_mode == "min",
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            # best_fn makes Orbax store and reload the metrics that BestN ranks by.
            best_fn=best_fn,
            best_mode=best_mode,
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=(_STATE, _META), options=options
        )

    def all_steps(self) -> list[int]:
        """Steps of the committed checkpoints (and of an async save in flight), ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest step, or None if there is no checkpoint."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the best `best_metric` (the latest step if `best_metric` is None)."""
        return self._manager.best_step()

    def metrics(self, step: int) -> dict | None:
        """The metrics saved with checkpoint `step` (None if it has none)."""
        self._manager.wait_until_finished()
        meta = self._manager.restore(
            step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
        )[_META]
        return meta.get("metrics")

    def save(
        self,
        step: int,
        state: PyTree,
        *,
        metadata: Mapping[str, Any],
        metrics: Mapping[str, float] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves `state` at `step` (asynchronously unless `async_save=False`).

        Args:
          step: the training step the state is at (the number of updates applied).
          state: a pytree of arrays (any sharding), typed or raw PRNG keys, Python scalars.
          metadata: JSON-serialisable dict returned by `restore` (config, data position...).
          metrics: numbers stored with the checkpoint; `metrics[best_metric]` ranks it.
          force: save even if `step` is not a multiple of `save_interval_steps`.

        Returns:
          True if a save was started; False if skipped by the interval or because `step`
          is already saved (as happens right after a resume).
        """
        if self._read_only:
            raise ValueError(f"Checkpointer({self.directory!r}) is read_only; cannot save")
        step = int(step)
        if not force and self._interval is not None and step % self._interval:
            return False
        if step in self._manager.all_steps():
            return False
        metadata = _to_json(dict(metadata), "metadata")
        metrics = _to_json(dict(metrics), "metrics") if metrics is not None else None
        tree, specs = _flatten_for_save(state)
        prints = np.asarray(fingerprint.fingerprints(jax.tree.leaves(tree))).tolist()
        meta = {
            "format": FORMAT,
            "step": step,
            "metadata": metadata,
            "metrics": metrics,
            "leaves": specs,
            "fingerprint": prints,
        }
        self.check_space(tree, step=step)
        ranked = None
        if self._best_metric is not None and metrics is not None:
            value = metrics.get(self._best_metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                ranked = {self._best_metric: float(value)}
        with disk_errors(self.directory):
            return self._manager.save(
                step,
                args=ocp.args.Composite(
                    **{_STATE: ocp.args.StandardSave(tree), _META: ocp.args.JsonSave(meta)}
                ),
                metrics=ranked,
                force=True,
            )

    def check_space(self, state: PyTree, *, step: int | None = None) -> None:
        """Raises OSError(ENOSPC) now if the directory cannot hold another checkpoint of `state`.

        `save` checks before it writes anything, so a full disk stops a run with one message
        naming the directory and the space needed, the previous checkpoint untouched. The
        need is the larger of the latest checkpoint's size on disk and 1.25x this process's
        share of the state's bytes plus 64 KiB (metadata files, file-system blocks).
        """
        leaves = [x for x in jax.tree.leaves(state) if hasattr(x, "dtype")]
        data = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)
        need = int(1.25 * data / jax.process_count()) + 64 * 1024
        latest = self.latest_step()
        if latest is not None:
            need = max(need, disk_bytes(os.path.join(self.directory, str(latest))))
        what = "a checkpoint" if step is None else f"checkpoint step {step}"
        intact = f"; the previous checkpoint (step {latest}) is intact" if latest else ""
        check_free_space(self.directory, need, what=what, previous=intact)

    def restore(
        self, target: PyTree, *, step: int | None = None
    ) -> tuple[PyTree, dict[str, Any], int]:
        """Restores a checkpoint into the layout (shapes, dtypes, shardings) of `target`.

        With `step=None`, takes the latest step; if it is unreadable (files missing,
        truncated, or a fingerprint mismatch) it warns, moves it to
        `<directory>/corrupted/` and tries the previous one.

        Args:
          target: a pytree like the saved state, of arrays or `jax.ShapeDtypeStruct`s
            carrying the shardings wanted on the current devices (a struct without a
            sharding goes to device 0). Any device count works, whatever the saving
            run used.
          step: a specific step (no fallback if it is unreadable).

        Returns:
          `(state, metadata, step)`.

        Raises:
          FileNotFoundError: there is no checkpoint (or no checkpoint `step`).
          ValueError: the target's leaves differ from the checkpoint's (lists them).
          CheckpointError: no checkpoint could be read (lists each step's error).
        """
        self._manager.wait_until_finished()
        steps = self.all_steps()
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(
                    f"no checkpoint for step {step} in {self.directory}; steps: {steps}"
                )
            return (*self._restore_step(target, step), step)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        failures = []
        for s in reversed(steps):
            try:
                state, metadata = self._restore_step(target, s)
            except CheckpointError as e:
                failures.append((s, e))
                continue
            for bad, err in failures:
                where = self._quarantine(bad)
                warnings.warn(
                    f"checkpoint step {bad} in {self.directory} is unreadable ({err}); "
                    f"{where}; resuming from step {s}",
                    RuntimeWarning,
                    stacklevel=2,
                )
            if failures:
                self._manager.reload()
            return state, metadata, s
        details = "\n".join(f"  step {s}: {e}" for s, e in failures)
        raise CheckpointError(
            f"no readable checkpoint in {self.directory}:\n{details}\n"
            f"Nothing was deleted. {START_FRESH}"
        )

    def _restore_step(self, target: PyTree, step: int) -> tuple[PyTree, dict[str, Any]]:
        try:
            meta = self._manager.restore(
                step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
            )[_META]
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise ValueError(f"metadata is not a {FORMAT} record")
            saved = {
                spec[0]: (spec, fp)
                for spec, fp in zip(meta["leaves"], meta["fingerprint"], strict=True)
            }
        except Exception as e:  # any failure to read means a corrupt checkpoint
            raise CheckpointError(f"cannot read its metadata: {_short(e)}") from e
        abstract, target_specs = _abstract_target(target)
        mismatch = _layout_mismatch(meta["leaves"], target_specs)
        if mismatch:
            raise ValueError(
                f"checkpoint step {step} in {self.directory} does not fit the target state:\n"
                + "\n".join(mismatch)
                + f"\nRestore into a state built like the saved one. {START_FRESH}"
            )
        silence_abandoned_reads()  # before the read: they can report before it returns
        try:
            tree = self._manager.restore(
                step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract)})
            )[_STATE]
        except Exception as e:
            raise CheckpointError(f"cannot read its arrays: {_short(e)}") from e
        paths_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        got = np.asarray(fingerprint.fingerprints([x for _, x in paths_leaves])).tolist()
        paths = [jax.tree_util.keystr(p) for p, _ in paths_leaves]
        bad = [p for p, fp in zip(paths, got, strict=True) if saved[p][1] != fp]
        if bad:
            raise CheckpointError(
                f"its data differs from what was saved, in state{', state'.join(bad)}"
            )
        tree = jax.tree_util.tree_map_with_path(
            lambda p, x: (
                jax.random.wrap_key_data(x, impl=impl)
                if (impl := saved[jax.tree_util.keystr(p)][0][3])
                else x
            ),
            tree,
        )
        return tree, meta["metadata"]

    def _quarantine(self, step: int) -> str:
        if self._read_only or jax.process_index() != 0:
            return "left in place (read-only)"
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(self.directory, _QUARANTINE, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        if not os.path.lexists(src):
            return "its directory is gone (removed while this run read it)"
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            return "its directory is gone (removed while this run read it)"
        return f"moved to {dst}"

    def wait_until_finished(self) -> None:
        """Blocks until the pending async save is committed; re-raises its error if it failed.

        Safe inside a running asyncio event loop (a notebook cell): it joins Orbax's
        finalize thread and runs no event loop of its own.
        """
        with disk_errors(self.directory):
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Flushes the pending save and releases Orbax's threads, also when the save failed
        (its error is raised after): an open manager fails again at interpreter exit."""
        try:
            self.wait_until_finished()
        finally:
            await_background_cleanup(self._manager)
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".splitlines()[0]
    return text if len(text) < 200 else text[:200] + "..."
