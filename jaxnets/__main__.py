"""`jaxnets COMMAND` (or `python -m jaxnets COMMAND`): `doctor` checks the installation
(versions, devices, data); `run EXPERIMENT` runs one of the experiments of a source tree."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

EXPERIMENTS = ("mnist_cnn", "two_layer_sigmoid", "l1_sparsity", "sweep", "digits", "diabetes")

NO_SOURCE_TREE = (
    "`jaxnets run` needs jaxnets' source tree: the experiments are programs in its "
    "experiments/ folder, which the wheel does not install. Run it from a clone (or an "
    "unzipped source zip from `make wheel`), or pass --source PATH"
)


def find_source_tree(start: str | os.PathLike) -> Path | None:
    """The folder at or above `start` that holds experiments/mnist_cnn.py, or None."""
    for folder in (Path(start).resolve(), *Path(start).resolve().parents):
        if (folder / "experiments" / "mnist_cnn.py").is_file():
            return folder
    return None


def run_experiment(name: str, args: Sequence[str], source: Path) -> int:
    """`python -m experiments.NAME ARGS` with `source` on the path; returns its exit status."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(source), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", f"experiments.{name}", *args], env=env).returncode


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxnets", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    doctor_parser = commands.add_parser(
        "doctor", help="versions against the tested stacks, devices, data sets, known problems"
    )
    doctor_parser.add_argument(
        "--json", action="store_true", help="print the report as JSON instead of text"
    )
    run_parser = commands.add_parser(
        "run",
        help="run an experiment of the source tree (e.g. `jaxnets run mnist_cnn --help`)",
    )
    run_parser.add_argument("experiment", choices=EXPERIMENTS)
    run_parser.add_argument(
        "--source", type=Path, default=None, help="the source tree (default: found from here)"
    )
    run_parser.add_argument("args", nargs=argparse.REMAINDER, help="the experiment's flags")
    args = parser.parse_args(argv)
    if args.command == "run":
        source = find_source_tree(args.source or Path.cwd())
        if source is None:
            parser.error(NO_SOURCE_TREE)
        return run_experiment(args.experiment, args.args, source)
    if args.command == "doctor":
        import json

        from jaxnets.doctor import doctor

        report = doctor(print_report=not args.json)
        if args.json:
            print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
