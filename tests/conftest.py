"""Test setup: 8 fake CPU devices before jax initialises, so multi-device code runs on CPU."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")
# One XLA compilation cache for the test processes and the subprocesses they start: the suite
# compiles the same programs many times (a run and its resume, one tiny experiment in many
# tests), and compiling is much of its time.
# Entries are keyed by the program, the compile options and the jax version, so a cache kept
# between runs is never stale, and `rm -rf` of it is always safe. (No size bound: JAX needs
# the `filelock` package for one, and fails every cache read without it.)
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxnets-tests-xla-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
