"""`jaxnets doctor`: versions against the tested stacks, devices, data, known problems.

Run it first when something does not work, and paste its output into a bug report:

    $ jaxnets doctor
    jaxnets 0.1.0 doctor, python 3.11.7
    packages (installed vs tested: the pinned stack, the Colab stack):
      jax                  0.10.2     pin 0.10.2     colab 0.7.2      ok
    ...

`doctor()` returns the same report as a dict (and prints it unless `print_report=False`).
TensorFlow is never imported: whether it is installed is read from the import system.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import importlib.util
import os
import re
import sys
from typing import Any

# The packages whose versions decide whether jaxnets works; the tested versions come from
# jaxnets/constraints/ (pinned.txt, colab.txt), the lower bounds from jaxnets' metadata.
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets", "numpy")
# Accelerator runtimes: installed without the matching device means jax fell back to CPU.
ACCELERATOR_PACKAGES = {"libtpu": "tpu", "jax-cuda12-plugin": "gpu", "jax-cuda13-plugin": "gpu"}
# jax's CUDA plugin generations (`pip install 'jax[cuda12]'` / `'jax[cuda13]'`).
CUDA_GENERATIONS = (12, 13)

COLAB_TPU_OBSOLETE = (
    "jax.tools.colab_tpu is imported: setup_tpu() is obsolete. Colab TPU runtimes are TPU VMs "
    "where jax sees the TPU directly; remove the jax.tools.colab_tpu import and setup_tpu() call "
    "(old tutorials that call it fail on current runtimes)"
)

_PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*==\s*([^;\s]+)\s*(;.*)?$")
_LOWER = re.compile(
    r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*>=\s*([^;,\s]+)[^;]*(;.*)?$"
)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_versions(stack: str = "pinned") -> dict[str, str]:
    """`{package: version}` of a tested stack's constraints file, shipped with jaxnets.

    Args:
      stack: `"pinned"` (jaxnets/constraints/pinned.txt: the exact versions the whole test
        suite runs against) or `"colab"` (jaxnets/constraints/colab.txt: today's Colab
        runtime, where `make test-compat` runs the tests marked `compat`).

    Returns:
      Every `name==version` line, names normalised (`orbax-checkpoint`); empty when the file
      is missing (a broken installation).
    """
    path = importlib.resources.files("jaxnets").joinpath("constraints", f"{stack}.txt")
    if not path.is_file():
        return {}
    pins = {}
    for line in path.read_text().splitlines():
        match = _PIN.match(line.split("#", 1)[0])
        if match:
            pins[_normalize(match.group(1))] = match.group(2)
    return pins


def lower_bounds(distribution: str = "jaxnets") -> dict[str, str]:
    """`{package: version}` of the `>=` bounds of `distribution`'s runtime requirements."""
    try:
        requires = importlib.metadata.requires(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return {}
    bounds = {}
    for line in requires:
        match = _LOWER.match(line)
        if match and not (match.group(3) and "extra" in match.group(3)):
            bounds[_normalize(match.group(1))] = match.group(2)
    return bounds


def _version_tuple(version: str) -> tuple[int, ...]:
    """The leading numeric release of a version (`0.7.2rc1` -> (0, 7, 2)) for comparisons."""
    parts = []
    for part in version.split("."):
        digits = re.match(r"\d+", part)
        if not digits:
            break
        parts.append(int(digits.group()))
        if digits.group() != part:
            break
    return tuple(parts)


def installed_version(package: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _data_report() -> dict[str, Any]:
    from jaxnets.data.cache import default_cache_dir

    sample = importlib.resources.files("jaxnets.data").joinpath("mnist_sample.npz")
    # tfds.core.constants.get_default_data_dir(), without importing TFDS.
    tfds_dir = os.environ.get(
        "TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    )
    prepared = []
    if os.path.isdir(tfds_dir):
        names = ("mnist", "fashion_mnist", "jaxnets_mnist", "jaxnets_fashion_mnist")
        prepared = sorted(n for n in names if os.path.isdir(os.path.join(tfds_dir, n)))
    cache_dir = default_cache_dir()
    cached = (
        sorted(f for f in os.listdir(cache_dir) if f.endswith(".npz"))
        if os.path.isdir(cache_dir)
        else []
    )
    return {
        "bundled_sample": str(sample),
        "bundled_sample_present": sample.is_file(),
        "tfds_data_dir": tfds_dir,
        "tfds_data_dir_exists": os.path.isdir(tfds_dir),
        "tfds_prepared": prepared,
        "cache_dir": cache_dir,
        "cached_arrays": cached,
    }


def _device_report() -> dict[str, Any]:
    import jax

    devices = jax.devices()
    return {
        "backend": devices[0].platform,
        "process_count": jax.process_count(),
        "process_index": jax.process_index(),
        "device_count": len(devices),
        "local_device_count": jax.local_device_count(),
        "devices": [
            {
                "id": d.id,
                "platform": d.platform,
                "kind": d.device_kind,
                "process_index": d.process_index,
            }
            for d in devices
        ],
    }


def _native_conv_report(backend: str) -> dict[str, Any]:
    if backend != "cpu":  # the kernels are for XLA:CPU: not built where jax runs elsewhere
        return {"available": None, "reason": f"not built: jax runs on {backend}"}
    from jaxnets.models import native_conv

    available = native_conv.available()  # builds the kernels if this machine has none yet
    return {
        "available": available,
        "reason": native_conv.unavailable_reason(),
        "fix": native_conv.unavailable_fix(),
    }


def _wanted_by_jax(package: str, extra: str) -> str | None:
    """The version spec jax's `extra` pins `package` to (e.g. libtpu '0.0.42.*'), or None."""
    try:
        requires = importlib.metadata.requires("jax") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for line in requires:
        match = _PIN.match(line)
        if (
            match
            and _normalize(match.group(1)) == package
            and f'"{extra}"' in (match.group(3) or "")
        ):
            return match.group(2)
    return None


def _matches(version: str, spec: str) -> bool:
    """`version` against an `==` spec that may end in `.*`."""
    if spec.endswith(".*"):
        return version == spec[:-2] or version.startswith(spec[:-1])
    return version == spec


def _accelerator_report() -> dict[str, Any]:
    """CUDA plugin generations and libtpu installed, against what this jax wants."""
    cuda = {
        str(gen): version
        for gen in CUDA_GENERATIONS
        if (version := installed_version(f"jax-cuda{gen}-plugin")) is not None
    }
    return {
        "cuda_plugins": cuda,  # {"13": "0.10.2"}: the CUDA generation and the plugin version
        "libtpu": installed_version("libtpu"),
        "libtpu_wanted": _wanted_by_jax("libtpu", "tpu"),
    }


def _warnings(
    packages: dict,
    devices: dict,
    pins_found: bool,
    native: dict | None = None,
    accelerators: dict | None = None,
) -> list[str]:
    warnings = []
    if not pins_found:
        warnings.append(
            "jaxnets' constraints files (jaxnets/constraints/*.txt) are missing, so the tested "
            "versions are unknown; reinstall jaxnets"
        )
    for name, info in packages.items():
        installed, pin, bound = info["installed"], info["pin"], info["lower_bound"]
        if installed is None:
            want = f"=={pin}" if pin else f">={bound}" if bound else ""
            warnings.append(f"{name} is not installed; pip install '{name}{want}'")
        elif bound and _version_tuple(installed) < _version_tuple(bound):
            warnings.append(
                f"{name} {installed} is older than jaxnets supports (>= {bound}); "
                f"pip install -U '{name}>={bound}'"
            )
        elif not info["ok"] and pin is not None:
            colab = f" nor the Colab stack's {info['colab']}" if info["colab"] else ""
            warnings.append(
                f"{name} {installed} is neither the tested pin {pin}{colab}; "
                f"if something breaks, pip install '{name}=={pin}'"
            )
    jax_v, jaxlib_v = packages["jax"]["installed"], packages["jaxlib"]["installed"]
    if jax_v and jaxlib_v and jax_v != jaxlib_v:
        warnings.append(
            f"jax {jax_v} and jaxlib {jaxlib_v} differ; install matching versions: "
            f"pip install 'jax=={jax_v}' 'jaxlib=={jax_v}' (a runtime that upgrades one under "
            "you, as Colab can, breaks imports or compilation)"
        )
    for package, platform in ACCELERATOR_PACKAGES.items():
        version = installed_version(package)
        if version is not None and devices["backend"] == "cpu":
            warnings.append(
                f"{package} {version} is installed but jax runs on CPU: no {platform} was found "
                f"or its runtime failed to start (check the jax import log, driver, and that "
                f"{package} matches jaxlib {jaxlib_v})"
            )
    accelerators = accelerators or {"cuda_plugins": {}, "libtpu": None, "libtpu_wanted": None}
    for gen, version in accelerators["cuda_plugins"].items():
        if jaxlib_v and version != jaxlib_v:
            warnings.append(
                f"jax-cuda{gen}-plugin {version} does not match jaxlib {jaxlib_v}; "
                f"pip install 'jax[cuda{gen}]=={jaxlib_v}'"
            )
    if len(accelerators["cuda_plugins"]) > 1:
        warnings.append(
            "CUDA plugins of several generations are installed "
            f"({', '.join('cuda' + g for g in accelerators['cuda_plugins'])}); keep one: "
            "pip uninstall jax-cuda12-plugin jax-cuda12-pjrt for CUDA 13 (NVIDIA driver >= "
            "580), or the cuda13 ones for CUDA 12"
        )
    libtpu, wanted = accelerators["libtpu"], accelerators["libtpu_wanted"]
    if libtpu and wanted and not _matches(libtpu, wanted):
        warnings.append(
            f"libtpu {libtpu} does not match jax {jax_v}, which wants libtpu=={wanted}: "
            f"pip install 'jax[tpu]=={jax_v}' (a TPU runtime's preinstalled libtpu fails to "
            "load or miscompiles with another jaxlib)"
        )
    if "jax.tools.colab_tpu" in sys.modules:
        warnings.append(COLAB_TPU_OBSOLETE)
    if native is not None and devices["backend"] == "cpu" and not native["available"]:
        warnings.append(
            f"the C++ convolution kernels are unavailable ({native['reason']}), so MnistCNN "
            f"uses im2col on CPU, 1.3-1.8x slower; {native['fix']}"
        )
    return warnings


def doctor(*, print_report: bool = True) -> dict[str, Any]:
    """Checks the installation; returns (and prints) the report.

    Returns:
      A dict: `jaxnets` (version), `python`, `packages` ({name: {installed, pin, colab,
      lower_bound, ok}}: `pin` from the pinned stack, `colab` from the Colab stack, `ok` when
      the installed version is one of them),
      `tensorflow_installed` (bool; TensorFlow is not needed), `devices` (backend,
      process_count, device_count, devices [{id, platform, kind, process_index}]), `data`
      (bundled sample, TFDS data dir and what is prepared there, cache dir), `native_conv`
      (whether the C++ convolution kernels build here: available, reason; available None
      where jax runs on GPU/TPU, where they are not built), `accelerators` (`cuda_plugins`
      {generation: version}, `libtpu` and the `libtpu_wanted` spec of this jax), `warnings`
      (a list of sentences, each with the fix).
    """
    pins, colab, bounds = pinned_versions(), pinned_versions("colab"), lower_bounds()
    packages = {}
    for name in PACKAGES:
        key = _normalize(name)
        installed, pin = installed_version(name), pins.get(key)
        tested = {v for v in (pin, colab.get(key)) if v is not None}
        packages[name] = {
            "installed": installed,
            "pin": pin,
            "colab": colab.get(key),
            "lower_bound": bounds.get(key),
            "ok": installed is not None and (not tested or installed in tested),
        }
    devices = _device_report()
    report: dict[str, Any] = {
        "jaxnets": installed_version("jaxnets"),
        "python": sys.version.split()[0],
        "packages": packages,
        "tensorflow_installed": importlib.util.find_spec("tensorflow") is not None,
        "devices": devices,
        "data": _data_report(),
        "native_conv": _native_conv_report(devices["backend"]),
        "accelerators": _accelerator_report(),
    }
    report["warnings"] = _warnings(
        packages, devices, bool(pins), report["native_conv"], report["accelerators"]
    )
    if print_report:
        print(format_report(report))
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as the text `python -m jaxnets doctor` prints."""
    lines = [f"jaxnets {report['jaxnets'] or '(not installed)'} doctor, python {report['python']}"]
    lines.append("packages (installed vs tested: the pinned stack, the Colab stack):")
    for name, info in report["packages"].items():
        status = "ok" if info["ok"] else "MISMATCH"
        if info["ok"] and info["installed"] != info["pin"] and info["installed"] == info["colab"]:
            status = "ok (Colab stack)"
        lines.append(
            f"  {name:<20} {info['installed'] or '-':<10} pin {info['pin'] or '-':<10} "
            f"colab {info['colab'] or '-':<10} {status}"
        )
    tf = (
        "installed (not needed)" if report["tensorflow_installed"] else "not installed (not needed)"
    )
    lines.append(f"tensorflow: {tf}")
    dev = report["devices"]
    lines.append(
        f"devices: backend {dev['backend']}, {dev['device_count']} device(s), "
        f"{dev['local_device_count']} local, process {dev['process_index']} of "
        f"{dev['process_count']}"
    )
    kinds: dict[tuple, int] = {}
    for d in dev["devices"]:
        kinds[(d["platform"], d["kind"])] = kinds.get((d["platform"], d["kind"]), 0) + 1
    for (platform, kind), count in kinds.items():
        lines.append(f"  {count} x {platform} ({kind})")
    data = report["data"]
    lines.append("data:")
    lines.append(
        f"  bundled sample: {data['bundled_sample']}"
        + ("" if data["bundled_sample_present"] else "  MISSING: reinstall jaxnets")
    )
    prepared = ", ".join(data["tfds_prepared"]) or "nothing prepared"
    exists = "" if data["tfds_data_dir_exists"] else " (does not exist)"
    lines.append(f"  TFDS data dir: {data['tfds_data_dir']}{exists}: {prepared}")
    lines.append(f"  cache dir: {data['cache_dir']}: {len(data['cached_arrays'])} cached arrays")
    native = report["native_conv"]
    status = "built" if native["available"] else f"unavailable: {native['reason']}"
    if native["available"] is None:
        status = native["reason"]
    lines.append(f"native conv kernels (CPU): {status}")
    acc = report["accelerators"]
    cuda = ", ".join(f"CUDA {g} (jax-cuda{g}-plugin {v})" for g, v in acc["cuda_plugins"].items())
    lines.append(f"CUDA plugin: {cuda or 'none'}")
    wanted = f" (jax wants {acc['libtpu_wanted']})" if acc["libtpu_wanted"] else ""
    lines.append(f"libtpu: {acc['libtpu'] or 'none'}{wanted}")
    if report["warnings"]:
        lines.append("warnings:")
        lines += [f"  - {w}" for w in report["warnings"]]
    else:
        lines.append("no warnings")
    return "\n".join(lines)
