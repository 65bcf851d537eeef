"""Installs a built jaxnets wheel into this Python's environment, as a user would, and checks
that it replaced none of the packages already there.

Run with the environment's Python (`make test-compat` does, in .venv-compat: today's Colab
stack):

    .venv-compat/bin/python scripts/check_install.py --constraints jaxnets/constraints/colab.txt \\
        build/compat/jaxnets-0.1.0-py3-none-any.whl

Before: a previous jaxnets is uninstalled and every installed distribution's version recorded.
Then a plain `pip install WHEEL` (no constraints: pip keeps what satisfies the wheel's lower
bounds, and would upgrade what does not). After: every distribution installed before must be
there at the same version, every `name==version` line of `--constraints` must still hold, and
`pip check` must find the requirements satisfied. Exit status 1, naming each package, if not.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path


def _name(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def installed() -> dict[str, str]:
    """{distribution: version} of this environment, read in a fresh process (pip changed it)."""
    code = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return {_name(k): v for k, v in json.loads(out.stdout).items()}


def pinned(path: Path) -> dict[str, str]:
    """{name: version} of the `name==version` lines of a constraints file."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_name(name)] = version.strip()
    return pins


def changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """'name old -> new' for every distribution of `before` whose version changed or vanished."""
    return [
        f"{name} {version} -> {after.get(name, 'removed')}"
        for name, version in sorted(before.items())
        if after.get(name) != version
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("wheel", type=Path)
    parser.add_argument("--constraints", type=Path, help="versions that must still hold after")
    args = parser.parse_args(argv)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "uninstall", "-q", "-y", "jaxnets"], check=True)
    before = installed()
    subprocess.run([*pip, "install", "-q", str(args.wheel)], check=True)
    after = installed()
    problems = [f"replaced: {c}" for c in changes(before, after)]
    if args.constraints:
        problems += [
            f"{name}=={version} ({args.constraints}) is now {after.get(name, 'not installed')}"
            for name, version in pinned(args.constraints).items()
            if after.get(name) != version
        ]
    check = subprocess.run([*pip, "check"], capture_output=True, text=True)
    if check.returncode:
        problems.append(f"pip check: {check.stdout.strip()}")
    added = sorted(f"{n} {v}" for n, v in after.items() if n not in before)
    print(f"installed {args.wheel.name}; added: {', '.join(added) or 'nothing'}")
    print(f"jaxnets {importlib.metadata.version('jaxnets')} over {len(before)} distributions")
    if problems:
        print("the wheel's install changed the environment:", *problems, sep="\n  ")
        return 1
    print(f"none of the {len(before)} distributions installed before changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
