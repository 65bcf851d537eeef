"""Training input: streamed (Grain) == resident, sources, the memory check, resume."""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest
import test_train

from jaxnets import evaluation, feeds, hooks, inputs, sharding


def _assert_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("devices,k", [(1, 4), (4, 1), (2, 3)])
@pytest.mark.compat
def test_streamed_equals_resident_bit_for_bit(devices, k):
    resident, r_result = test_train._run(devices, k, train_input="resident")
    streamed, s_result = test_train._run(devices, k, train_input="stream")
    _assert_equal(resident, streamed)
    assert [h["loss"] for h in s_result.history] == [h["loss"] for h in r_result.history]


class _Examples:
    """A user's own random-access source: one dict per example, built on demand."""

    def __init__(self, images, labels):
        self.images, self.labels, self.reads = images, labels, []

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        self.reads.append(i)
        return {"image": self.images[i], "label": self.labels[i], "name": f"example {i}"}


def _drop_name(example):
    return {"image": example["image"], "label": example["label"]}


def test_a_users_source_class_with_a_host_transform_streams():
    images, labels = test_train._data()
    source = _Examples(images, labels)
    stream = inputs.Stream(source, transform=_drop_name, num_threads=2, prefetch=3)
    streamed, _ = test_train._run(devices=1, k=2, train_data=stream)
    resident, _ = test_train._run(devices=1, k=2, train_input="resident")
    _assert_equal(resident, streamed)
    # Every epoch read each of its 8 batches of 32 once (plus what compiling read).
    assert len(source.reads) >= 2 * 8 * 32


@pytest.mark.compat
def test_memory_mapped_npy_files_stream(tmp_path):
    images, labels = test_train._data()
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "y.npy", labels)
    paths = {"image": tmp_path / "x.npy", "label": tmp_path / "y.npy"}
    source, mapped = inputs.open_npy(paths), inputs.open_npy(paths, mmap=True)
    assert isinstance(mapped.tree["image"], np.memmap) and len(source) == len(labels)
    rows = np.array([[5, 0, 255], [7, 7, 1]])
    _assert_equal(source.read_batch(rows), {"image": images[rows], "label": labels[rows]})
    _assert_equal(mapped.read_batch(rows), source.read_batch(rows))
    assert source.nbytes == images.nbytes + labels.nbytes
    streamed, _ = test_train._run(devices=2, k=3, train_data=inputs.Stream(source))
    resident, _ = test_train._run(devices=2, k=3, train_input="resident")
    _assert_equal(resident, streamed)
    with pytest.raises(IndexError, match=r"row 256 of .*x.npy \(256 rows\)"):
        source.read_batch(np.array([256]))
    with open(tmp_path / "x.npy", "r+b") as f:  # a file cut short after it was opened
        f.truncate(1000)
    with pytest.raises(OSError, match=r"x.npy is truncated: row 200 is incomplete"):
        source.read_batch(np.array([200]))


def test_plain_idx_files_stream(tmp_path):
    from jaxnets.data import idx

    images, labels = test_train._data()
    idx.write_idx(tmp_path / "images", images[..., 0])  # [N, 6, 6]: a channel axis is added
    idx.write_idx(tmp_path / "labels", labels)
    source = inputs.open_idx(tmp_path / "images", tmp_path / "labels")
    rows = np.array([3, 255, 3])
    _assert_equal(source.read_batch(rows), {"image": images[rows], "label": labels[rows]})
    assert source.tree["label"].dtype == np.int32  # stored big-endian, served native
    idx.write_idx(tmp_path / "labels.gz", labels)
    with pytest.raises(ValueError, match=r"labels.gz is gzip-compressed.*gunzip it"):
        inputs.open_idx(tmp_path / "images", tmp_path / "labels.gz")
    idx.write_idx(tmp_path / "few", labels[:9])
    with pytest.raises(ValueError, match=r"has 256 images but .*few has 9 labels"):
        inputs.open_idx(tmp_path / "images", tmp_path / "few")


def test_resident_memory_check_points_at_streaming(monkeypatch, caplog):
    monkeypatch.setattr(inputs, "free_bytes", lambda devices: 10_000)  # 12,032 bytes of data
    with pytest.raises(MemoryError, match=r"takes 0.00 GiB per device.*input='stream'"):
        test_train._run(devices=1, train_input="resident")
    with caplog.at_level(logging.INFO, logger="jaxnets.engine.inputs"):
        auto, _ = test_train._run(devices=1, k=2)
    assert "input: streaming the training set" in caplog.text
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="jaxnets.engine.inputs"):
        resident, _ = test_train._run(devices=1, k=2)
    assert "input: resident" in caplog.text
    _assert_equal(auto, resident)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"input='disk'; use one of"):
        test_train._run(train_input="disk")
    with pytest.raises(TypeError, match=r"needs __len__ and __getitem__.*got generator"):
        test_train._run(train_data=(x for x in range(3)))
    with pytest.raises(ValueError, match=r"input='resident' needs the training set as arrays"):
        test_train._run(train_data=_Examples(*test_train._data()), train_input="resident")
    with pytest.raises(ValueError, match=r"prefetch=0\): must be an int >= 1"):
        inputs.Stream(inputs.ArraySource({"x": np.zeros(3)}), prefetch=0)


class _StopAt(hooks.Hook):
    def __init__(self, step):
        self.step = step

    def should_stop(self, ctx):
        return ctx.step >= self.step


class _Save(hooks.Hook):
    """Keeps the state (a host copy: the device state is donated to the next chunk) and the
    feed's position when training stops."""

    on_stop = True

    def __init__(self):
        self.saved = {}

    def __call__(self, ctx):
        self.saved.update(state=jax.device_get(ctx.state), data=ctx.feed.state())


@pytest.mark.compat
def test_streamed_resume_mid_epoch_from_the_saved_position_is_bit_exact():
    images, labels = test_train._data()
    full, _ = test_train._run(devices=1, k=2, train_input="stream")

    stream = inputs.Stream(inputs.ArraySource(test_train._batch(images, labels)))
    save = _Save()
    saved = save.saved
    half, result = test_train._run(devices=1, k=2, train_data=stream, extra=[_StopAt(6), save])
    assert result.stopped_early and saved["data"]["step"] == 6
    assert saved["data"]["grain"] == {"next_index": 6}  # Grain's iterator state, in epoch 0

    resumed_stream = inputs.Stream(inputs.ArraySource(test_train._batch(images, labels)))
    resumed_stream.set_state(saved["data"])
    resumed, _ = test_train._run(devices=1, k=2, train_data=resumed_stream, state=saved["state"])
    _assert_equal(full, resumed)

    wrong = inputs.Stream(inputs.ArraySource(test_train._batch(images, labels)))
    wrong.set_state({**saved["data"], "step": 4})
    with pytest.raises(ValueError, match=r"saved position \(step 4.*train state at step 6"):
        test_train._run(devices=1, k=2, train_data=wrong, state=saved["state"])
    grain = inputs.Stream(inputs.ArraySource(test_train._batch(images, labels)))
    grain.set_state({**saved["data"], "grain": {"next_index": 5}})
    with pytest.raises(ValueError, match=r"'grain': \(\{'next_index': 5\}, \{'next_index': 6\}\)"):
        test_train._run(devices=1, k=2, train_data=grain, state=saved["state"])
    # Saved at an epoch's end (step 8 of 8 per epoch): the next epoch starts afresh.
    saved.clear()
    ended = inputs.Stream(inputs.ArraySource(test_train._batch(images, labels)))
    test_train._run(devices=1, k=2, train_data=ended, extra=[_StopAt(8), save])
    assert saved["data"]["grain"] == {"next_index": 8} and saved["data"]["epoch"] == 0
    at_epoch_end = inputs.Stream(inputs.ArraySource(test_train._batch(images, labels)))
    at_epoch_end.set_state(saved["data"])
    resumed, _ = test_train._run(devices=1, k=2, train_data=at_epoch_end, state=saved["state"])
    _assert_equal(full, resumed)
    # A stream a finished fit left behind starts a fresh run from step 0, not an error.
    again, _ = test_train._run(devices=1, k=2, train_data=resumed_stream)
    _assert_equal(full, again)


@pytest.mark.parametrize("devices,chunk", [(4, 50), (2, 1)])
def test_streamed_evaluation_equals_resident(devices, chunk, monkeypatch):
    """A padded last batch (50 examples, batch 32), in one call or one step per call."""
    monkeypatch.setattr(feeds, "EVAL_STEPS_PER_CALL", chunk)
    state, _ = test_train._run(devices, epochs=1, evaluate=False)
    mesh = sharding.make_mesh(devices)
    eval_step = test_train.train.make_eval_step(test_train._objective().eval_fn)
    images, labels = test_train._data(50, seed=3)
    data = test_train._batch(images, labels)
    got = {
        how: evaluation.evaluate(
            evaluation.make_evaluation(eval_step, data, batch_size=32, mesh=mesh, input=how),
            state,
        )
        for how in ("resident", "stream")
    }
    assert got["stream"].keys() == got["resident"].keys() == {"loss", "accuracy"}
    for name, value in got["resident"].items():
        assert got["stream"][name] == pytest.approx(value, rel=1e-6)
