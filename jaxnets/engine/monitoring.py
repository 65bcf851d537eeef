"""Monitoring hooks: throughput, time accounting, FLOPs and MFU (`Throughput`); a profiler
trace window (`Profile`).

Neither adds a wait for the devices: `Throughput` reads the clock when `fit` already waits
(metrics read back one chunk late) and the host seconds `loop.Context.seconds` counts; FLOPs
come from XLA's cost analysis of the compiled one-step program.

Example:
    >>> hooks = [monitoring.Throughput(every_steps=10), Log(JsonlWriter("m.jsonl"),
    ...          every_steps=10), monitoring.Profile("runs/x/profile", steps=(20, 30))]
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax

from jaxnets.engine.hooks import LOGGING, Hook, check_schedule

log = logging.getLogger("jaxnets.engine.monitoring")

# Dense bfloat16 peak FLOP/s of one JAX device (a GPU; a TPU chip, or a core where a core is
# the device: v2, v3), from the vendors' data sheets. MFU is against this peak whatever dtype
# the model computes in. Matched by the longest name contained in `device.device_kind`.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 70e12,
    "L4": 121e12,
    "T4": 65e12,
    "V100": 125e12,
    "TPU v2": 22.5e12,
    "TPU v3": 61.5e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}

# The per-run time components, in the order reports list them.
COMPONENTS = ("compile", "input", "device", "evaluation", "checkpoint", "logging", "hooks")


def peak_flops(device: Any) -> float | None:
    """The dense bf16 peak FLOP/s of `device` from `PEAK_FLOPS`, None when unknown (CPU)."""
    if device.platform == "cpu":
        return None
    kind = device.device_kind
    names = [name for name in PEAK_FLOPS if name.lower() in kind.lower()]
    return PEAK_FLOPS[max(names, key=len)] if names else None


def cost_flops(compiled: Any) -> float | None:
    """FLOPs of a compiled program by XLA's cost analysis (per device), None if absent."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # a backend without cost analysis
        return None
    cost = cost[0] if isinstance(cost, list) else cost
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops >= 0 else None


class Throughput(Hook):
    """Steps/s and examples/s per log window; time by component and FLOP/s (MFU) per run.

    Per window (the `Log` windows of the same `every_steps`, aligned in the epoch), the
    "train" records get `steps_per_second`, `examples_per_second` and, with FLOPs known,
    `flops_per_second` (all devices) and `mfu` (against the device's peak, `PEAK_FLOPS`;
    not on CPU). The rate of a window is measured between the host reads of its chunks'
    metrics, which `fit` does anyway; the first window starts after compilation.
    The epoch record gets the epoch's rates and the run's seconds so far by component
    (`seconds_compile`, `seconds_input`, `seconds_device`, `seconds_evaluation`,
    `seconds_checkpoint`, `seconds_logging`, `seconds_hooks`, `seconds_other` (the rest)
    and `seconds_total`); `summary()` gives them for the whole run.

    Args:
      every_steps: the window (use `Log`'s).
      flops_per_step: FLOPs of one step on all devices; None: XLA's cost analysis of the
        compiled step (custom calls, such as native kernels, count as 0).
      peak_flops_per_device: the peak to compute MFU against; None: `peak_flops(device)`.
    """

    every_steps, order = 1, LOGGING - 1  # before the loggers write the records it fills

    def __init__(
        self,
        every_steps: int = 10,
        *,
        flops_per_step: float | None = None,
        peak_flops_per_device: float | None = None,
    ):
        check_schedule(every_steps, 0.0)
        if every_steps < 1:
            raise ValueError(f"Throughput(every_steps={every_steps}); use an int >= 1")
        self.window, self.flops_per_step, self.peak = (
            every_steps,
            flops_per_step,
            peak_flops_per_device,
        )
        self.devices = 1
        self._mark: tuple[int, float] | None = None  # (step, time) the current window began
        self._epoch_mark: Any = None  # (step, clock) at the epoch's start
        self._totals: dict = {}

    def start(self, ctx: Any) -> None:
        devices = list(ctx.mesh.devices.flat)
        self.devices = len(devices)
        if self.peak is None:
            self.peak = peak_flops(devices[0])
        self._mark = self._epoch_mark = None
        self._totals = {}

    def _flops(self, ctx: Any) -> float | None:
        if self.flops_per_step is None:
            per_device = ctx.chunks.step_flops()
            self.flops_per_step = per_device * self.devices if per_device else 0.0
        return self.flops_per_step or None

    def _rates(self, steps: int, seconds: float, ctx: Any) -> dict:
        if steps <= 0 or seconds <= 0:
            return {}
        rate = steps / seconds
        out = {"steps_per_second": rate, "examples_per_second": rate * ctx.feed.batch_size}
        flops = self._flops(ctx)
        if flops:
            out["flops_per_second"] = flops * rate
            if self.peak:
                out["mfu"] = flops * rate / (self.peak * self.devices)
        return out

    def __call__(self, ctx: Any) -> None:
        if self._mark is None:  # the first read: the clock starts after compiling
            began = (ctx.chunks.compiled_at or ctx.started) - _busy(ctx)
            self._mark = self._epoch_mark = self._began = (ctx.step - ctx.length, began)
            self._flops(ctx)  # (compiles the one-step program if the run has none)
        now = time.perf_counter()
        clock = now - _busy(ctx)  # time not spent compiling, evaluating or saving
        spe = ctx.steps_per_epoch
        for first, metrics in ctx.new_metrics:
            last = first + len(jax.tree.leaves(metrics)[0])
            ends = [
                s
                for s in range(first + 1, last + 1)
                if (s % spe) % self.window == 0 or s % spe == 0
            ]
            if not ends:
                continue
            rates = self._rates(last - self._mark[0], clock - self._mark[1], ctx)
            for s in ends:
                ctx.window_fields[s] = rates
            if rates:
                ctx.status = {
                    "ex/s": rates["examples_per_second"],
                    **({"mfu": rates["mfu"]} if "mfu" in rates else {}),
                }
            self._mark = (last, clock)
        if ctx.record is not None:
            start, began = self._epoch_mark
            for s in [s for s in ctx.window_fields if s <= start]:  # no `Log` took them
                del ctx.window_fields[s]
            ctx.record.update(self._rates(ctx.step - start, clock - began, ctx))
            ctx.record.update(self._seconds(ctx, now))
            self._epoch_mark = (ctx.step, clock)

    def _seconds(self, ctx: Any, now: float) -> dict:
        seconds = {k: ctx.seconds.get(k, 0.0) for k in COMPONENTS}
        seconds["hooks"] += sum(v for k, v in ctx.seconds.items() if k not in COMPONENTS)
        total = now - ctx.started
        out = {f"seconds_{k}": v for k, v in seconds.items()}
        out["seconds_other"] = max(0.0, total - sum(seconds.values()))
        out["seconds_total"] = total
        return out

    def end(self, ctx: Any) -> None:
        if self._mark is None:
            return  # no step trained
        now = time.perf_counter()
        self._totals = self._seconds(ctx, now)
        first, began = self._began
        self._totals.update(self._rates(ctx.step - first, now - _busy(ctx) - began, ctx))
        self._totals["flops_per_step"] = self.flops_per_step or None

    def summary(self) -> dict:
        """The run's totals: seconds by component, steps/s, examples/s, FLOP/s, MFU."""
        return dict(self._totals)


class Profile(Hook):
    """Traces steps [a, b) with `jax.profiler` into `directory` (TensorBoard's profile
    plugin or Perfetto read it: `directory/plugins/profile/<run>/*.xplane.pb`).

    The trace starts at the first chunk boundary at or after step `a` (after compilation,
    which precedes the first chunk) and stops at the first boundary at or after `b`, once
    the devices finished those steps (one wait, at the stop).

    Args:
      directory: where the trace goes (created).
      steps: `(a, b)` with 0 <= a < b, global steps.
      perfetto: also write a Perfetto trace (`perfetto_trace.json.gz`).
    """

    every_steps = 1

    def __init__(self, directory: str | os.PathLike, *, steps: tuple[int, int], perfetto=False):
        a, b = steps
        if not (isinstance(a, int) and isinstance(b, int) and 0 <= a < b):
            raise ValueError(f"Profile(steps={steps!r}); use (a, b) with 0 <= a < b")
        self.directory, self.steps, self.perfetto = os.fspath(directory), (a, b), perfetto
        self.traced: tuple[int, int] | None = None  # the steps actually traced
        self._from: int | None = None

    def __call__(self, ctx: Any) -> None:
        a, b = self.steps
        if self._from is None and self.traced is None and a <= ctx.step < b:
            os.makedirs(self.directory, exist_ok=True)
            jax.profiler.start_trace(self.directory, create_perfetto_trace=self.perfetto)
            self._from = ctx.step
            log.warning("profiling from step %d into %s", ctx.step, self.directory)
        elif self._from is not None and ctx.step >= b:
            self._stop(ctx)

    def _stop(self, ctx: Any) -> None:
        jax.block_until_ready(ctx.state)
        jax.profiler.stop_trace()
        first = self._from if self._from is not None else ctx.step
        self.traced, self._from = (first, ctx.step), None
        log.warning("profiled steps [%d, %d) into %s", first, ctx.step, self.directory)

    def end(self, ctx: Any) -> None:
        if self._from is not None:
            self._stop(ctx)


def parse_steps(text: str) -> tuple[int, int] | None:
    """`"a:b"` -> `(a, b)`; "" -> None."""
    if not text:
        return None
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"profile steps {text!r}; write a:b, e.g. 20:30") from None
    if not 0 <= a < b:
        raise ValueError(f"profile steps {text!r}; need 0 <= a < b")
    return a, b


def _busy(ctx: Any) -> float:
    """Seconds the run spent compiling, evaluating and checkpointing so far."""
    return sum(ctx.seconds.get(k, 0.0) for k in ("compile", "evaluation", "checkpoint"))
