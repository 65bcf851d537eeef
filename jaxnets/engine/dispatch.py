"""Steps per device call: the candidates, and the measured choice with its records.

Scanning k steps in one call removes k - 1 launches and host round trips, which is what an
accelerator wants; on XLA:CPU some models (convolutions inside `lax.scan`) run many times
slower scanned. So `loop.fit` times a chunk of 1 and of k steps on a copy of the state
before training and keeps the faster. Scanning may round differently from single steps, so
the choice is recorded: in the work directory (a resumed run uses the choice of the run it
continues) and in the jaxnets cache, keyed by the compiled program and the devices (the same
command on the same machine makes the same choice).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxnets.data.cache import cache_write_failed, default_cache_dir
from jaxnets.engine import train

log = logging.getLogger("jaxnets.engine.loop")

CHOICE_FILE = "steps_per_call.json"
ROUNDS = 3  # measurement rounds of each chunk length, at most
DECISIVE = 1.25  # a ratio of times no neighbour's noise explains: stop measuring


def scan_candidates(devices: Sequence[Any]) -> int:
    """The scanned chunk length tried against single steps: 10 on CPU, 50 on GPU/TPU.

    Taken from the devices the steps run on. On CPU a user's `lax.conv` model can be many
    times slower inside `lax.scan` (PERF-NOTES), the seed CNN's native kernels faster: that
    is why the choice is measured, not assumed. On accelerators scanning removes the
    per-step launch and host round trip.
    """
    return 10 if devices[0].platform == "cpu" else 50


def _copy(tree):
    return jax.tree.map(lambda x: x.copy(), tree)


def _choice_key(program_text: str, devices: Sequence[Any], k: int) -> str:
    where = f"jit:{len(devices)}x{devices[0].platform}:{devices[0].device_kind}"
    digest = hashlib.sha256(f"{where}|{k}|{jax.__version__}|".encode() + program_text.encode())
    return digest.hexdigest()[:32]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, obj: dict) -> None:
    """Atomically (temp file + rename, named for the process): a crash or another process
    writing the same record never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _time_calls(program, state, chunks) -> float:
    """Seconds per step of running `chunks` (argument tuples; after one warm-up call)."""
    state = _copy(state)
    state, m = program(state, *chunks[0])
    jax.block_until_ready((state, m))
    t0 = time.perf_counter()
    steps = 0
    for args in chunks[1:]:
        state, m = program(state, *args)
        steps += jax.tree.leaves(args[-1])[0].shape[0]
    jax.block_until_ready((state, m))
    return (time.perf_counter() - t0) / max(steps, 1)


def _cache_dir() -> Path:
    return Path(default_cache_dir())


def choose_steps_per_call(
    compile_fn: Callable[[int], Callable],
    k: int,
    state: train.TrainState,
    chunk_args: Callable[[np.ndarray], tuple],
    idx: np.ndarray,
    devices: Sequence[Any],
    *,
    key_text: str,
    workdir: str | os.PathLike | None = None,
) -> int:
    """The faster of 1 and `k` steps per call, measured once and recorded.

    Looks first in `workdir` (the choice of the run being resumed), then in the cache
    (keyed by `key_text`, the one-step program's text, and the devices); only then compiles
    both lengths (`compile_fn(c)`) and measures, on copies of `state` (nothing of the run
    changes), and writes both records. `chunk_args(rows)` gives a program's arguments after
    the state for the steps `rows` (`[steps, batch]` example indices of this process).
    """
    programs = (1, k)
    cache_key = _choice_key(key_text, devices, k)
    record = Path(workdir) / CHOICE_FILE if workdir is not None else None
    if record is not None and (saved := _read_json(record)).get("steps_per_call") in programs:
        return int(saved["steps_per_call"])
    cache = _cache_dir() / CHOICE_FILE
    cached = _read_json(cache)
    if cached.get(cache_key, {}).get("steps_per_call") in programs:
        choice, how = int(cached[cache_key]["steps_per_call"]), "cached"
        times = cached[cache_key].get("seconds_per_step", {})
    else:
        rows = np.take(idx, np.arange(2 * k + 1) % len(idx), axis=0)  # wraps short epochs
        chunks = {c: [chunk_args(rows[i : i + c]) for i in range(0, k + c, c)] for c in programs}
        # Interleaved rounds, the fastest of each: a busy neighbour slows a round, not a choice.
        rounds: list[dict[str, float]] = []
        while len(rounds) < ROUNDS:
            rounds.append({str(c): _time_calls(compile_fn(c), state, chunks[c]) for c in programs})
            times = {c: min(r[c] for r in rounds) for c in rounds[0]}
            if max(times.values()) > DECISIVE * min(times.values()):
                break  # a clear winner: more rounds would not change it
        choice = min(programs, key=lambda c: times[str(c)])
        how = "measured"
        cached[cache_key] = {"steps_per_call": choice, "seconds_per_step": times}
        try:  # the cache only saves a measurement: an unwritable one never stops a run
            _write_json(cache, cached)
        except OSError as e:
            cache_write_failed(cache, e)
    log.info("steps per device call: %d (%s: %s s/step)", choice, how, times)
    if record is not None:
        _write_json(record, {"steps_per_call": choice, "seconds_per_step": times, "how": how})
    return choice
