"""A sweep in TensorBoard's HParams dashboard, read back with TensorBoard's own reader."""

import flax.linen as nn
import numpy as np
import pytest

from jaxnets import adapters, losses, sweep, sweep_results
from jaxnets import metrics as jmetrics


def _read(logdir):
    """{run: (hparams, {tag: value})} through tensorboard.backend.event_processing."""
    from tensorboard.backend.event_processing import event_multiplexer
    from tensorboard.plugins.hparams import plugin_data_pb2

    mux = event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    out = {}
    for run, tags in mux.PluginRunToTagToContent("hparams").items():
        data = plugin_data_pb2.HParamsPluginData.FromString(tags["_hparams_/session_start_info"])
        hparams = {k: v.number_value for k, v in data.session_start_info.hparams.items()}
        scalars = {
            tag: (mux.Scalars(run, tag)[-1].step, mux.Scalars(run, tag)[-1].value)
            for tag in mux.GetAccumulator(run).Tags()["scalars"]
        }
        experiment = plugin_data_pb2.HParamsPluginData.FromString(tags["_hparams_/experiment"])
        metric_tags = {m.name.tag for m in experiment.experiment.metric_infos}
        out[run] = (hparams, scalars, metric_tags)
    return out


def test_sweep_hparams_read_by_tensorboard(tmp_path):
    rng = np.random.default_rng(0)
    data = {
        "image": rng.normal(size=(64, 5)).astype(np.float32),
        "label": rng.integers(0, 3, 64).astype(np.int32),
    }
    objective = adapters.linen(
        nn.Dense(3),
        loss=lambda y, t: losses.softmax_cross_entropy(y, t, reduction="none"),
        metrics={"accuracy": jmetrics.accuracy},
    )
    configs = sweep.grid(seed=[0, 1], learning_rate=[0.01, 0.3])
    result = sweep.fit_sweep(
        objective,
        sweep.make_sweep_tx(sweep.DEFAULTS),
        configs,
        data,
        data,
        epochs=2,
        batch_size=16,
        steps_per_call=1,
    )
    names = sweep_results.write_hparams(result.results, tmp_path / "tb")
    assert names == ["run0", "run1", "run2", "run3"]
    read = _read(tmp_path / "tb")
    assert sorted(read) == names
    for name, run in zip(names, result.results["runs"]):
        hparams, scalars, metric_tags = read[name]
        assert hparams["seed"] == run["config"]["seed"]
        assert hparams["learning_rate"] == pytest.approx(run["config"]["learning_rate"])
        assert hparams["momentum"] == pytest.approx(0.9)
        assert metric_tags == {f"hparam/{k}" for k in run["final"]}
        for metric, value in run["final"].items():
            step, got = scalars[f"hparam/{metric}"]
            assert step == 8
            assert got == pytest.approx(value, rel=1e-6)
    # The models differ (the dashboard has something to compare).
    losses_ = [read[n][1]["hparam/val_loss"][1] for n in names]
    assert len(set(losses_)) == 4
