"""Issue 26, the faults of round 3: each class's real failure mode, refused or survived."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent

# A tiny run through `run.open_run` + `loop.fit` in a fresh process (tests/test_refusals.py's
# `_tiny_run`), so that environment variables and signals are those of a real run.
TINY_RUN = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from test_refusals import _tiny_run
    result = _tiny_run({workdir!r}, epochs={epochs}, **{flags!r})
    print("STEP", int(result.state.step), flush=True)
    """
)


def _python(code, *, env=None, timeout=300, **popen):
    """Runs `code` in a fresh Python with the repository on its path; returns the process."""
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run(
        [sys.executable, "-c", code],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=popen.pop("cwd", ROOT),
        **popen,
    )


def _tiny_process(workdir, *, epochs=1, env=None, **flags):
    code = TINY_RUN.format(
        tests=str(ROOT / "tests"), workdir=str(workdir), epochs=epochs, flags=flags
    )
    return _python(code, env=env)


class TestCachesNeverStopARun:
    def test_a_home_that_cannot_hold_a_cache_costs_one_warning(self, tmp_path):
        """Before: NotADirectoryError from the steps-per-call record after the measurement."""
        path = tmp_path / "home"
        path.write_text("a file, not a directory")  # what an unwritable home also gives
        env = {"HOME": str(path), "XDG_CACHE_HOME": "", "JAXNETS_CACHE_DIR": ""}
        env = {k: v for k, v in env.items() if v} | {"JAXNETS_NATIVE_CONV": "0"}
        base = {
            k: v for k, v in os.environ.items() if k not in ("XDG_CACHE_HOME", "JAXNETS_CACHE_DIR")
        }
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                TINY_RUN.format(
                    tests=str(ROOT / "tests"),
                    workdir=str(tmp_path / "wd"),
                    epochs=1,
                    flags={"steps_per_dispatch": None},
                ),
            ],
            env=base | env | {"PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "STEP 6" in proc.stdout
        assert proc.stderr.count("the jaxnets cache is not writable") == 1, proc.stderr[-3000:]
        assert "JAXNETS_CACHE_DIR" in proc.stderr
        assert (tmp_path / "wd" / "steps_per_call.json").exists()  # the run's own record stays


def test_jax_platforms_without_its_device_names_the_cause_and_fix(tmp_path):
    """Before: a bare AssertionError from inside JAX's backend setup."""
    if Path("/dev/nvidia0").exists():
        pytest.skip("this machine has a GPU")
    code = "from jaxnets import run; run.claim({!r})".format(str(tmp_path / "wd"))
    proc = _python(code, env={"JAX_PLATFORMS": "cuda"})
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: JAX_PLATFORMS='cuda' asks for a backend"), last
    assert "JAX_PLATFORMS=cpu" in last and "AssertionError" not in proc.stderr
    assert not (tmp_path / "wd").exists()  # refused before the work directory
