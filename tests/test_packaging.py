"""What the wheel holds and declares: the library only, typed, licensed, with lower bounds."""

import importlib.metadata
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import jaxnets

ROOT = Path(__file__).parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_one_version_source_and_ruff_targets_the_oldest_python():
    assert importlib.metadata.version("jaxnets") == jaxnets.__version__
    assert PYPROJECT["project"]["dynamic"] == ["version"]
    oldest = re.fullmatch(r">=\s*3\.(\d+)", PYPROJECT["project"]["requires-python"]).group(1)
    assert PYPROJECT["tool"]["ruff"]["target-version"] == f"py3{oldest}"
    assert PYPROJECT["tool"]["mypy"]["python_version"] == f"3.{oldest}"


def test_runtime_dependencies_are_lower_bounds_and_the_pins_hold_them():
    from jaxnets import doctor

    pins = doctor.pinned_versions()
    for requirement in PYPROJECT["project"]["dependencies"]:
        name, op, version = re.fullmatch(r"([\w.-]+)(>=)([\w.]+)", requirement).groups()
        key = re.sub(r"[-_.]+", "-", name).lower()
        assert key in pins, f"{name} is not in jaxnets/constraints/pinned.txt"
        # The pinned version satisfies the bound (numeric parts compared).
        as_tuple = [int(p) for p in re.findall(r"\d+", pins[key])[:3]]
        assert as_tuple >= [int(p) for p in version.split(".")[:3]], (name, pins[key])


@pytest.mark.slow
def test_the_wheel_holds_the_library_only(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("jaxnets-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(info).decode()
        entry_points = archive.read(info.replace("METADATA", "entry_points.txt")).decode()
    assert {n.split("/")[0] for n in names if not n.startswith("jaxnets-")} == {"jaxnets"}
    for packaged in ("py.typed", "constraints/pinned.txt", "constraints/colab.txt"):
        assert f"jaxnets/{packaged}" in names, packaged
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in metadata
    assert f"Version: {jaxnets.__version__}" in metadata
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert not [r for r in requires if "==" in r.split(";")[0]], "the wheel pins a version"
    assert "jaxnets = jaxnets.__main__:main" in entry_points
