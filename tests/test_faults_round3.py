"""Issue 26, the faults of round 3: each class's real failure mode, refused or survived."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).parent.parent

# A tiny run through `run.open_run` + `loop.fit` in a fresh process (tests/test_refusals.py's
# `_tiny_run`), so that environment variables and signals are those of a real run.
TINY_RUN = textwrap.dedent(
    """
    import logging, sys
    logging.basicConfig(format="%(message)s")
    logging.getLogger("jaxnets").setLevel(logging.INFO)  # the run's status lines, as the CLI
    sys.path.insert(0, {tests!r})
    from test_refusals import _tiny_run
    from jaxnets import run
    from jaxnets import cli
    summaries = []
    result = _tiny_run({workdir!r}, epochs={epochs}, summaries=summaries, **{flags!r})
    print("STEP", int(result.state.step), flush=True)
    sys.exit(cli.exit_status(summaries[0]))
    """
)


def _python(code, *, env=None, timeout=300, **popen):
    """Runs `code` in a fresh Python with the repository on its path; returns the process."""
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run(
        [sys.executable, "-c", code],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=popen.pop("cwd", ROOT),
        **popen,
    )


def _tiny_process(workdir, *, epochs=1, env=None, **flags):
    code = TINY_RUN.format(
        tests=str(ROOT / "tests"), workdir=str(workdir), epochs=epochs, flags=flags
    )
    return _python(code, env=env)


class TestCachesNeverStopARun:
    def test_a_home_that_cannot_hold_a_cache_costs_one_warning(self, tmp_path):
        """Before: NotADirectoryError from the steps-per-call record after the measurement."""
        path = tmp_path / "home"
        path.write_text("a file, not a directory")  # what an unwritable home also gives
        env = {"HOME": str(path), "XDG_CACHE_HOME": "", "JAXNETS_CACHE_DIR": ""}
        env = {k: v for k, v in env.items() if v} | {"JAXNETS_NATIVE_CONV": "0"}
        base = {
            k: v for k, v in os.environ.items() if k not in ("XDG_CACHE_HOME", "JAXNETS_CACHE_DIR")
        }
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                TINY_RUN.format(
                    tests=str(ROOT / "tests"),
                    workdir=str(tmp_path / "wd"),
                    epochs=1,
                    flags={"steps_per_dispatch": None},
                ),
            ],
            env=base | env | {"PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "STEP 6" in proc.stdout
        assert proc.stderr.count("the jaxnets cache is not writable") == 1, proc.stderr[-3000:]
        assert "JAXNETS_CACHE_DIR" in proc.stderr
        assert (tmp_path / "wd" / "steps_per_call.json").exists()  # the run's own record stays


def test_jax_platforms_without_its_device_names_the_cause_and_fix(tmp_path):
    """Before: a bare AssertionError from inside JAX's backend setup."""
    if Path("/dev/nvidia0").exists():
        pytest.skip("this machine has a GPU")
    code = "from jaxnets import run; run.claim({!r})".format(str(tmp_path / "wd"))
    proc = _python(code, env={"JAX_PLATFORMS": "cuda"})
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: JAX_PLATFORMS='cuda' asks for a backend"), last
    assert "JAX_PLATFORMS=cpu" in last and "AssertionError" not in proc.stderr
    assert not (tmp_path / "wd").exists()  # refused before the work directory


def _user_files(root):
    """A directory as a user has it: their own checkpoints/, tb/ and config.json."""
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "model.pt").write_bytes(b"the user's weights")
    (root / "tb").mkdir()
    (root / "tb" / "notes.txt").write_text("the user's notes")
    (root / "config.json").write_text('{"mine": true}')
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


class TestDangerousWorkdir:
    def test_an_empty_workdir_is_refused_before_the_current_directory_is_touched(self, tmp_path):
        """Before: '' meant the current directory; --restart deleted its checkpoints/ and tb/."""
        before = _user_files(tmp_path)
        code = TINY_RUN.format(
            tests=str(ROOT / "tests"), workdir="", epochs=1, flags={"restart": True}
        )
        proc = _python(code, cwd=tmp_path)
        assert proc.returncode != 0
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("ValueError: workdir='': an empty work directory"), last
        assert "workdir='runs/mine'" in last
        assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
        assert (tmp_path / "config.json").read_text() == '{"mine": true}'

    def test_restart_refuses_a_directory_jaxnets_did_not_fill(self, tmp_path):
        """Before: --restart deleted whatever checkpoints/ and tb/ held."""
        from test_refusals import _tiny_run

        before = _user_files(tmp_path / "wd")
        with pytest.raises(FileExistsError, match=r"holds 'model.pt', which jaxnets did not"):
            _tiny_run(tmp_path / "wd", epochs=1, restart=True)
        after = sorted(str(p.relative_to(tmp_path / "wd")) for p in (tmp_path / "wd").rglob("*"))
        assert after == sorted([*before, ".lock"])  # the lock only: nothing deleted or written
        assert (tmp_path / "wd" / "checkpoints" / "model.pt").read_bytes() == b"the user's weights"
        assert (tmp_path / "wd" / "tb" / "notes.txt").exists()

    def test_restart_still_discards_a_run_jaxnets_wrote(self, tmp_path):
        from test_refusals import _tiny_run

        _tiny_run(tmp_path / "wd", epochs=1)
        assert _tiny_run(tmp_path / "wd", epochs=1).state.step == 6  # finished: resumed
        result = _tiny_run(tmp_path / "wd", epochs=1, restart=True)
        assert int(result.state.step) == 6
        assert not (tmp_path / "wd" / "previous").exists()  # restart asked to discard

    def test_a_sweep_whose_workdir_is_a_file_is_refused_before_training(self, tmp_path):
        """Before: the sweep trained fully, then lost its results to FileExistsError."""
        import dataclasses

        from experiments import sweep as sweep_experiment

        target = tmp_path / "results"
        target.write_text("a file")
        config = dataclasses.replace(
            sweep_experiment.get_config(),
            model="two_layer",
            dataset="mnist_sample",
            limit=200,
            epochs=1,
            sweep=("seed=0:2",),
            workdir=str(target),
        )
        with pytest.raises(NotADirectoryError, match="is a file .* not a directory"):
            sweep_experiment.main(config)
        assert target.read_text() == "a file"


class TestLogsKept:
    def test_a_run_without_checkpoints_keeps_the_earlier_runs_log(self, tmp_path):
        """Before: the second run deleted metrics.jsonl (and mixed its events into tb/)."""
        from test_refusals import _tiny_run

        from jaxnets import writers

        _tiny_run(tmp_path / "wd", epochs=2, checkpoint=False)
        first = writers.read_jsonl(tmp_path / "wd" / "metrics.jsonl")
        assert first and first[-1]["step"] == 12
        _tiny_run(tmp_path / "wd", epochs=1, checkpoint=False)
        assert writers.read_jsonl(tmp_path / "wd" / "previous" / "1" / "metrics.jsonl") == first
        assert (tmp_path / "wd" / "previous" / "1" / "tb").is_dir()
        second = writers.read_jsonl(tmp_path / "wd" / "metrics.jsonl")
        assert second[-1]["step"] == 6 and all(r["step"] <= 6 for r in second)

    def test_one_torn_line_drops_only_itself_on_resume(self, tmp_path):
        """Before: reading stopped at the torn line, so the resume dropped every later record."""
        from test_refusals import _tiny_run

        from jaxnets import writers

        _tiny_run(tmp_path / "wd", epochs=2)
        path = tmp_path / "wd" / "metrics.jsonl"
        lines = path.read_text().splitlines(keepends=True)
        assert len(lines) == 4  # steps 6 and 12: a train and an epoch record each
        lines[0] = lines[0][:10] + "\n"  # a line torn by a crash (or a disk fault)
        path.write_text("".join(lines))
        with pytest.warns(UserWarning, match="1 unreadable line"):
            _tiny_run(tmp_path / "wd", epochs=3)
        steps = [r["step"] for r in writers.read_jsonl(path)]
        assert steps == [6, 12, 12, 18, 18]  # all but the torn one


def test_sighup_gets_the_save_sigterm_gets(tmp_path):
    """Before: a closed terminal (SIGHUP) killed the run with nothing saved since the last
    checkpoint. A real SIGHUP at the first log point of a real process."""
    import signal

    proc = _tiny_process(tmp_path / "wd", epochs=3, log_every_steps=1, signum=int(signal.SIGHUP))
    assert proc.returncode == 128 + signal.SIGHUP, proc.stderr[-3000:]  # 129: stopped, saved
    step = int(proc.stdout.split("STEP")[1])
    assert 1 <= step < 18
    saved = sorted(int(s) for s in os.listdir(tmp_path / "wd" / "checkpoints") if s.isdigit())
    assert saved[-1] == step  # saved where it stopped
    again = _tiny_process(tmp_path / "wd", epochs=3)
    assert again.returncode == 0 and "STEP 18" in again.stdout, again.stderr[-3000:]
    assert f"resuming from step {step} of 18" in again.stderr


class TestAdapterModeSwitch:
    """Before: only an argument named `train` was found; `training`/`deterministic` modules
    trained in evaluation mode (BatchNorm statistics frozen, no dropout), without a word."""

    @staticmethod
    def _module(name, *, field=False):
        import flax.linen as nn

        def body(self, x, value):
            training = not value if name == "deterministic" else value
            x = nn.Dense(4)(x)
            x = nn.BatchNorm(use_running_average=not training)(x)
            return nn.Dropout(0.5, deterministic=not training)(x)

        if field:
            return type(
                "Net",
                (nn.Module,),
                {
                    "__annotations__": {name: bool},
                    name: False,
                    "__call__": nn.compact(lambda self, x: body(self, x, getattr(self, name))),
                },
            )()
        ns = {}
        exec(
            f"def __call__(self, x, {name}: bool):\n    return body(self, x, {name})",
            {"body": body},
            ns,
        )
        return type("Net", (nn.Module,), {"__call__": nn.compact(ns["__call__"])})()

    def _train_once(self, module, **kwargs):
        import jax
        import jax.numpy as jnp

        from jaxnets import adapters, losses

        objective = adapters.linen(
            module,
            loss=lambda y, t: losses.mean_squared_error(y, t, reduction="none"),
            **kwargs,
        )
        batch = {"image": jnp.arange(24.0).reshape(6, 4), "label": jnp.zeros((6, 4))}
        params, state = objective.init(jax.random.key(0), batch)
        _, (_, new_state) = objective.loss_fn(params, state, batch, jax.random.key(1))
        train_out = objective.loss_fn(params, state, batch, jax.random.key(2))[0]
        moved = not jnp.allclose(
            new_state["batch_stats"]["BatchNorm_0"]["mean"],
            state["batch_stats"]["BatchNorm_0"]["mean"],
        )
        dropout = not jnp.allclose(
            objective.loss_fn(params, state, batch, jax.random.key(1))[0], train_out
        )
        evaluated = objective.eval_fn(params, state, batch, None)["loss"]
        return moved, dropout, evaluated

    @pytest.mark.parametrize("name", ["train", "training", "is_training", "deterministic"])
    @pytest.mark.parametrize("field", [False, True], ids=["argument", "attribute"])
    def test_the_switch_is_found_by_name_and_meaning(self, name, field):
        moved, dropout, _ = self._train_once(self._module(name, field=field))
        assert moved and dropout  # training mode: statistics move, dropout applies

    def test_an_explicit_mode_arg_for_any_name(self):
        moved, dropout, _ = self._train_once(self._module("mode"), mode_arg=("mode", True))
        assert moved and dropout
        with pytest.raises(ValueError, match="has no argument or attribute 'modus'"):
            self._train_once(self._module("mode"), mode_arg="modus")

    def test_an_unknown_boolean_argument_is_refused_not_guessed(self):
        with pytest.raises(ValueError, match=r"boolean argument 'mode'.*mode_arg='mode'"):
            self._train_once(self._module("mode"))

    def test_two_known_names_are_refused(self):
        import flax.linen as nn

        class Both(nn.Module):
            @nn.compact
            def __call__(self, x, train: bool, deterministic: bool = False):
                return nn.Dense(4)(x)

        with pytest.raises(ValueError, match="takes both 'train' and 'deterministic'"):
            self._train_once(Both())
        from jaxnets import adapters, losses

        adapters.linen(Both(), loss=losses.mean_squared_error, mode_arg="train")  # accepted


class TestDataIdentityOnResume:
    """Before: only the length was recorded; other examples of the same length resumed."""

    def test_replaced_arrays_of_the_same_length_are_refused(self, tmp_path):
        from test_refusals import _tiny, _tiny_run

        data = _tiny()
        _tiny_run(tmp_path / "wd", epochs=1, data=data)
        other = {"image": data["image"][::-1].copy(), "label": data["label"]}
        with pytest.raises(ValueError, match="cannot resume: the training data is not") as e:
            _tiny_run(tmp_path / "wd", epochs=2, data=other)
        assert "48 examples then, 48 now: the same length" in str(e.value)
        assert "restart=True" in str(e.value)
        assert int(_tiny_run(tmp_path / "wd", epochs=2, data=data).state.step) == 12

    def test_replaced_npy_files_of_a_stream_are_refused(self, tmp_path):
        from test_refusals import _tiny, _tiny_run

        from jaxnets import inputs

        def write(data):
            np.save(tmp_path / "x.npy", data["image"])
            np.save(tmp_path / "y.npy", data["label"])
            paths = {"image": tmp_path / "x.npy", "label": tmp_path / "y.npy"}
            return inputs.Stream(inputs.open_npy(paths))

        data = _tiny()
        _tiny_run(tmp_path / "wd", epochs=1, data=write(data))
        data["image"] = data["image"][::-1].copy()  # other examples, the same shapes
        with pytest.raises(ValueError, match="the training data is not the checkpointed"):
            _tiny_run(tmp_path / "wd", epochs=2, data=write(data))

    def test_replaced_files_of_an_idx_directory_change_its_fingerprint(self, tmp_path):
        from jaxnets import inputs
        from jaxnets.runs.fingerprint import data_fingerprint

        def write(images, labels):
            for name, array, code in (("images", images, 3), ("labels", labels, 1)):
                head = bytes([0, 0, 8, code]) + b"".join(
                    int(d).to_bytes(4, "big") for d in array.shape
                )
                (tmp_path / name).write_bytes(head + array.astype(np.uint8).tobytes())
            stream = inputs.Stream(inputs.open_idx(tmp_path / "images", tmp_path / "labels"))
            return data_fingerprint(stream), data_fingerprint(tmp_path)

        images = np.random.default_rng(0).integers(0, 255, (48, 5, 5))
        labels = np.arange(48) % 10
        first = write(images, labels)
        assert write(images, labels) == first  # the same content: the same identity
        swapped = write(images[::-1], labels)  # the same files' sizes, other examples
        assert swapped[0] != first[0] and swapped[1] != first[1]


def test_a_large_files_fingerprint_reads_samples_yet_sees_a_replaced_example(tmp_path, monkeypatch):
    from jaxnets import fingerprint

    monkeypatch.setattr(fingerprint, "WHOLE_BYTES", 2**16)  # a "large" file of 1 MiB
    x = np.random.default_rng(0).integers(0, 255, size=(1024, 1024), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    before = fingerprint.data_fingerprint(tmp_path / "x.npy")
    assert fingerprint.data_fingerprint(tmp_path) == fingerprint.data_fingerprint(tmp_path)
    x[::3] = x[::3][::-1]  # a third of the examples replaced by others
    np.save(tmp_path / "x.npy", x)
    assert fingerprint.data_fingerprint(tmp_path / "x.npy") != before
    reads = []
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, at: reads.append(n) or real(fd, n, at))
    fingerprint.data_fingerprint(tmp_path / "x.npy")
    assert sum(reads) == fingerprint.SAMPLES * fingerprint.BLOCK  # 1 MiB, not the whole file
    arrays = {"a": x}
    assert fingerprint.data_fingerprint(arrays) == fingerprint.data_fingerprint({"a": x.copy()})


LIBRARY = ROOT / "jaxnets"
FLAG = re.compile(r"(?<![\w-])--[a-z{][a-z0-9{}_-]*(?![\w])")
# The library's own command line (`python -m jaxnets doctor --json`: argparse's option names),
# the config fields' flags that `config.check_config` names by design (BAD_FLAG: the
# config is the command line), and another tool's command (`tfds build --file_format=...`).
ALLOWED = {
    ("__main__.py", "--json"),  # the library's own command line names its own flags
    ("__main__.py", "--source"),
    ("__main__.py", "--help"),
    ("core/checks.py", "--{flag}"),
    ("runs/config.py", "--no-"),  # flags_of: writing arguments as the config's flags is its job
    ("data/tfds_source.py", "--file_format"),
    ("data/tfds_source.py", "--data_dir"),
    ("runs/cli.py", "--logdir"),  # TensorBoard's own flag: the line saying how to view the logs
}


def _string_literals(tree):
    """Every string constant of a module but its docstrings (usage text may show flags)."""
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docs.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node


def test_no_library_message_names_a_command_line_flag():
    """Before: library errors told library users to pass --batch-size, --devices, --workdir,
    --restart, --epochs, --input (experiments' flags); the library names arguments now and
    the experiments translate (`config.errors_in_flags`)."""
    found = []
    for path in sorted(LIBRARY.rglob("*.py")):
        module = str(path.relative_to(LIBRARY))
        for node in _string_literals(ast.parse(path.read_text())):
            for flag in FLAG.findall(node.value):
                if (module, flag) not in ALLOWED:
                    found.append(f"jaxnets/{module}:{node.lineno}: {flag} in {node.value[:80]!r}")
    assert not found, "\n".join(found)


class TestClearRefusals:
    def test_library_errors_name_arguments_and_experiments_say_their_flags(self, tmp_path):
        from jaxnets import config, sharding

        with pytest.raises(ValueError) as e:
            sharding.check_batch(sharding.make_mesh(8), 100)
        assert "use batch_size=96 (a multiple of 8) or devices=4" in str(e.value)

        from experiments import mnist_cnn

        cfg = mnist_cnn.get_config()
        said = config.flags_of(str(e.value), cfg)
        assert "use --batch-size 96 (a multiple of 8) or --devices 4" in said
        text = "pass restart=True (or --no-x) or another workdir=<directory>. workdir='' bad"
        assert config.flags_of(text, cfg) == (
            "pass --restart (or --no-x) or another --workdir <directory>. --workdir '' bad"
        )

    def test_fitting_on_zero_examples_says_so(self, tmp_path):
        from test_refusals import _tiny_run

        empty = {k: v[:0] for k, v in __import__("test_refusals")._tiny().items()}
        with pytest.raises(ValueError, match="sample_batch has 0 examples"):
            _tiny_run(tmp_path / "wd", data=empty)
        import jax
        import optax

        from jaxnets import loop, train

        state = train.create_train_state({"w": np.zeros(2)}, optax.sgd(0.1), key=jax.random.key(0))
        with pytest.raises(ValueError, match="the training set has 0 examples: nothing to train"):
            loop.fit(
                state,
                lambda s, b, k: (s, {}),
                empty,
                data_key=jax.random.key(1),
                epochs=1,
                batch_size=8,
            )

    def test_limit_train_1_is_refused_before_the_model_divides_by_zero(self, tmp_path):
        """Before: ZeroDivisionError inside the model (0 training examples after the split)."""
        proc = _python(
            "from experiments import mnist_cnn; from jaxnets.runs.config import parse_config;"
            f"mnist_cnn.main(parse_config(mnist_cnn.get_config(), ['--limit-train', '1', "
            f"'--workdir', {str(tmp_path / 'wd')!r}, '--dataset', 'mnist_sample']))"
        )
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("ValueError: holding out 0.2 of 1 examples for validation"), last
        assert "ZeroDivisionError" not in proc.stderr

    def test_a_fractional_epochs_flag_says_what_it_must_be(self):
        """Before: "argument --epochs: invalid parse value: '1.5'"."""
        proc = _python(
            "from experiments import mnist_cnn; from jaxnets.runs.config import parse_config;"
            "parse_config(mnist_cnn.get_config(), ['--epochs', '1.5'])"
        )
        assert proc.returncode == 2
        assert "argument --epochs: '1.5' is not a whole number (the nearest is 2)" in proc.stderr
        assert "invalid parse value" not in proc.stderr

    def test_another_experiments_work_directory_is_refused_in_one_message(self, tmp_path):
        """Before: a diff of values the first run never had (the second's defaults), chained
        to the checkpoint's layout list: 88 lines."""
        import dataclasses

        from experiments import diabetes, digits

        wd = str(tmp_path / "wd")
        digits.main(dataclasses.replace(digits.get_config(), epochs=1, workdir=wd, progress=False))
        config = dataclasses.replace(diabetes.get_config(), epochs=1, workdir=wd, progress=False)
        with pytest.raises(ValueError) as e:
            diabetes.main(config)
        message = str(e.value)
        assert message.startswith(f"cannot resume: {wd} holds a run of another program")
        assert "--workdir <directory>" in message and "--restart" in message
        assert "saved" not in message and "\n" not in message
        assert e.value.__suppress_context__  # no chained layout list

    def test_a_step_directory_vanishing_during_a_resume_falls_back(self, tmp_path):
        """Before: FileNotFoundError moving the vanished step aside, the resume aborted."""
        import shutil

        import jax.numpy as jnp

        from jaxnets.runs.checkpoint import Checkpointer

        with Checkpointer(tmp_path / "c") as ckpt:
            for step in (1, 2):
                ckpt.save(step, {"w": jnp.ones(3) * step}, metadata={"s": step}, force=True)
        with Checkpointer(tmp_path / "c") as ckpt:
            assert ckpt.all_steps() == [1, 2]
            shutil.rmtree(tmp_path / "c" / "2")  # another process cleaning up, a disk fault
            with pytest.warns(RuntimeWarning, match="step 2 .* its directory is gone"):
                tree, meta, step = ckpt.restore({"w": jnp.zeros(3)})
        assert step == 1 and meta == {"s": 1} and float(tree["w"][0]) == 1.0

    def test_an_early_error_is_the_last_line_not_orbaxs_shutdown_traceback(self, tmp_path):
        """Before: an error soon after the checkpoint manager opened ended the process while
        Orbax's cleanup thread ran, which then failed at interpreter exit ("cannot schedule
        new futures after interpreter shutdown") after the real error."""
        for i in range(300):  # saves a killed run left half-written: Orbax cleans them up
            partial = tmp_path / "wd" / "checkpoints" / f"{i}.orbax-checkpoint-tmp-{i}" / "state"
            partial.mkdir(parents=True)
            (partial / "data").write_text("x")
        (tmp_path / "wd" / "metrics.jsonl").write_text('{"step": 6}\n')  # an earlier run's log
        (tmp_path / "wd" / "previous").write_text("a file where its logs would be kept")
        proc = _tiny_process(tmp_path / "wd")
        assert proc.returncode != 0
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("NotADirectoryError"), proc.stderr[-2000:]
        assert "cannot schedule new futures" not in proc.stderr
        assert not list((tmp_path / "wd" / "checkpoints").iterdir())  # the cleanup finished


class TestNumericsInUserCode:
    @staticmethod
    def _evaluation(loss, metrics=None, *, n=10, batch_size=4):
        import flax.linen as nn
        import jax
        import optax

        from jaxnets import adapters, evaluation, train

        rng = np.random.default_rng(0)
        data = {
            "image": rng.normal(size=(n, 4)).astype(np.float32),
            "label": (np.arange(n) % 3).astype(np.int32),
        }
        objective = adapters.linen(nn.Dense(3), loss=loss, metrics=metrics or {})
        state = train.create_train_state(
            objective.init, optax.sgd(0.1), data, key=jax.random.key(0)
        )
        validation = evaluation.make_evaluation(
            train.make_eval_step(objective.eval_fn),
            data,
            batch_size=batch_size,
            mesh=__import__("jaxnets").sharding.make_mesh(1),
        )
        logits = nn.Dense(3).apply({"params": state.params}, data["image"])
        return lambda: evaluation.evaluate(validation, state), logits, data["label"]

    def test_an_integer_loss_is_refused(self):
        """Before: a count of errors as the loss trained with a zero gradient, silently."""
        import jax.numpy as jnp

        run, _, _ = self._evaluation(lambda logits, y: (jnp.argmax(logits, -1) != y).astype(int))
        with pytest.raises(TypeError, match="int32 values of shape .*zero gradient"):
            run()

    def test_a_scalar_loss_leaves_out_the_padding_of_the_last_batch(self):
        """Before: 10 examples at batch 4: the padded last batch was left out entirely (or, on
        more devices, counted with its padding): val_loss off the truth in the 3rd digit."""
        from jaxnets import losses

        run, logits, labels = self._evaluation(
            lambda out, y: losses.softmax_cross_entropy(out, y, reduction="mean")
        )
        truth = float(losses.softmax_cross_entropy(logits, labels, reduction="mean"))
        assert run()["loss"] == pytest.approx(truth, rel=1e-6)

    def test_a_metric_of_shape_1_is_refused_not_averaged_with_the_padding(self):
        import jax.numpy as jnp

        from jaxnets import losses

        def batch_mean(logits, y, mask):
            return jnp.mean(
                losses.softmax_cross_entropy(logits, y, reduction="none"), keepdims=True
            )

        run, _, _ = self._evaluation(
            lambda out, y: losses.softmax_cross_entropy(out, y, reduction="none"),
            {"ce": batch_mean},
        )
        with pytest.raises(ValueError, match=r"metric 'ce' returned shape \(1,\) for a batch of 4"):
            run()

    def test_a_matrix_metric_reaches_tensorboard_jsonl_and_the_progress_bar(self, tmp_path):
        """Before: a confusion matrix never reached TensorBoard or the progress bar."""
        from tensorboardX.proto import event_pb2

        from jaxnets import hooks, writers

        record = {"kind": "epoch", "step": 6, "loss": 0.5, "confusion": [[3.0, 1.0], [0.0, 4.0]]}
        tb = writers.TensorBoardWriter(tmp_path / "tb")
        tb.write(record)
        tb.close()
        tags = set()
        for path in (tmp_path / "tb").rglob("events.out.tfevents.*"):
            raw, pos = path.read_bytes(), 0
            while pos + 12 <= len(raw):
                length = int.from_bytes(raw[pos : pos + 8], "little")
                event = event_pb2.Event.FromString(raw[pos + 12 : pos + 12 + length])
                pos += 16 + length
                tags |= {(v.tag, v.WhichOneof("value")) for v in event.summary.value}
        assert ("epoch/confusion", "image") in tags
        assert any(t.startswith("epoch/confusion") and k == "tensor" for t, k in tags)  # text
        assert ("epoch/loss", "simple_value") in tags
        assert "| 0 | 3 | 1 |" in writers.array_markdown(np.array(record["confusion"]))
        assert hooks._postfix(record["confusion"]) == "[3 1 0 4]"
        assert hooks._postfix(np.zeros((3, 3)).tolist()) == "[3x3]"
        jsonl = writers.JsonlWriter(tmp_path / "m.jsonl")
        jsonl.write(record)
        jsonl.close()
        assert writers.read_jsonl(tmp_path / "m.jsonl") == [record]

    def test_examples_left_out_by_the_last_partial_batch_are_said_once(self, tmp_path):
        """Before: 7 examples at batch 4 dropped 3 (43%) every epoch without a word."""
        import warnings

        from test_refusals import _tiny, _tiny_run

        data = {k: v[:44] for k, v in _tiny().items()}  # 44 examples at batch 8: 4 left out
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _tiny_run(tmp_path / "wd", epochs=3, data=data)
        said = [str(w.message) for w in caught if "training examples" in str(w.message)]
        assert said == [
            "each epoch trains on 40 of the 44 training examples: the last 4 (9%) of each "
            "epoch's shuffled order do not fill a batch of 8 and are left out (others each "
            "epoch). For every example every epoch, use a batch_size that divides 44 (e.g. 4 "
            "or 11)"
        ]
        from jaxnets.engine import indices

        indices._WARNED_DROPPED.clear()


class SeekSource:
    """A source sharing one file object's position between calls: not thread-safe."""

    def __init__(self, path, n, row):
        self.file, self.n, self.row = open(path, "rb"), n, row  # noqa: SIM115

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.file.seek(int(i) * self.row)
        time.sleep(0)  # another thread may run here, as during any real read of a large file
        raw = np.frombuffer(self.file.read(self.row), np.uint8)
        return {"image": raw[:-1].astype(np.float32).reshape(7, 4) / 255, "label": raw[-1] % 3}


class TestStreamThreadSafety:
    @pytest.fixture
    def records(self, tmp_path):
        rows = np.random.default_rng(0).integers(0, 255, (256, 29), dtype=np.uint8)
        rows.tofile(tmp_path / "rows")
        return tmp_path / "rows"

    def test_a_source_torn_by_threads_is_refused_before_training(self, records):
        """Before: read from several threads, it trained on torn examples, without a word."""
        from jaxnets import inputs

        with pytest.raises(
            ValueError, match="SeekSource returned another example .* num_threads=0"
        ):
            inputs.Stream(SeekSource(records, 256, 29), num_threads=4)

    def test_a_source_that_says_it_is_not_thread_safe_is_read_on_one_thread(self, records):
        from jaxnets import inputs

        source = SeekSource(records, 256, 29)
        source.thread_safe = False
        assert inputs.Stream(source).num_threads == 0  # the default follows the source
        with pytest.raises(ValueError, match=r"says it is not thread-safe"):
            inputs.Stream(source, num_threads=2)
        stream = inputs.Stream(source, num_threads=0)
        rows = np.arange(64).reshape(8, 8)
        batches = [b for b, _ in stream.batches(rows, 0)]
        want = np.stack([source[i]["image"] for i in range(64)]).reshape(8, 8, 7, 4)
        np.testing.assert_array_equal(np.stack([b["image"] for b in batches]), want)

    def test_arrays_and_row_files_are_not_probed(self, tmp_path, monkeypatch):
        from jaxnets import inputs

        monkeypatch.setattr(inputs, "PROBE_ROUNDS", None)  # a probe would fail on None
        np.save(tmp_path / "x.npy", np.zeros((16, 3), np.float32))
        inputs.Stream(inputs.open_npy({"x": tmp_path / "x.npy"}), num_threads=8)
        inputs.Stream(inputs.ArraySource({"x": np.zeros((16, 3))}), num_threads=8)


def test_a_users_config_json_is_kept_not_overwritten(tmp_path):
    """Before: a run in a directory of the user's overwrote its config.json."""
    from test_refusals import _tiny_run

    (tmp_path / "wd").mkdir()
    (tmp_path / "wd" / "config.json").write_text('{"mine": true}')
    _tiny_run(tmp_path / "wd", epochs=1)
    assert (tmp_path / "wd" / "previous" / "1" / "config.json").read_text() == '{"mine": true}'
    _tiny_run(tmp_path / "wd", epochs=1)  # finished: resumed, nothing moved
    assert not (tmp_path / "wd" / "previous" / "2").exists()


class TestNoCheckpointHoldsADivergedState:
    """Before: the non-finite check ran when a log window completed, but checkpoints were
    written at chunk boundaries, so with frequent saves and rare logs every kept checkpoint
    could hold NaN."""

    @staticmethod
    def _diverging(tmp_path, fit_hooks):
        import flax.linen as nn
        import jax
        import optax

        from jaxnets import adapters, checkpoint, loop, train

        data = __import__("test_refusals")._tiny()
        objective = adapters.linen(  # squared error: its gradient grows with the weights
            nn.Dense(3),
            loss=lambda z, y: ((z - jax.nn.one_hot(y, 3)) ** 2).mean(-1),
        )
        tx = optax.sgd(1e38)  # the weights finite after one step, inf after two
        state = train.create_train_state(objective.init, tx, data, key=jax.random.key(0))
        with checkpoint.Checkpointer(tmp_path / "ckpt", max_to_keep=100) as ckpt:
            with pytest.raises(FloatingPointError) as e:
                loop.fit(
                    state,
                    train.make_train_step(objective.loss_fn, tx),
                    data,
                    data_key=jax.random.key(1),
                    epochs=3,
                    batch_size=8,
                    hooks=fit_hooks(ckpt),
                    steps_per_call=1,
                )
            ckpt.wait_until_finished()
            saved = [ckpt.restore(state, step=s)[0] for s in ckpt.all_steps()]
        return str(e.value), saved

    @staticmethod
    def _finite(state):
        import jax

        return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))

    def test_the_checkpoint_hook_refuses_a_non_finite_state_without_any_guard(self, tmp_path):
        from jaxnets import hooks

        message, saved = self._diverging(
            tmp_path, lambda ckpt: [hooks.Checkpoint(ckpt, every_steps=1)]
        )
        assert "holds NaN or Inf: not saved" in message
        assert saved and all(self._finite(s) for s in saved)

    def test_frequent_saves_and_rare_logs_keep_only_finite_checkpoints(self, tmp_path):
        from jaxnets import hooks

        sink = type("Sink", (), {"write": lambda self, r: None, "close": lambda self: None})()
        message, saved = self._diverging(
            tmp_path,
            lambda ckpt: [
                hooks.NonFinite(),
                hooks.Log(sink, every_steps=100),
                hooks.Checkpoint(ckpt, every_steps=1),
            ],
        )
        assert message.startswith("non-finite training loss at step")
        assert saved and all(self._finite(s) for s in saved)


def test_a_streamed_example_holding_nan_is_named():
    """Before: NaN inputs in a streamed set surfaced as "lower the learning rate"."""
    import test_train

    from jaxnets import inputs

    images, labels = test_train._data()
    images = images.astype(np.float32)
    images[37, 2, 3, 0] = np.nan
    stream = inputs.Stream(inputs.ArraySource(test_train._batch(images, labels)))
    with pytest.raises(ValueError, match=r"streamed example 37 holds NaN or Inf"):
        test_train._run(devices=1, k=2, train_data=stream, evaluate=False)
