"""`python -m jaxnets COMMAND`: `doctor` checks the installation (versions, devices, data)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxnets", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    doctor_parser = commands.add_parser(
        "doctor", help="versions against the tested pins, devices, data sets, known problems"
    )
    doctor_parser.add_argument(
        "--json", action="store_true", help="print the report as JSON instead of text"
    )
    args = parser.parse_args(argv)
    if args.command == "doctor":
        import json

        from jaxnets.doctor import doctor

        report = doctor(print_report=not args.json)
        if args.json:
            print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
