"""The Colab notebook: committed clean, and executed headless on CPU it trains over 8 fake
devices, resumes, resumes again on 1 device (a Drive run moved to a single-chip runtime), and
refuses a batch that does not divide before it trains."""

import importlib.util
import json
import os
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).parent.parent
NOTEBOOK = ROOT / "notebooks" / "colab_tpu.ipynb"
_spec = importlib.util.spec_from_file_location("run_notebook", ROOT / "scripts" / "run_notebook.py")
run_notebook = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_notebook)

PARAMETERS = {
    "JAXNETS_SOURCE",
    "EPOCHS",
    "WORKDIR",
    "DATASET",
    "LIMIT_TRAIN",
    "BATCH_SIZE",
    "DEVICES",
    "ACCELERATOR_EXTRA",
    "SHOW_TENSORBOARD",
}


def _code(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_committed_notebook_is_valid_and_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    for cell in _code(nb):
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
    assert set(run_notebook.notebook_parameters(nb)) == PARAMETERS
    source = "\n".join(c.source for c in _code(nb))
    assert "setup_tpu(" not in source  # obsolete on TPU VMs; old tutorials fail with it
    assert not re.search(r"^\s*(import|from) tensorflow\b", source, re.M)
    assert "jax[tpu]" not in source  # jaxnets' own extras, never a jax version of its own
    assert not re.search(r"[\w\]]==\d", _install_cell(nb).source)  # no pins over the runtime
    assert "loop.fit(" in source and "adapters.linen(" in source  # the user's own model


def _install_cell(nb):
    return next(c for c in _code(nb) if "def pip_install(" in c.source)


def _install_functions(nb, **names):
    """The install cell's functions (not its install), with `names` as its globals."""
    import ast

    tree = ast.parse(_install_cell(nb).source)
    tree.body = [
        n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef))
    ]
    scope = dict(names)
    exec(compile(tree, "install cell", "exec"), scope)
    return scope


def test_the_install_adds_only_the_extra_the_runtime_lacks():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = _install_functions(nb, ACCELERATOR_EXTRA="auto")
    cell["gpu_runtime"], cell["tpu_runtime"] = (lambda: True), (lambda: False)
    assert cell["accelerator_extra"]({"jax": "0.7.2"}) == "[cuda12]"  # a CPU-only jaxlib
    assert cell["accelerator_extra"]({"jax": "0.7.2", "jax-cuda12-plugin": "0.7.2"}) == ""
    cell["gpu_runtime"], cell["tpu_runtime"] = (lambda: False), (lambda: True)
    assert cell["accelerator_extra"]({"jax": "0.7.2", "libtpu": "0.0.23"}) == ""  # Colab TPU
    assert cell["accelerator_extra"]({"jax": "0.7.2"}) == "[tpu]"
    cell["tpu_runtime"] = lambda: False
    assert cell["accelerator_extra"]({"jax": "0.7.2"}) == ""  # CPU
    named = _install_functions(nb, ACCELERATOR_EXTRA="[cuda13]")
    assert named["accelerator_extra"]({}) == "[cuda13]"


def test_with_parameters_replaces_the_parameters_cell_only():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    new = run_notebook.with_parameters(nb, {"EPOCHS": 1, "LIMIT_TRAIN": 400, "WORKDIR": "/x"})
    params = run_notebook.notebook_parameters(new)
    assert params["EPOCHS"] == 1 and params["LIMIT_TRAIN"] == 400 and params["WORKDIR"] == "/x"
    assert params["DATASET"] == run_notebook.notebook_parameters(nb)["DATASET"]
    changed = [i for i, (a, b) in enumerate(zip(nb.cells, new.cells)) if a.source != b.source]
    assert changed == [nb.cells.index(run_notebook.parameters_cell(nb))]
    with pytest.raises(ValueError, match=r"unknown notebook parameters \['EPOCH'\]"):
        run_notebook.with_parameters(nb, {"EPOCH": 1})


def _execute(tmp_path, devices, **parameters):
    nb = run_notebook.with_parameters(
        nbformat.read(NOTEBOOK, as_version=4),
        {
            "JAXNETS_SOURCE": "",
            "DATASET": "mnist_sample",
            "LIMIT_TRAIN": 400,
            "SHOW_TENSORBOARD": False,  # no TensorBoard server from a test
            **parameters,
        },
    )
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    run_notebook.execute(nb, cwd=tmp_path, env=env, timeout=300)
    return nb


def _printed(nb):
    outputs = [o for c in _code(nb) for o in c.outputs]
    return "".join(o.text for o in outputs if o.output_type == "stream")


@pytest.mark.slow
def test_notebook_runs_on_8_then_1_devices_and_resumes(tmp_path):
    committed = NOTEBOOK.read_bytes()
    workdir = tmp_path / "run"
    # 8 devices (a multi-chip runtime): 400 images, the last 20% held out: 320 train, 8 steps
    # of 40 per epoch. The fit cell trains epoch 1 (step 8); the resume cell epoch 2 only.
    nb = _execute(tmp_path, 8, EPOCHS=1, BATCH_SIZE=40, WORKDIR=str(workdir))
    outputs = [o for c in _code(nb) for o in c.outputs]
    assert all(c.execution_count is not None for c in _code(nb))
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1
    assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["step"] == 16 and summary["epochs_completed"] == 2
    assert summary["devices"]["count"] == 8 and summary["devices"]["sharding"] == "replicated"
    assert summary["dataset"]["train"] == 320
    printed = _printed(nb)
    assert "8 x cpu: global batch 40, 5 per device" in printed
    own = re.search(r"your model: step (\d+), accuracy ([\d.]+)", printed)
    assert own and int(own.group(1)) == 320 and float(own.group(2)) > 0.8, printed
    assert "step 8 (1 epochs)" in printed and "step 8 -> 16" in printed
    assert "resuming from step 8" in printed

    # The same Drive work directory on a single-chip runtime: same global batch, resumed.
    nb = _execute(tmp_path, 1, EPOCHS=3, BATCH_SIZE=40, WORKDIR=str(workdir))
    printed = _printed(nb)
    assert "1 x cpu: global batch 40, 40 per device" in printed
    assert "resuming from step 16" in printed and "step 24 -> 32" in printed
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["step"] == 32 and summary["devices"]["count"] == 1
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "epoch"] == [8, 16, 24, 32]

    # The seed's 100 on 8 devices: the training cell names the fix before it trains.
    fresh = tmp_path / "fresh"
    with pytest.raises(Exception, match=r"BATCH_SIZE=100 does not divide over 8 devices"):
        _execute(tmp_path, 8, EPOCHS=1, BATCH_SIZE=100, WORKDIR=str(fresh))
    assert not fresh.exists()

    assert NOTEBOOK.read_bytes() == committed  # executing never writes into the committed file
