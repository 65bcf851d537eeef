"""scripts/accelerator_check.py --quick runs end to end on CPU and writes its JSON and table."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
_spec = importlib.util.spec_from_file_location(
    "accelerator_check", ROOT / "scripts" / "accelerator_check.py"
)
accelerator_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(accelerator_check)


@pytest.mark.slow
def test_quick_check_runs_end_to_end_on_cpu(tmp_path, capsys):
    assert accelerator_check.main(["--quick", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*-cpu-quick.json")
    report = json.loads(path.read_text())
    assert report["platform"] == "cpu" and report["skipped"] == []
    assert report["tests"]["returncode"] == 0 and "1 passed" in report["tests"]["summary"]
    impls = {(r["impl"], r["batch"]) for r in report["forward_backward"]}
    assert impls == {("xla", 100), ("im2col", 100), ("default", 100), ("default bf16", 100)}
    assert all(r["ms"] > 0 for r in report["forward_backward"])
    epochs = [(r["dtype"], r["batch"], r["steps_per_call"]) for r in report["epochs"]]
    assert epochs == [("float32", 100, 1), ("float32", 100, 3)]  # bf16 epochs: not --quick
    # 8 fake CPU devices: batch 100 runs on the 4 that divide it
    assert {r["devices"] for r in report["epochs"]} == {4}
    assert report["epoch_images"] == 600 and report["data_source"].startswith("synthetic")
    sweep = report["sweep"]
    assert sweep["models"] == 2 and sweep["vmapped_seconds"] > 0
    table = path.with_suffix(".md").read_text()
    assert "| default | 100 |" in table and "| float32 | 100 | 4 | 3 |" in table
    assert table in capsys.readouterr().out
