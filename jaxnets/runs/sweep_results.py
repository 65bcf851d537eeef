"""A sweep's results read and shown: the best model, a table, a plot, TensorBoard's HParams view."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from jaxnets.engine.sweep import RESULT_COLUMNS, best_index
from jaxnets.runs import writers


def best(results: Mapping[str, Any], metric: str = "val_loss") -> dict:
    """The run (a dict of `results["runs"]`) with the best final `metric` (`best_index`)."""
    return results["runs"][best_index(results, metric)]


def write_hparams(results: Mapping[str, Any], logdir: str | os.PathLike) -> list[str]:
    """Every model of a sweep in TensorBoard's HParams dashboard (`writers.write_hparams`).

    Session `run<i>` per configuration: its hyperparameters (`seed` and every injected
    value) and its final metrics as `hparam/<name>` (loss, accuracy, val_loss...), at the
    run's last step. `tensorboard --logdir <logdir>`, tab HPARAMS: one row per model.

    Returns:
      The session names, in the order of `results["runs"]`.
    """
    runs = results["runs"]
    width = len(str(len(runs) - 1))
    names = [f"run{i:0{width}d}" for i in range(len(runs))]
    sessions = [
        (
            name,
            dict(run["config"]),
            {f"hparam/{k}": v for k, v in run["final"].items()},
        )
        for name, run in zip(names, runs)
    ]
    steps = [h[-1]["step"] for run in runs for h in [run["history"]] if h]
    writers.write_hparams(logdir, sessions, step=max(steps) if steps else None)
    return names


def format_results(results: Mapping[str, Any], metric: str | None = None) -> str:
    """A markdown table: one row per run, swept values, final metrics, best marked `*`."""
    metric = metric or results["metric"]
    winner = best_index(results, metric)
    axes = list(results["axes"]) or ["seed"]
    columns = ["run", *axes]
    columns += [c for c in RESULT_COLUMNS if c in results["runs"][0]["final"]]
    columns.append("best")
    rows = []
    for i, run in enumerate(results["runs"]):
        row = {"run": i, **{a: run["config"][a] for a in axes}, **run["final"]}
        row["best"] = "*" if i == winner else ""
        rows.append(row)
    return writers.format_table(rows, columns)


def plot_results(results: Mapping[str, Any], path: str | os.PathLike, *, title: str = "") -> None:
    """One PNG of every run's curves: train loss per log interval, validation loss per epoch.

    The best run (by `results["metric"]`) is drawn thick; a legend when there are <= 12 runs.
    """
    from matplotlib.figure import Figure  # lazy: plotting is optional for the library

    runs = results["runs"]
    winner = results["best"]
    has_val = "val_loss" in runs[0]["final"]
    fig = Figure(figsize=(12 if has_val else 6, 4))
    axes = fig.subplots(1, 2 if has_val else 1, squeeze=False)[0]
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for i, run in enumerate(runs):
        lw, alpha = (2.2, 1.0) if i == winner else (0.9, 0.7)
        label = run["label"] + (" (best)" if i == winner else "")
        pts = [(p["step"], p["loss"]) for p in run["curve"] if math.isfinite(p["loss"])]
        if pts:
            axes[0].plot(*zip(*pts), color=colors[i], lw=lw, alpha=alpha, label=label)
        if has_val:
            val = [(h["step"], h["val_loss"]) for h in run["history"]]
            val = [(s, v) for s, v in val if math.isfinite(v)]
            if val:
                axes[1].plot(*zip(*val), "o-", color=colors[i], lw=lw, alpha=alpha, label=label)
    axes[0].set(xlabel="step", ylabel="train loss (mean over log interval)", yscale="log")
    if has_val:
        axes[1].set(xlabel="step", ylabel="validation loss (per epoch)", yscale="log")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    if len(runs) <= 12:
        axes[-1].legend(fontsize=7)
    fig.suptitle(title or f"{len(runs)} models trained as one program")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
