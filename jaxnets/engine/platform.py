"""The backend JAX starts: a clear error when the one `JAX_PLATFORMS` asks for cannot start."""

from __future__ import annotations

import os

import jax

NO_BACKEND = (
    "JAX_PLATFORMS={requested!r} asks for a backend that cannot start here: {why}. Unset "
    "JAX_PLATFORMS (JAX then picks what this machine has) or set JAX_PLATFORMS=cpu to run on "
    "the CPU; for {requested!r}, run where it is available (`python -m jaxnets doctor` checks)"
)


def check_backend() -> None:
    """Starts JAX's backend now, turning its failure into an error naming the cause and fix.

    With `JAX_PLATFORMS=cuda` on a machine without a visible GPU, JAX skips the platform and
    then fails a bare `assert` (no message); a plugin that fails says only "Unable to
    initialize backend". Call before any work; a no-op once a backend runs.
    """
    try:
        jax.devices()
    except (AssertionError, RuntimeError) as e:
        requested = getattr(jax.config, "jax_platforms", None) or os.environ.get(
            "JAX_PLATFORMS", ""
        )
        if not requested:
            raise
        why = str(e).strip() or (
            f"no device of the platform(s) {requested!r} is visible (for cuda: no NVIDIA GPU "
            "or driver, see nvidia-smi)"
        )
        raise RuntimeError(NO_BACKEND.format(requested=requested, why=why)) from None
