"""The Colab notebook: committed clean, and executed headless on CPU (2 fake devices) it trains,
resumes and plots."""

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
    "INSTALL_TPU_JAX",
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
    assert "jax[tpu]" not in source  # the pin comes from pyproject's `tpu` extra, not a copy


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


@pytest.mark.slow
def test_notebook_runs_on_cpu_and_resumes(tmp_path):
    committed = NOTEBOOK.read_bytes()
    workdir = tmp_path / "run"
    nb = run_notebook.with_parameters(
        nbformat.read(NOTEBOOK, as_version=4),
        {
            "JAXNETS_SOURCE": "",
            "DATASET": "mnist_sample",
            "EPOCHS": 1,
            "LIMIT_TRAIN": 400,
            "WORKDIR": str(workdir),
        },
    )
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    run_notebook.execute(nb, cwd=tmp_path, env=env, timeout=300)

    outputs = [o for c in _code(nb) for o in c.outputs]
    assert all(c.execution_count is not None for c in _code(nb))
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1
    assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # 400 images, the last 20% held out: 320 train, 3 steps of 100 per epoch. The fit cell
    # trains epoch 1 (step 3); the resume cell restores it and trains epoch 2 only.
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["step"] == 6 and summary["epochs_completed"] == 2
    assert summary["devices"]["count"] == 2 and summary["devices"]["backend"] == "pmap"
    assert summary["dataset"]["train"] == 320
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "epoch"] == [3, 6]
    printed = "".join(o.text for o in outputs if o.output_type == "stream")
    assert "step 3 (1 epochs)" in printed and "step 3 -> 6" in printed
    assert "resuming from step 3" in printed

    assert NOTEBOOK.read_bytes() == committed  # executing never writes into the committed file
