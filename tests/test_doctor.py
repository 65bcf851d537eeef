"""`python -m jaxnets doctor`: pins from the installed metadata, devices, data, warnings."""

from __future__ import annotations

import importlib
import json
import pathlib
import re
import sys

import jax
import pytest

from jaxnets import __main__ as cli

# The module, also when jaxnets/__init__.py re-exports the function as `jaxnets.doctor`.
doctor = importlib.import_module("jaxnets.doctor")

CONSTRAINTS = pathlib.Path(__file__).resolve().parents[1] / "jaxnets" / "constraints"


def _file_pins(name):
    lines = (CONSTRAINTS / f"{name}.txt").read_text().splitlines()
    pairs = [line.split("==") for line in lines if "==" in line and not line.startswith("#")]
    return {re.sub(r"[-_.]+", "-", n).lower(): v for n, v in pairs}


def test_pins_come_from_the_shipped_constraints_files_and_bounds_from_the_metadata():
    pins = doctor.pinned_versions()
    assert pins == _file_pins("pinned") and pins["jax"] == jax.__version__
    assert doctor.pinned_versions("colab") == _file_pins("colab")
    assert doctor.pinned_versions("colab")["jax"] == "0.7.2"
    bounds = doctor.lower_bounds()
    # The lower bounds are the Colab stack's versions: the oldest tested.
    for name in ("jax", "flax", "optax", "orbax-checkpoint", "numpy", "tensorflow-datasets"):
        assert bounds[name] == _file_pins("colab")[name], name
    assert "pytest" not in bounds  # runtime requirements only: no dev/cuda/tpu extras


def test_report_in_this_venv_has_installed_equal_to_pins_and_no_warnings(capsys):
    report = doctor.doctor()
    pins = _file_pins("pinned")
    for name in doctor.PACKAGES:
        info = report["packages"][name]
        assert info["pin"] == pins[name], name
        assert info["installed"] == pins[name] == doctor.installed_version(name), name
        assert info["ok"]
    native = report["native_conv"]
    # No warnings, except the missing compiler's on a machine without one (tested below).
    assert len(report["warnings"]) == (0 if native["available"] else 1), report["warnings"]
    assert report["tensorflow_installed"] is False
    assert "tensorflow" not in sys.modules  # checked without importing it
    assert report["devices"]["device_count"] == len(jax.devices()) == 8  # conftest's fake CPUs
    assert report["devices"]["devices"][0]["kind"] == jax.devices()[0].device_kind
    assert report["devices"]["process_count"] == 1
    assert report["data"]["bundled_sample_present"] is True
    out = capsys.readouterr().out
    assert f"jax                  {jax.__version__}" in out and "8 x cpu (cpu)" in out


def test_version_mismatches_warn_with_the_fix(monkeypatch):
    real = doctor.installed_version
    fake = {"flax": "0.11.5", "jaxlib": "0.10.1", "optax": "0.2.7", "grain": None}
    monkeypatch.setattr(doctor, "installed_version", lambda name: fake.get(name, real(name)))
    monkeypatch.setattr(doctor, "PACKAGES", (*doctor.PACKAGES, "grain"))
    report = doctor.doctor(print_report=False)
    assert report["packages"]["flax"] == {
        "installed": "0.11.5",
        "pin": "0.12.8",
        "colab": "0.11.2",
        "lower_bound": "0.11.2",
        "ok": False,
    }
    warnings = "\n".join(report["warnings"])
    assert (
        "flax 0.11.5 is neither the tested pin 0.12.8 nor the Colab stack's 0.11.2; if "
        "something breaks, pip install 'flax==0.12.8'" in warnings
    )
    assert (
        "optax 0.2.7 is older than jaxnets supports (>= 0.2.8); pip install -U 'optax>=0.2.8'"
        in warnings
    )
    assert "grain is not installed; pip install 'grain==" in warnings
    assert f"jax {jax.__version__} and jaxlib 0.10.1 differ" in warnings
    assert "MISMATCH" in doctor.format_report(report)


def test_the_colab_stack_is_tested_too(monkeypatch):
    real = doctor.installed_version
    colab = doctor.pinned_versions("colab")
    monkeypatch.setattr(doctor, "installed_version", lambda name: colab.get(name, real(name)))
    report = doctor.doctor(print_report=False)
    assert all(info["ok"] for info in report["packages"].values())
    assert not [w for w in report["warnings"] if "tested pin" in w or "older than" in w]
    text = doctor.format_report(report)
    line = "flax                 0.11.2     pin 0.12.8     colab 0.11.2     ok (Colab stack)"
    assert line in text


def test_accelerator_runtime_without_its_device_and_colab_tpu_import_warn(monkeypatch):
    real = doctor.installed_version
    monkeypatch.setattr(
        doctor, "installed_version", lambda n: "0.0.9" if n == "libtpu" else real(n)
    )
    monkeypatch.setitem(sys.modules, "jax.tools.colab_tpu", object())
    warnings = doctor.doctor(print_report=False)["warnings"]
    assert any(w.startswith("libtpu 0.0.9 is installed but jax runs on CPU") for w in warnings)
    assert doctor.COLAB_TPU_OBSOLETE in warnings


def test_native_conv_kernels_are_reported_and_their_absence_warns_with_the_fix(monkeypatch):
    from jaxnets.models import native_conv

    report = doctor.doctor(print_report=False)
    if native_conv.available():
        assert report["native_conv"] == {"available": True, "reason": "", "fix": ""}
        assert "native conv kernels (CPU): built" in doctor.format_report(report)
    monkeypatch.setattr(native_conv, "available", lambda: False)
    monkeypatch.setattr(native_conv, "unavailable_reason", lambda: "no C++ compiler 'g++'")
    monkeypatch.setattr(native_conv, "unavailable_fix", lambda: native_conv.FIX_COMPILER)
    report = doctor.doctor(print_report=False)
    assert report["native_conv"] == {
        "available": False,
        "reason": "no C++ compiler 'g++'",
        "fix": native_conv.FIX_COMPILER,
    }
    assert (
        "the C++ convolution kernels are unavailable (no C++ compiler 'g++'), so MnistCNN uses "
        "im2col on CPU, 1.3-1.8x slower; install g++" in report["warnings"][0]
    )
    assert "native conv kernels (CPU): unavailable: no C++ compiler 'g++'" in (
        doctor.format_report(report)
    )


def test_without_the_constraints_files_the_tested_versions_are_unknown(monkeypatch):
    monkeypatch.setattr(doctor, "pinned_versions", lambda stack="pinned": {})
    report = doctor.doctor(print_report=False)
    assert report["packages"]["jax"]["pin"] is None
    assert any("constraints files" in w and "reinstall jaxnets" in w for w in report["warnings"])


def test_cli_runs_an_experiment_of_the_source_tree_and_says_where_there_is_none(tmp_path, capsys):
    root = pathlib.Path(__file__).resolve().parents[1]
    assert cli.find_source_tree(root / "tests") == root
    assert cli.find_source_tree(tmp_path) is None
    with pytest.raises(SystemExit):
        cli.main(["run", "--source", str(tmp_path), "mnist_cnn"])
    assert "the wheel does not install" in capsys.readouterr().err
    assert cli.main(["run", "--source", str(root), "mnist_cnn", "--help"]) == 0


def test_cli_json_is_the_report(capsys):
    assert cli.main(["doctor", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == doctor.doctor(print_report=False)
    with pytest.raises(SystemExit):
        cli.main(["nonsense"])


def test_cuda_plugin_generations_and_a_libtpu_that_does_not_match_jax_warn(monkeypatch):
    real = doctor.installed_version
    fake = {"jax-cuda13-plugin": "0.10.2", "jax-cuda12-plugin": "0.9.0", "libtpu": "0.0.30"}
    monkeypatch.setattr(doctor, "installed_version", lambda name: fake.get(name, real(name)))
    report = doctor.doctor(print_report=False)
    assert report["accelerators"] == {
        "cuda_plugins": {"12": "0.9.0", "13": "0.10.2"},
        "libtpu": "0.0.30",
        "libtpu_wanted": "0.0.42.*",  # jax 0.10.2's [tpu] extra
    }
    warnings = "\n".join(report["warnings"])
    assert (
        "jax-cuda12-plugin 0.9.0 does not match jaxlib 0.10.2; pip install 'jax[cuda12]==0.10.2'"
        in warnings
    )
    assert "jax-cuda13-plugin 0.10.2 does not match" not in warnings
    assert (
        "CUDA plugins of several generations are installed (cuda12, cuda13); keep one" in warnings
    )
    assert "libtpu 0.0.30 does not match jax 0.10.2, which wants libtpu==0.0.42.*" in warnings
    text = doctor.format_report(report)
    assert (
        "CUDA plugin: CUDA 12 (jax-cuda12-plugin 0.9.0), CUDA 13 (jax-cuda13-plugin 0.10.2)" in text
    )
    fake["libtpu"] = "0.0.42.1"
    warnings = doctor.doctor(print_report=False)["warnings"]
    assert not any(w.startswith("libtpu 0.0.42.1 does not match") for w in warnings)


def test_cpu_kernels_are_not_built_where_jax_runs_on_an_accelerator(monkeypatch):
    from jaxnets.models import native_conv

    def fail():
        raise AssertionError("doctor built the CPU kernels on an accelerator")

    tpu = {**doctor._device_report(), "backend": "tpu"}
    monkeypatch.setattr(doctor, "_device_report", lambda: tpu)
    monkeypatch.setattr(native_conv, "available", fail)
    report = doctor.doctor(print_report=False)
    assert report["native_conv"] == {"available": None, "reason": "not built: jax runs on tpu"}
    assert "native conv kernels (CPU): not built: jax runs on tpu" in doctor.format_report(report)
