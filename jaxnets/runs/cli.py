"""An experiment's command line: its config's flags parsed, the run, what it printed, and the
process's exit status."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxnets.runs.config import flags_of, parse_config


def command_line(
    get_config: Callable[[], Any],
    main: Callable[[Any], Mapping[str, Any]],
    description: str,
    *,
    shown: Sequence[str] = ("test", "params_sha256"),
) -> None:
    """An experiment's `__main__`: its flags parsed into its config, `main(config)` run, the
    summary's `shown` entries printed with where the work directory's files are, and the
    process exiting with the run's status (`exit_status`)."""
    logging.basicConfig(format="%(message)s", force=True)
    logging.getLogger("jaxnets").setLevel(logging.INFO)  # the run's status lines
    config = parse_config(get_config(), description=description)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_InFlags(config))
    out = main(config)
    wd = Path(config.workdir)
    print(json.dumps({k: out[k] for k in shown}, indent=2))
    if out["stopped_early"]:
        print(
            f"stopped by a signal at step {out['step']} (checkpoint saved); "
            "run the same command again to resume"
        )
    print(
        f"plot: {wd / 'curves.png'}\nmetrics: {wd / 'metrics.jsonl'}\n"
        f"summary: {wd / 'summary.json'}\ntensorboard events: {wd / 'tb'} (to view them: "
        f"pip install tensorboard && tensorboard --logdir {wd / 'tb'})"
    )
    raise SystemExit(exit_status(out))


class _InFlags(logging.Filter):
    """The library's status lines as the command line's user reads them: the arguments they
    name (`restart=True`, `epochs=...`) written as this experiment's flags (`flags_of`)."""

    def __init__(self, config: Any):
        super().__init__()
        self.config = config

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("jaxnets"):
            record.msg, record.args = flags_of(record.getMessage(), self.config), None
        return True


def exit_status(summary: Mapping[str, Any]) -> int:
    """The process exit status of a run: 0 when it finished; 128 + the signal's number
    (130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP) when a signal stopped it after saving,
    as a shell reports a process the signal killed, so schedulers and `&&` know it did not
    finish."""
    signum = summary.get("stop_signal")
    return 128 + int(signum) if summary.get("stopped_early") and signum else 0
