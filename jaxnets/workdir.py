"""Work directories: can this one hold a run, and may a checkpointed run resume with this config."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from jaxnets.config import config_diff

START_FRESH = (
    "To start fresh, pass --restart (discards this run's checkpoints) or use a new --workdir."
)


DISK_FULL = (
    "{path} has {free:.1f} MiB free but {what} needs about {need:.1f} MiB; free space there "
    "or use another directory{previous}"
)


def check_free_space(
    path: str | os.PathLike, required_bytes: int, *, what: str, previous: str = ""
):
    """Raises OSError(ENOSPC) naming `path` and the space needed when it has less free."""
    path = os.path.abspath(os.fspath(path))
    free = shutil.disk_usage(path).free
    if free < required_bytes:
        raise OSError(
            errno.ENOSPC,
            DISK_FULL.format(
                path=path,
                free=free / 2**20,
                what=what,
                need=required_bytes / 2**20,
                previous=previous,
            ),
        )


def check_resumable(
    saved_config: Mapping[str, Any],
    current_config: Mapping[str, Any],
    *,
    keys: Sequence[str] | None = None,
    ignore: Sequence[str] = (),
) -> None:
    """Raises ValueError listing every config field that differs from the saved run's.

    Args:
      saved_config: `config_to_dict` of the run that wrote the checkpoint.
      current_config: the same for this run.
      keys: compare only these fields (default: all fields of either).
      ignore: fields allowed to change on resume (e.g. `epochs`, `workdir`).
    """
    missing = object()
    diff = [
        (k, saved_config.get(k, missing), current_config.get(k, missing))
        for k, _, _ in config_diff(dict(saved_config), dict(current_config), keys)
        if k not in ignore
    ]
    if not diff:
        return
    show = lambda v: "<absent>" if v is missing else repr(v)
    lines = "\n".join(f"  {k}: saved {show(s)}, current {show(c)}" for k, s, c in diff)
    raise ValueError(
        f"cannot resume: the config differs from the checkpointed run in {len(diff)} "
        f"field(s):\n{lines}\nRun with the saved values to resume. {START_FRESH}"
    )


def check_workdir_writable(path: str | os.PathLike, *, required_bytes: int = 0) -> None:
    """Raises a clear error now if `path` cannot hold checkpoints, instead of mid-training.

    Creates `path` if missing, writes and deletes a probe file, and checks free space.

    Args:
      path: the directory checkpoints (or a whole run) will be written to.
      required_bytes: the free space needed (e.g. a few times the state's size).
    """
    path = os.path.abspath(os.fspath(path))
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-") as probe:
            probe.write(b"jaxnets")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as e:
        raise PermissionError(
            f"work directory {path} is not writable ({e.strerror or e}); fix its permissions "
            "or use another directory"
        ) from None
    check_free_space(path, required_bytes, what="a checkpoint of this run")
