"""experiments.sweep end to end on the bundled sample: files written, sweep.json == results."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from experiments import sweep as sweep_experiment
from jaxnets import sweep_results


def test_parse_args_repeated_sweep_flags_and_config_flags():
    config = sweep_experiment.parse_args(
        ["--sweep", "seed=0:3", "--sweep", "l1=0,1e-4", "--epochs", "2", "--no-nesterov"]
    )
    assert config.sweep == ("seed=0:3", "l1=0,1e-4")
    assert (config.epochs, config.nesterov) == (2, False)
    assert sweep_experiment.parse_args([]).sweep == sweep_experiment.get_config().sweep


def test_bad_sweep_flag_fails_before_loading_data(tmp_path):
    config = dataclasses.replace(
        sweep_experiment.get_config(), sweep=("lr=abc",), workdir=str(tmp_path)
    )
    with pytest.raises(ValueError, match="--sweep 'lr=abc': unknown name 'lr'"):
        sweep_experiment.main(config)
    config = dataclasses.replace(config, sweep=("learning_rate=abc",))
    with pytest.raises(ValueError, match="--sweep 'learning_rate=abc': 'abc' is not a number"):
        sweep_experiment.main(config)


@pytest.mark.slow
def test_smoke_two_layer_grid_writes_json_table_and_plot(tmp_path):
    config = dataclasses.replace(
        sweep_experiment.get_config(),
        model="two_layer",
        dataset="mnist_sample",
        limit=200,
        epochs=1,
        batch_size=16,  # 2 per device on the 8 test devices
        log_every_steps=4,
        hidden=8,
        sweep=("seed=0:2", "learning_rate=0.1,0.5"),
        workdir=str(tmp_path),
    )
    results = sweep_experiment.main(config)
    assert results["num_models"] == 4
    assert [r["config"]["learning_rate"] for r in results["runs"]] == [0.1, 0.5, 0.1, 0.5]
    assert [r["config"]["seed"] for r in results["runs"]] == [0, 0, 1, 1]
    assert results["runs"][0]["config"]["momentum"] == config.momentum  # unswept: from flags
    val = [r["final"]["val_loss"] for r in results["runs"]]
    assert all(math.isfinite(v) for v in val)
    assert results["best"] == min(range(4), key=val.__getitem__)
    assert [p["step"] for p in results["runs"][0]["curve"]] == [4, 8, 10]  # 160 // 16 steps
    assert json.loads((tmp_path / "sweep.json").read_text()) == results
    assert (tmp_path / "table.md").read_text() == sweep_results.format_results(results) + "\n"
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == ["run0", "run1", "run2", "run3"]
