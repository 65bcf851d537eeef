"""A training run in a work directory: config, metrics, checkpoints, resume and summary.

`open_run` does what every experiment does before and after `loop.fit`, so that an experiment
reads config, data, model, optimiser, state, fit, test:
- refuses an unwritable work directory now rather than at the first save;
- with `restart`, discards the directory's checkpoints and events (metrics.jsonl starts
  over); otherwise restores the latest checkpoint, after checking that the config fields
  that change the result are the saved run's, and says so, or that the run has finished;
- writes `config.json`, and opens `metrics.jsonl` and TensorBoard events (`tb/`) for
  appending, dropping what an interrupted run logged after the checkpoint it resumes from;
- trains with `Run.fit`: `loop.fit` with the run's hooks (the non-finite guard, JSONL and
  TensorBoard logs, the progress bar, checkpoints at epoch ends / every N steps / every T
  minutes / on SIGTERM, with the feed's position) and the run's flags;
- at the end writes `summary.json` and `curves.png`.
Only process 0 writes files; every process restores and saves (Orbax saves collectively).

Example:
    >>> @dataclasses.dataclass(frozen=True)
    ... class Config(run.RunConfig):        # the experiment's own fields, then the run's
    ...     epochs: int = 10
    ...     workdir: str = "runs/mine"
    >>> with run.open_run(config, config_dict, state, mesh, result_fields=FIELDS,
    ...                   total_steps=epochs * steps_per_epoch) as work:
    ...     result = work.fit(train_step, data, data_key=key, epochs=epochs, batch_size=batch,
    ...                       hooks=[hooks.Evaluate(eval_step, val_data, batch_size=batch)])
    ...     summary = work.summarise(result, steps_per_epoch=steps_per_epoch,
    ...                              batch_size=batch)
    ...     work.finish(summary, title="my run", metric="accuracy")
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import jax
import numpy as np

from jaxnets.core.checks import RUN_CHECKS, Rule
from jaxnets.engine import hooks as jhooks
from jaxnets.engine import loop, monitoring, sharding, train
from jaxnets.engine.platform import check_backend
from jaxnets.engine.preemption import PreemptionGuard
from jaxnets.runs import checkpoint as ckpt
from jaxnets.runs import fingerprint, writers
from jaxnets.runs.config import check_config
from jaxnets.runs.lock import WorkdirLock, claim_workdir
from jaxnets.runs.workdir import (
    START_FRESH,
    check_resumable,
    check_same_program,
    check_workdir_path,
    check_workdir_writable,
    discard_run,
    keep_previous_logs,
)

log = logging.getLogger("jaxnets.runs.run")

CHECKPOINTS = "checkpoints"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The flags of a run that are not the experiment's own: devices, cadences, checkpoints.

    An experiment's frozen `Config` subclasses it (and may override the defaults, e.g.
    `workdir`); none of these fields changes the numbers, so none is a result field.
    """

    devices: int | None = dataclasses.field(
        default=None, metadata={"help": "number of devices (default: all)"}
    )
    sharding: str = dataclasses.field(
        default="replicated",
        metadata={"help": "replicated | fsdp (parameters and optimiser state split over devices)"},
    )
    steps_per_dispatch: int | None = dataclasses.field(
        default=None, metadata={"help": "steps per device call (default: measured)"}
    )
    input: str = dataclasses.field(
        default="auto",
        metadata={"help": "resident | stream | auto (resident when the data fits with a margin)"},
    )
    log_every_steps: int = 10
    checkpoint_every_steps: int = dataclasses.field(
        default=0, metadata={"help": "also checkpoint every N steps (0: only at epoch ends)"}
    )
    checkpoint_every_minutes: float = dataclasses.field(
        default=10.0, metadata={"help": "wall-clock autosave (0: off)"}
    )
    keep_checkpoints: int = 3
    keep_best: int = dataclasses.field(
        default=0, metadata={"help": "also keep the N best checkpoints by best_metric (0: off)"}
    )
    best_metric: str = dataclasses.field(
        default="val_loss", metadata={"help": "an epoch record's metric, e.g. val_accuracy"}
    )
    best_mode: str = dataclasses.field(default="min", metadata={"help": "min | max"})
    early_stop_patience: int = dataclasses.field(
        default=0,
        metadata={"help": "stop after N epochs without best_metric improving (0: off)"},
    )
    early_stop_min_delta: float = dataclasses.field(
        default=0.0, metadata={"help": "an improvement must be larger than this"}
    )
    profile_steps: str = dataclasses.field(
        default="",
        metadata={"help": "a:b traces steps [a, b) with jax.profiler into <workdir>/profile"},
    )
    health: bool = dataclasses.field(
        default=False,
        metadata={"help": "log the gradient norm, parameter norm and learning rate"},
    )
    checkpoint: bool = dataclasses.field(default=True, metadata={"help": "save checkpoints"})
    restart: bool = dataclasses.field(
        default=False, metadata={"help": "discard the work directory's run and start fresh"}
    )
    warm_start: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "a fresh run starts from another run's parameters: its work directory "
            "(or checkpoints/); fresh optimiser, step 0 (a resumed run ignores it)"
        },
    )
    warm_start_model_state: bool = dataclasses.field(
        default=False,
        metadata={"help": "with warm_start, also take its model state (BatchNorm statistics)"},
    )
    progress: bool = True
    workdir: str = "runs/run"

    # Checked on construction (`config.check_config`); an experiment adds its own CHECKS.
    CHECKS: ClassVar[dict[str, Rule]] = RUN_CHECKS

    def __post_init__(self):
        check_config(self)
        monitoring.parse_steps(self.profile_steps)


# The `sharding` flag's rules.
RULES: dict[str, sharding.Rule] = {"replicated": sharding.replicated, "fsdp": sharding.fsdp()}

# Fields of an epoch record that are bookkeeping, not metrics.
_NOT_METRICS = ("kind", "epoch", "step", "epoch_seconds")


class Run:
    """An open work directory (from `open_run`); close it (or use `with`) to flush.

    Attributes:
      path: the work directory.
      config: the run's config dict, as written to config.json and into checkpoints.
      state: the state to train from: the restored checkpoint's, else the one given.
      start_step: the step `state` is at (0 for a fresh run).
      checkpointer: the `Checkpointer`, or None with checkpoints off.
      is_main: whether this process writes files.
    """

    def __init__(
        self,
        path: Path,
        config: dict,
        state: train.TrainState,
        start_step: int,
        checkpointer: ckpt.Checkpointer | None,
        flags: RunConfig | None = None,
        metadata: dict | None = None,
        *,
        mesh: Any = None,
        total_steps: int | None = None,
        lock: WorkdirLock | None = None,
    ):
        self.flags = flags or RunConfig(workdir=str(path))
        self.mesh = sharding.make_mesh() if mesh is None else mesh
        self.rule = RULES[self.flags.sharding]
        self.lock = lock
        self.guard = PreemptionGuard()
        self.path = path
        self.config = config
        self.state = state
        self.start_step = start_step
        self.checkpointer = checkpointer
        self.metadata = metadata or {}  # the restored checkpoint's
        self._data_fingerprint: dict | None = None  # of the data given to `fit`
        self.is_main = sharding.is_main_process()
        self._started = time.perf_counter()
        self.throughput: monitoring.Throughput | None = None
        self.early_stopping: jhooks.EarlyStopping | None = None
        self._sinks: list[Any] = []
        # A finished run trains nothing, so it opens no writer (and purges no event).
        if self.is_main and (total_steps is None or start_step < total_steps):
            resume = start_step or None
            self._sinks = [
                writers.JsonlWriter(path / "metrics.jsonl", resume_step=resume),
                writers.TensorBoardWriter(path / "tb", resume_step=resume),
            ]

    @property
    def fit_workdir(self) -> Path | None:
        """Where `loop.fit` records its steps-per-call choice (process 0)."""
        return self.path if self.is_main else None

    def hooks(self, *, epochs: int, nonfinite: str = "raise") -> list[jhooks.Hook]:
        """The run's hooks: the non-finite guard, throughput and time accounting, JSONL +
        TensorBoard logs and the progress bar (process 0), checkpoints (with the feed's
        position and the hooks' state; resumed from the restored one; the best N by a metric
        with `keep_best`), early stopping (`early_stop_patience`), the profiler window
        (`profile_steps`), and the stop signal (SIGTERM/SIGINT: save, then stop)."""
        flags = self.flags
        self.throughput = monitoring.Throughput(flags.log_every_steps)
        out: list[jhooks.Hook] = [
            jhooks.NonFinite(nonfinite),
            self.throughput,
            jhooks.Log(*self._sinks, every_steps=flags.log_every_steps, close=False),
            jhooks.Progress(epochs, disable=not (flags.progress and self.is_main)),
            jhooks.Preemption(self.guard),
        ]
        if flags.early_stop_patience:
            self.early_stopping = jhooks.EarlyStopping(
                flags.best_metric,
                mode=flags.best_mode,
                patience=flags.early_stop_patience,
                min_delta=flags.early_stop_min_delta,
            )
            out.append(self.early_stopping)
        steps = monitoring.parse_steps(flags.profile_steps)
        if steps is not None:
            out.append(monitoring.Profile(self.path / "profile", steps=steps))
        if self.checkpointer is not None:
            # With several processes the wall-clock cadence is off: each process's clock
            # could decide differently, and Orbax saves collectively.
            minutes = flags.checkpoint_every_minutes if jax.process_count() == 1 else 0.0
            out.append(
                jhooks.Checkpoint(
                    self.checkpointer,
                    every_steps=flags.checkpoint_every_steps,
                    every_seconds=60.0 * minutes,
                    metadata={"config": self.config, "data_fingerprint": self._data_fingerprint},
                    position=self.metadata.get("data"),
                    hook_state=self.metadata.get("hooks"),
                )
            )
        return out

    def fit(
        self,
        train_step: Callable,
        data: Any,
        *,
        data_key: Any,
        epochs: int,
        batch_size: int,
        hooks: Sequence[jhooks.Hook] = (),
        nonfinite: str = "raise",
        order: Callable | None = None,
    ) -> loop.FitResult:
        """`loop.fit` from the run's state, with the run's hooks, mesh, sharding rule and
        flags (input, steps per call), and `hooks` (e.g. `hooks.Evaluate`).

        The data's content fingerprint is saved with every checkpoint, and a resumed run whose
        data differs from the saved run's is refused (ValueError) before it trains.
        """
        self._data_fingerprint = _check_data(data, self.metadata.get("data_fingerprint"))
        return loop.fit(
            self.state,
            train_step,
            data,
            data_key=data_key,
            epochs=epochs,
            batch_size=batch_size,
            hooks=[*self.hooks(epochs=epochs, nonfinite=nonfinite), *hooks],
            mesh=self.mesh,
            rule=self.rule,
            input=self.flags.input,
            steps_per_call=self.flags.steps_per_dispatch,
            workdir=self.fit_workdir,
            order=order,
        )

    def records(self) -> list[dict]:
        """Everything metrics.jsonl holds (this run and the runs it resumed); [] off process 0."""
        return writers.read_jsonl(self.path / "metrics.jsonl") if self.is_main else []

    def summarise(self, result: loop.FitResult, *, steps_per_epoch: int, batch_size: int) -> dict:
        """The part of summary.json every run has; an experiment adds its data and test.

        `train` and `validation` are the last epoch's metrics (from metrics.jsonl, so a run
        resumed after its last epoch still reports them); speeds are medians over epochs
        after the first (which compiles); `wall_seconds` counts from `open_run`.
        """
        epochs = [r for r in self.records() if r.get("kind") == "epoch"]
        last = epochs[-1] if epochs else {}
        seconds = [r["epoch_seconds"] for r in epochs[1:]] or [r["epoch_seconds"] for r in epochs]
        steady = float(np.median(seconds)) if seconds else None
        step = int(np.asarray(jax.device_get(result.state.step)))
        devices = list(self.mesh.devices.flat)
        return {
            "config": self.config,
            "step": step,
            "epochs_completed": step // steps_per_epoch,
            "stopped_early": result.stopped_early,
            "stop_signal": self.guard.received if result.stopped_early else None,
            "train": {
                k: v for k, v in last.items() if k not in _NOT_METRICS and not k.startswith("val_")
            },
            "validation": {k[4:]: v for k, v in last.items() if k.startswith("val_")},
            "seconds_per_epoch_steady": steady,
            "examples_per_second": steps_per_epoch * batch_size / steady if steady else None,
            "wall_seconds": time.perf_counter() - self._started,
            "devices": {
                "kind": devices[0].device_kind,
                "platform": devices[0].platform,
                "count": len(devices),
                "processes": jax.process_count(),
                "sharding": self.flags.sharding,
            },
            "params_sha256": train.params_sha256(result.state.params),
            "throughput": self.throughput.summary() if self.throughput else {},
            **self._best_and_stopping(),
        }

    def _best_and_stopping(self) -> dict:
        out: dict = {}
        if self.early_stopping is not None:
            out["early_stopping"] = self.early_stopping.checkpoint_state()
        if self.checkpointer is not None and self.flags.keep_best:
            self.checkpointer.wait_until_finished()
            best = self.checkpointer.best_step()
            metrics = self.checkpointer.metrics(best) if best is not None else None
            out["best_checkpoint"] = {
                "step": best,
                self.flags.best_metric: (metrics or {}).get(self.flags.best_metric),
            }
        return out

    def finish(self, summary: Mapping[str, Any], *, title: str, metric: str) -> None:
        """Writes summary.json and curves.png (loss and `metric`) on process 0."""
        if self.is_main:
            writers.write_json(self.path / "summary.json", dict(summary))
            writers.plot_history(
                self.records(), self.path / "curves.png", title=title, names=("loss", metric)
            )

    def close(self) -> None:
        """Waits for the last checkpoint to be committed, closes the log files, unlocks."""
        try:
            if self.checkpointer is not None:
                self.checkpointer.close()
        finally:
            for sink in self._sinks:
                sink.close()
            self._sinks = []
            if self.lock is not None:
                self.lock.release()

    def __enter__(self) -> Run:
        self.guard.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.guard.__exit__(*exc)
        finally:
            self.close()


def open_run(
    flags: RunConfig,
    config: Mapping[str, Any],
    state: train.TrainState,
    mesh: Any = None,
    *,
    result_fields: Sequence[str],
    total_steps: int,
    tx: Any = None,
) -> Run:
    """Opens `workdir` for a run of `config`, resuming its latest checkpoint if there is one.

    Args:
      flags: the run's `RunConfig` (the experiment's config): `workdir` (created if
        missing), `checkpoint` (off: always a fresh run), `restart` (discard the directory's
        checkpoints and events), `keep_checkpoints`, `sharding`, and what `Run.fit` passes on.
      config: the run's JSON-serialisable config (`config.config_to_dict`), saved in
        config.json and in every checkpoint.
      state: the freshly initialised state (plain, on the host): the layout to restore into
        and the state to start from when there is no checkpoint.
      mesh: the devices (default: all); a restored state is placed on them by the
        `sharding` flag's rule (any device count, whatever the saving run used).
      result_fields: config fields that change the numbers; a checkpoint saved with other
        values is not resumed (ValueError naming each field and `--restart`).
      total_steps: the steps of the whole run, to say when the checkpoint has them all.
      tx: the optimiser; needed with `flags.warm_start` (a fresh run then starts from that
        run's parameters, `warmstart.warm_start`, with `tx.init` of them).

    Returns:
      The open `Run`; `run.state` is what to train from.
    """
    check_workdir_path(flags.workdir)  # '' (the current directory) before Path makes it '.'
    path = Path(flags.workdir)
    lock = claim(path)
    try:
        mesh = sharding.make_mesh() if mesh is None else mesh
        return _open(flags, config, state, mesh, result_fields, total_steps, path, lock, tx)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def claim(workdir: str | Path) -> WorkdirLock | None:
    """Checks that `workdir` can hold a run and takes its lock (`lock.WorkdirLock`).

    Process 0 owns the directory (the others may share its disk), so only it locks; a
    second run on the directory stops here with the other run's pid. An experiment calls it
    before loading data; `open_run` calls it again (the same lock) and releases it at close.
    """
    check_backend()  # a backend that cannot start says why before anything is written
    check_workdir_writable(workdir)
    return claim_workdir(workdir) if sharding.is_main_process() else None


def _open(flags, config, state, mesh, result_fields, total_steps, path, lock, tx) -> Run:
    if flags.restart:  # every process: each may have its own disk
        discard_run(path)  # refuses a directory holding files jaxnets did not write
    manager = None
    if flags.checkpoint:
        manager = ckpt.Checkpointer(
            path / CHECKPOINTS,
            max_to_keep=flags.keep_checkpoints,
            best_metric=flags.best_metric if flags.keep_best else None,
            best_mode=flags.best_mode,
            keep_best=max(1, flags.keep_best),
        )
    try:
        return _resume(
            flags, dict(config), state, mesh, result_fields, total_steps, path, lock, manager, tx
        )
    except BaseException:
        # Closed on every error path: a manager left open fails again at interpreter exit
        # ("cannot schedule new futures after interpreter shutdown"), after the real error.
        if manager is not None:
            with contextlib.suppress(Exception):
                manager.close()
        raise


def _resume(flags, config, state, mesh, result_fields, total_steps, path, lock, manager, tx) -> Run:
    start_step, meta = 0, None
    if manager is not None and manager.latest_step() is not None:
        state, meta, start_step = _restore(
            manager,
            state,
            mesh,
            RULES[flags.sharding],
            config,
            result_fields,
            path,
            _defaults(flags),
        )
        if start_step >= total_steps:
            log.info(
                "the run in %s has already finished (step %d of %d); to train on, raise "
                "epochs=<more than it had>; to start over, restart=True",
                path,
                start_step,
                total_steps,
            )
        else:
            log.info(
                "resuming from step %d of %d (%s)", start_step, total_steps, path / CHECKPOINTS
            )
    if flags.warm_start and start_step == 0:
        state = _warm_start(flags, state, tx, mesh)  # the caller closes the manager on error
    if manager is not None and start_step < total_steps:
        manager.check_space(state)  # a full disk is refused now, not after an epoch of training
    if sharding.is_main_process():
        if start_step == 0 and not flags.restart and (kept := keep_previous_logs(path, config)):
            log.warning("this run starts at step 0: the earlier run's logs are kept in %s", kept)
        writers.write_json(path / "config.json", config)
    return Run(
        path,
        config,
        state,
        start_step,
        manager,
        flags,
        meta,
        mesh=mesh,
        total_steps=total_steps,
        lock=lock,
    )


def _warm_start(flags: RunConfig, state: train.TrainState, tx: Any, mesh: Any) -> train.TrainState:
    from jaxnets.runs.warmstart import warm_start

    if tx is None:
        raise ValueError(
            f"warm_start={flags.warm_start!r} needs open_run(..., tx=the optimiser): the "
            "optimiser state starts fresh"
        )
    # Read straight onto the run's shardings (every process its own shards).
    state = sharding.place(state, sharding.state_shardings(state, mesh, RULES[flags.sharding]))
    state = warm_start(state, tx, flags.warm_start, model_state=flags.warm_start_model_state)
    log.warning("warm start from %s (step 0, fresh optimiser)", flags.warm_start)
    return state


def _defaults(flags: RunConfig) -> dict:
    """The config dict of the experiment's defaults: what a run saved before a field existed
    used (a new field's default keeps the old behaviour), so it still resumes."""
    from jaxnets.runs.config import config_to_dict

    try:
        return config_to_dict(type(flags)())
    except Exception:  # a config without defaults for every field
        return {}


def _restore(manager, state, mesh, rule, config, result_fields, path, defaults):
    with_defaults = lambda saved: {**defaults, **saved}
    shardings = sharding.state_shardings(state, mesh, rule)
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), state, shardings
    )
    try:
        state, meta, step = manager.restore(target)
    except ValueError as e:
        # A changed model size fails the layout check first: name the changed field instead.
        try:
            saved = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            saved = None
        problem = None
        if isinstance(saved, dict):
            try:  # short: without the layout's list, nor values filled in from defaults
                check_same_program(saved, config, path=path)
                check_resumable(with_defaults(saved), config, keys=result_fields)
            except ValueError as config_error:
                problem = config_error
        if problem is not None:
            raise problem from None
        raise ValueError(_with_flags(e)) from None
    except ckpt.CheckpointError as e:
        raise ckpt.CheckpointError(_with_flags(e)) from None
    check_resumable(with_defaults(meta["config"]), config, keys=result_fields)
    return state, meta, step


def _check_data(data: Any, saved: dict | None) -> dict:
    """The fingerprint of `data` to save, after checking it against the resumed run's."""
    sha, examples = fingerprint.data_fingerprint(data), _examples(data)
    if saved is not None:
        fingerprint.check_data_fingerprint(
            saved.get("sha"), sha, saved_examples=saved.get("examples"), examples=examples
        )
    return {"sha": sha, "examples": examples}


def _examples(data: Any) -> int | None:
    try:
        return (
            len(data)
            if hasattr(data, "__len__") and not isinstance(data, Mapping)
            else (len(jax.tree.leaves(data)[0]))
        )
    except (TypeError, IndexError):
        return None


def _with_flags(error: Exception) -> str:
    """A checkpoint error's message with the fix in the experiments' flags."""
    return str(error).replace(ckpt.START_FRESH, START_FRESH)
