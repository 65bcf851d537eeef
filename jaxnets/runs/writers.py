"""Host-side writers: metrics.jsonl, TensorBoard events, PNG plots, tables, JSON."""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes JSON atomically (temp file + rename): a crash never leaves half a file.

    The temp file is named for the process, so processes writing the same file (test workers
    sharing a cache) never rename each other's half-written file.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a metrics.jsonl file; a torn line (crash mid-write) is skipped, not the
    records after it, and named in one warning unless it is the last line."""
    path = Path(path)
    if not path.exists():
        return []
    records, torn = [], []
    lines = path.read_text(errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif line.strip():
            torn.append(number)
    if torn and torn != [len(lines)]:  # a torn last line is what a crash leaves: expected
        warnings.warn(
            f"{path}: skipped {len(torn)} unreadable line(s) (line {', '.join(map(str, torn[:5]))}"
            f"{', ...' if len(torn) > 5 else ''}); the other {len(records)} records are kept",
            stacklevel=2,
        )
    return records


class JsonlWriter:
    """Appends one JSON record per line; on resume, drops records past `resume_step`.

    Args:
      path: the metrics.jsonl file.
      resume_step: when continuing a run from a checkpoint at this step, records logged
        after it (by the interrupted run) are removed so that no step appears twice.
    """

    def __init__(self, path: str | os.PathLike, *, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
            os.replace(tmp, self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a")  # noqa: SIM115 - closed in close()

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, sort_keys=True, default=_json_default) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardWriter:
    """TensorBoard event files through tensorboardX (no TensorFlow needed).

    Scalars go under `train/` or `epoch/` by the record's kind.

    Args:
      logdir: the events directory.
      resume_step: when continuing a run from a checkpoint at this step, TensorBoard is
        told (a SessionLog START at `resume_step + 1`) to drop what an interrupted run
        logged after it; the checkpoint step's own scalars are kept.
    """

    def __init__(self, logdir: str | os.PathLike, *, resume_step: int | None = None):
        from tensorboardX import SummaryWriter

        # TensorBoard purges every event at or after the START step: the step after the
        # checkpoint's, not the checkpoint's (whose scalars belong to the run being resumed).
        purge = None if resume_step is None else resume_step + 1
        # Event files are named for the second they were opened in: a resumed run opened in
        # the same second as the last one would truncate its file. The nanoseconds keep them
        # apart, in order (TensorBoard reads a directory's files in name order).
        suffix = f".{time.time_ns() % 10**9:09d}.{os.getpid()}"
        self._writer = SummaryWriter(
            str(logdir), purge_step=purge, flush_secs=10, filename_suffix=suffix
        )

    def write(self, record: dict) -> None:
        prefix = record.get("kind", "train")
        for name, value in record.items():
            if name in ("kind", "step", "epoch"):
                continue
            if isinstance(value, (int, float)):
                self._writer.add_scalar(f"{prefix}/{name}", value, record["step"])
            elif isinstance(value, (list, tuple)) and value:  # an array metric (a confusion)
                array = np.asarray(value, np.float64)
                self._writer.add_text(f"{prefix}/{name}", array_markdown(array), record["step"])
                if array.ndim == 2:
                    self._writer.add_image(
                        f"{prefix}/{name}", _heatmap(array), record["step"], dataformats="HW"
                    )

    def close(self) -> None:
        self._writer.close()


def array_markdown(array: np.ndarray) -> str:
    """An array metric as text: a markdown table for a matrix (rows by columns), else a list."""
    array = np.asarray(array)
    cell = lambda v: f"{v:.4g}"  # noqa: E731
    if array.ndim != 2:
        return " ".join(cell(v) for v in array.reshape(-1))
    head = "| |" + "".join(f" {j} |" for j in range(array.shape[1]))
    rule = "|---|" + "---|" * array.shape[1]
    rows = [f"| {i} |" + "".join(f" {cell(v)} |" for v in row) for i, row in enumerate(array)]
    return "\n".join([head, rule, *rows])


def _heatmap(array: np.ndarray) -> np.ndarray:
    """A matrix as a grey image in [0, 1] (each entry a 16x16 block; larger is brighter)."""
    finite = np.where(np.isfinite(array), array, 0.0)
    span = finite.max() - finite.min()
    scaled = (finite - finite.min()) / span if span > 0 else np.zeros_like(finite)
    return np.kron(scaled, np.ones((16, 16))).astype(np.float32)


def write_hparams(
    logdir: str | os.PathLike,
    sessions: Sequence[tuple[str, dict, dict]],
    *,
    step: int | None = None,
) -> None:
    """TensorBoard's HParams dashboard: one session per model, its hyperparameters and
    final metrics (tensorboardX's `add_hparams`).

    Each session is written to `logdir/<name>/` (an experiment, session start/end
    summaries, and each metric as a scalar at `step`); TensorBoard pointed at `logdir`
    shows them in its HPARAMS tab, one row per session.

    Args:
      logdir: the events directory (e.g. a sweep's `tb/`).
      sessions: `(name, hparams, metrics)` per model: `name` a directory name, `hparams`
        `{name: number | str | bool}`, `metrics` `{tag: float}` (tags unique in `logdir`,
        e.g. "hparam/val_loss", so they do not mix with training curves).
      step: the step the metrics were measured at.
    """
    from tensorboardX import SummaryWriter
    from tensorboardX.summary import hparams as hparams_summaries

    names = [name for name, _, _ in sessions]
    if len(set(names)) != len(names) or any(not n or "/" in n or n in (".", "..") for n in names):
        raise ValueError(f"sessions need distinct directory names without '/'; got {names}")
    for name, hparams, metrics in sessions:
        metrics = {k: float(v) for k, v in metrics.items()}
        # What `SummaryWriter.add_hparams` writes, without its extra empty writer on logdir.
        with SummaryWriter(str(Path(logdir) / name)) as writer:
            for summary in hparams_summaries(dict(hparams), metrics):
                writer.file_writer.add_summary(summary)
            for tag, value in metrics.items():
                writer.add_scalar(tag, value, step)


def plot_history(
    records: Iterable[dict],
    path: str | os.PathLike,
    *,
    title: str = "",
    names: Sequence[str] | None = None,
) -> None:
    """One panel per metric: train per log point, train and validation per epoch, as a PNG.

    Args:
      records: `fit`'s log records (`kind` "train" and "epoch").
      path: the PNG file.
      title: the figure title.
      names: the metrics to draw (default: `loss`, then every other metric the train
        records have, e.g. `accuracy`, a regression's `mae`, a user's own).
    """
    # A figure of its own with an Agg canvas: pyplot's global backend is left alone, so a
    # notebook's inline plots keep working after a run.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = list(records)
    logged = [r for r in records if r.get("kind") == "train"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    if names is None:
        found = {k for r in logged + epochs for k, v in r.items() if isinstance(v, (int, float))}
        found = {k.removeprefix("val_") for k in found} - {"step", "epoch", "epoch_seconds"}
        names = ["loss"] * ("loss" in found) + sorted(found - {"loss"})
    names = list(names) or ["loss"]
    fig = Figure(figsize=(5.5 * len(names), 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(names), squeeze=False)
    for ax, name in zip(axes[0], names):
        pts = [(r["step"], r[name]) for r in logged if name in r]
        if pts:
            ax.plot(*zip(*pts), lw=0.8, alpha=0.6, label=f"train {name} (per log interval)")
        for prefix, style in (("", "o-"), ("val_", "s-")):
            pts = [(r["step"], r[prefix + name]) for r in epochs if prefix + name in r]
            if pts:
                ax.plot(*zip(*pts), style, label=f"{prefix or 'train '}{name} (epoch)")
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        if name == "loss" and all(r["loss"] > 0 for r in logged + epochs if "loss" in r):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A markdown table of `rows` (floats with 4 significant digits)."""

    def cell(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def read_tensorboard_scalars(logdir: str | os.PathLike) -> dict[str, dict[int, float]]:
    """`{tag: {step: value}}` of every scalar in the event files under `logdir`.

    Reads the TFRecord frames with tensorboardX's protobufs (no TensorFlow, no TensorBoard);
    a later event for the same tag and step wins, as in TensorBoard.
    """
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        raw = path.read_bytes()
        pos = 0
        while pos + 12 <= len(raw):
            (length,) = struct.unpack("<Q", raw[pos : pos + 8])
            data = raw[pos + 12 : pos + 12 + length]
            pos += 12 + length + 4
            if len(data) < length:
                break  # a torn last record (crash mid-write)
            event = event_pb2.Event.FromString(data)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars
