"""Executes the Colab notebook locally, headless, with parameters; keeps the executed copy.

Run from the repository root (after `make run` or `make test` has built .venv):
    .venv/bin/python scripts/run_notebook.py                    # bundled sample, 2 epochs, CPU
    .venv/bin/python scripts/run_notebook.py -p EPOCHS=5 -p DATASET=mnist --cpu-devices 8

The parameters cell (the cell tagged `parameters`, papermill's convention) is replaced by the
defaults below and the `-p NAME=VALUE` values (Python literals; anything else is a string).
The notebook runs in this Python's ipykernel with the repository root on PYTHONPATH (so
`jaxnets` and `experiments` are importable without an install, `JAXNETS_SOURCE=""`); every
cell has `--timeout` seconds. The executed copy (with outputs, also when a cell fails) goes to
`runs/notebook/colab_tpu.ipynb`, the training run to `runs/notebook/mnist_cnn`. Running it
again resumes that run (the notebook's resume cell adds one more epoch each time).
"""

from __future__ import annotations

import argparse
import ast
import copy
import os
import sys
from pathlib import Path
from typing import Any

import nbformat

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "colab_tpu.ipynb"
OUTPUT = ROOT / "runs" / "notebook" / "colab_tpu.ipynb"
LOCAL_PARAMETERS = {
    "JAXNETS_SOURCE": "",
    "DATASET": "mnist_sample",
    "EPOCHS": 2,
    "WORKDIR": str(ROOT / "runs" / "notebook" / "mnist_cnn"),
    "SHOW_TENSORBOARD": False,  # headless: no TensorBoard server
}


def parameters_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The code cell tagged `parameters`; ValueError when there is none or more than one."""
    cells = [
        c
        for c in nb.cells
        if c.cell_type == "code" and "parameters" in c.get("metadata", {}).get("tags", [])
    ]
    if len(cells) != 1:
        raise ValueError(
            f"the notebook has {len(cells)} code cells tagged 'parameters'; it needs exactly one "
            '(cell metadata {"tags": ["parameters"]})'
        )
    return cells[0]


def notebook_parameters(nb: nbformat.NotebookNode) -> dict[str, Any]:
    """`{NAME: default}` of the parameters cell's `NAME = literal` assignments, in order."""
    params = {}
    for node in ast.parse(parameters_cell(nb).source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            params[node.targets[0].id] = ast.literal_eval(node.value)
    return params


def with_parameters(nb: nbformat.NotebookNode, values: dict[str, Any]) -> nbformat.NotebookNode:
    """A copy of `nb` whose parameters cell assigns `values` over the defaults."""
    defaults = notebook_parameters(nb)
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown notebook parameters {unknown}; the notebook has {list(defaults)}"
        )
    nb = copy.deepcopy(nb)
    cell = parameters_cell(nb)
    merged = {**defaults, **values}
    cell.source = "\n".join(f"{name} = {value!r}" for name, value in merged.items())
    return nb


def check_kernel() -> None:
    """Raises unless the `python3` kernel runs this Python (which has jaxnets' dependencies)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel as e:
        raise RuntimeError(
            f"no 'python3' Jupyter kernel; install ipykernel into {sys.prefix}"
        ) from e
    exe = spec.argv[0]
    if exe not in ("python", "python3") and Path(exe).resolve() != Path(sys.executable).resolve():
        raise RuntimeError(
            f"the 'python3' kernel ({spec.resource_dir}) runs {exe}, not {sys.executable}; "
            f"fix: {sys.executable} -m ipykernel install --sys-prefix, and remove that kernel spec"
        )


def execute(
    nb: nbformat.NotebookNode,
    *,
    cwd: str | os.PathLike = ROOT,
    env: dict[str, str] | None = None,
    timeout: int = 600,
) -> nbformat.NotebookNode:
    """Runs every cell of `nb` in place in a fresh `python3` kernel; returns `nb` with outputs.

    Raises `nbclient.exceptions.CellExecutionError` at the first failing cell (`nb` keeps the
    outputs so far) and `CellTimeoutError` after `timeout` seconds in one cell.
    """
    from nbclient import NotebookClient

    check_kernel()
    kernel_env = dict(os.environ if env is None else env)
    kernel_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), kernel_env.get("PYTHONPATH", "")) if p
    )
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3")
    client.execute(cwd=str(cwd), env=kernel_env)
    return nb


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--notebook", type=Path, default=NOTEBOOK)
    parser.add_argument("--output", type=Path, default=OUTPUT, help="the executed copy")
    parser.add_argument(
        "-p",
        "--parameter",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a notebook parameter (repeatable), e.g. -p EPOCHS=3 -p LIMIT_TRAIN=None",
    )
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=None,
        help="fake N CPU devices (XLA_FLAGS) to see the notebook pmap over N devices",
    )
    args = parser.parse_args(argv)
    values = dict(LOCAL_PARAMETERS)
    for item in args.parameter:
        name, sep, text = item.partition("=")
        if not sep:
            parser.error(f"-p {item!r}: expected NAME=VALUE, e.g. -p EPOCHS=3")
        values[name.strip()] = _literal(text)
    env = dict(os.environ)
    if args.cpu_devices:
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.cpu_devices}"
        )
    nb = with_parameters(nbformat.read(args.notebook, as_version=4), values)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    try:
        execute(nb, env=env, timeout=args.timeout)
    finally:
        nbformat.write(nb, args.output)
        print(f"executed notebook: {args.output}")
    print(f"run: {values['WORKDIR']} (curves.png, summary.json, metrics.jsonl, checkpoints/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
