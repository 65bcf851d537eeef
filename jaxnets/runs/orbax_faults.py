"""Orbax's failures, made readable: a full disk as one OSError, abandoned reads' noise dropped."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import traceback
from collections.abc import Iterator

DISK_FILLED = (
    "{directory}: the disk filled up while a checkpoint was written ({error}); free space "
    "there or use another directory. The previous checkpoint is intact (a save is renamed "
    "into place only once complete)"
)


@contextlib.contextmanager
def disk_errors(directory: str) -> Iterator[None]:
    """A full disk met mid-save (another writer took the space) as one clear OSError.

    Orbax reports it from TensorStore as `ValueError: RESOURCE_EXHAUSTED ...` or from Python
    as `OSError: [Errno 28]`, once per file it was writing.
    """
    try:
        yield
    except Exception as e:
        text = str(e)
        if getattr(e, "errno", None) == errno.ENOSPC or any(
            s in text for s in ("No space left", "RESOURCE_EXHAUSTED")
        ):
            first = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            raise OSError(
                errno.ENOSPC, DISK_FILLED.format(directory=directory, error=first)
            ) from None
        raise


def disk_bytes(path: str) -> int:
    """Space a directory's files take on disk (allocated blocks, not their lengths)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def _is_abandoned_read(exc_type, exc, tb) -> bool:
    """An Orbax read cancelled by a failed restore, finishing into its closed event loop."""
    if exc_type is not RuntimeError or str(exc) != "Event loop is closed":
        return False
    frames = [f.f_code.co_name for f, _ in traceback.walk_tb(tb)]
    return "call_soon_threadsafe" in frames or "_check_closed" in frames


def _abandoned_read_log(record: logging.LogRecord) -> bool:
    """asyncio's report of an abandoned array read: a Task (its coroutine named) or a bare
    Future (only TensorStore's error in it) whose exception nobody retrieved."""
    message = record.getMessage()
    if message.startswith("Task exception was never retrieved"):
        return "async_deserialize" in message
    if message.startswith("Future exception was never retrieved"):
        return "OCDBT database" in message or '"zarr" driver' in message
    return False


def silence_abandoned_reads() -> None:
    """Keeps a failed restore's message readable (installed once, process-wide).

    When one array of a checkpoint is unreadable, Orbax's restore stops and closes its
    event loop while TensorStore still reads the others; each of those reads then reports
    `RuntimeError: Event loop is closed` as an unraisable exception (hundreds of lines over
    the CheckpointError that says what is wrong), and asyncio logs each abandoned read's
    own error ("Task/Future exception was never retrieved"). Only those are dropped.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_jaxnets_filter", False):
        return
    logging.getLogger("asyncio").addFilter(lambda record: not _abandoned_read_log(record))

    def hook(args):
        if not _is_abandoned_read(args.exc_type, args.exc_value, args.exc_traceback):
            previous(args)

    hook._jaxnets_filter = True  # type: ignore[attr-defined]  # marks our hook as installed
    sys.unraisablehook = hook


def await_background_cleanup(manager) -> None:
    """Waits for the temporary-directory cleanup an Orbax `CheckpointManager` starts in a
    thread when it opens, which its `close()` does not wait for: a process that ends soon
    after (an early error) would otherwise print "cannot schedule new futures after
    interpreter shutdown" from that thread after the real error."""
    wait = getattr(manager, "_maybe_await_cleanup_tmp_directory", None)
    if wait is not None:
        with contextlib.suppress(Exception):  # a failed cleanup costs nothing but the cleanup
            wait()
