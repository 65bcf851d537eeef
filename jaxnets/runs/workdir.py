"""Work directories: can this one hold a run, and may a checkpointed run resume with this config."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

from jaxnets.runs.config import config_diff

START_FRESH = (
    "To start fresh, pass restart=True (discards this run's checkpoints) or another "
    "workdir=<directory>."
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


NO_WORKDIR = (
    "workdir={path!r}: an empty work directory would be the current directory ({cwd}), whose "
    "own checkpoints/, tb/ and config.json a run overwrites; name a directory for the run, "
    "e.g. workdir='runs/mine'"
)
WORKDIR_IS_FILE = (
    "workdir={path!r} is a file ({kind}), not a directory: the run could not write its "
    "results there after training; remove it or name another directory"
)
FOREIGN_FILES = (
    "restart would delete {where}, but it holds {name!r}, which jaxnets did not write: "
    "{where} is not (only) a jaxnets run's, so nothing was deleted. Move your files out of it "
    "or give the run a work directory of its own"
)

# What a run writes under `checkpoints/` (Orbax steps, their in-progress saves, the
# quarantined unreadable steps) and under `tb/` (event files): all `restart` may delete.
_RUN_ENTRIES = {
    "checkpoints": re.compile(r"\d+(\.orbax-checkpoint-tmp-.*)?|corrupted"),
    "tb": re.compile(r"events\.out\.tfevents\..*"),
}
# The logs of a run; kept under `previous/<n>/` when a fresh run starts over them.
_LOGS = ("config.json", "metrics.jsonl", "tb", "summary.json", "curves.png")


def check_workdir_path(path: str | os.PathLike) -> None:
    """Raises ValueError for a work directory that is no place for a run: an empty string
    (the current directory) or an existing file. Checked before anything is written."""
    text = os.fspath(path)
    if not str(text).strip():
        raise ValueError(NO_WORKDIR.format(path=text, cwd=os.getcwd()))
    if os.path.exists(text) and not os.path.isdir(text):
        raise NotADirectoryError(
            errno.ENOTDIR, WORKDIR_IS_FILE.format(path=str(text), kind=_kind(text))
        )


def _kind(path: str) -> str:
    return f"{os.path.getsize(path)} bytes" if os.path.isfile(path) else "not a regular file"


def discard_run(path: str | os.PathLike) -> None:
    """Deletes a run's `checkpoints/` and `tb/` (`restart`), after checking that everything in
    them is what a run writes: a directory jaxnets did not fill is refused, nothing deleted."""
    path = os.fspath(path)
    found = [
        os.path.join(path, name)
        for name in _RUN_ENTRIES
        if os.path.lexists(os.path.join(path, name))
    ]
    for where in found:
        pattern = _RUN_ENTRIES[os.path.basename(where)]
        if os.path.islink(where) or not os.path.isdir(where):
            raise FileExistsError(FOREIGN_FILES.format(where=where, name=os.path.basename(where)))
        for name in sorted(os.listdir(where)):
            if not pattern.fullmatch(name):
                raise FileExistsError(FOREIGN_FILES.format(where=where, name=name))
    for where in found:
        shutil.rmtree(where, ignore_errors=True)


def keep_previous_logs(
    path: str | os.PathLike, config: Mapping[str, Any] | None = None
) -> str | None:
    """Moves the files of an earlier run (or a user's) that this fresh run would overwrite
    or mix with (config.json, metrics.jsonl, tb/, summary.json, curves.png) to `previous/<n>/`.

    A run that starts at step 0 in a directory with logs (checkpoints off, or killed before
    its first save) keeps them rather than deleting them; a config.json alone that is
    `config` (the same run starting again) stays. Returns the directory they went to.
    """
    path = os.fspath(path)
    present = [n for n in _LOGS if os.path.lexists(os.path.join(path, n))]
    if present == ["config.json"] and _holds(os.path.join(path, "config.json"), config):
        return None  # the same run's config: rewritten as it is
    if not present:
        return None
    n = 1
    while os.path.lexists(target := os.path.join(path, "previous", str(n))):
        n += 1
    os.makedirs(target)
    for name in present:
        os.replace(os.path.join(path, name), os.path.join(target, name))
    with open(os.path.join(target, "moved"), "w") as f:
        f.write(f"moved here by a fresh run at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    return target


ANOTHER_RUN = (
    "cannot resume: {path} holds a run of another program (its config has {n} field(s) this "
    "one does not: {fields}), and its checkpoint does not fit this model. One work directory "
    "holds one run: give this one another workdir=<directory>, or pass restart=True to "
    "discard that run"
)


def check_same_program(
    saved_config: Mapping[str, Any], current_config: Mapping[str, Any], *, path: Any
) -> None:
    """Raises ValueError, in one line, when a work directory's run is of another program
    (its saved config has fields the current one lacks): comparing values field by field
    would list values the saved run never had."""
    foreign = sorted(set(saved_config) - set(current_config))
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ValueError(ANOTHER_RUN.format(path=path, n=len(foreign), fields=shown))


def _holds(path: str, config: Mapping[str, Any] | None) -> bool:
    try:
        with open(path) as f:
            return json.load(f) == json.loads(json.dumps(dict(config or {}), default=str))
    except (OSError, ValueError):
        return False


def check_workdir_writable(path: str | os.PathLike, *, required_bytes: int = 0) -> None:
    """Raises a clear error now if `path` cannot hold checkpoints, instead of mid-training.

    Creates `path` if missing, writes and deletes a probe file, and checks free space.

    Args:
      path: the directory checkpoints (or a whole run) will be written to.
      required_bytes: the free space needed (e.g. a few times the state's size).
    """
    check_workdir_path(path)
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
