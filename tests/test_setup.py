"""The test environment itself: fake devices must be in place before anything else runs."""

import jax
import pytest


@pytest.mark.compat
def test_eight_fake_cpu_devices():
    assert jax.default_backend() == "cpu"
    assert jax.device_count() == 8, "tests/conftest.py must set XLA_FLAGS before jax initialises"
