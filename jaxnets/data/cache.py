"""The array cache: every data source read once, then loaded as a dense `.npz`."""

from __future__ import annotations

import hashlib
import logging
import os

import numpy as np

logger = logging.getLogger("jaxnets.data")

_CACHE_VERSION = 2  # 2: entries record their source


def default_cache_dir() -> str:
    """``$JAXNETS_CACHE_DIR``, else ``$XDG_CACHE_HOME/jaxnets``, else ``~/.cache/jaxnets``."""
    if "JAXNETS_CACHE_DIR" in os.environ:
        return os.environ["JAXNETS_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxnets")


_WARNED: set[str] = set()


def cache_write_failed(path: str | os.PathLike, error: OSError) -> None:
    """Warns, once per process and cache directory, that a cache entry could not be written.

    A cache only saves time: an unwritable home, a cache path that is a file or a full disk
    must never stop a run. Callers catch the OSError and call this instead of raising.
    """
    where = os.path.dirname(os.path.abspath(os.fspath(path)))
    if where in _WARNED:
        return
    _WARNED.add(where)
    logger.warning(
        "the jaxnets cache is not writable at %s (%s); running without it (slower: the next "
        "run repeats what it would have read there). Set JAXNETS_CACHE_DIR to a writable "
        "directory to keep it",
        path,
        error.strerror or error,
    )


def fingerprint(paths: list[str]) -> str:
    """A cache key from the absolute paths, sizes and modification times of ``paths``."""
    parts = [f"v{_CACHE_VERSION}"]
    for p in sorted(paths):
        st = os.stat(p)
        parts.append(f"{os.path.abspath(p)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def cached(cache_dir: str | None, key: str, build) -> tuple[np.ndarray, np.ndarray, bool]:
    """Returns ``build()``'s (images, labels), stored as an uncompressed ``.npz`` under ``key``.

    The file is written to a temporary name and renamed, so a crash never leaves a partial
    cache; an unwritable cache directory only costs a warning. Every read is verified: the
    zip's CRC-32 of each array's bytes (a flipped or truncated byte fails it) and the source
    identity the entry was built from (``key``, which `fingerprint` derives from the source
    files' paths, sizes and times). An entry that fails either is rebuilt, with a warning
    naming its file, rather than failing every later run or being trusted.

    Returns:
      (images, labels, hit): ``hit`` is True when the arrays came from the cache.
    """
    path = os.path.join(cache_dir or default_cache_dir(), key + ".npz")
    if os.path.isfile(path):
        try:
            return (*_read_verified(path, key), True)
        except Exception as e:  # noqa: BLE001 - any unreadable entry is rebuilt, never fatal
            logger.warning(
                "the cache entry %s is unusable (%s: %s); rebuilding it from its source",
                path,
                type(e).__name__,
                e,
            )
    images, labels = build()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(f, images=images, labels=labels, source=np.array(key))
        os.replace(tmp, path)
    except OSError as e:
        cache_write_failed(path, e)
    return images, labels, False


def _read_verified(path: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    # Reading a member to its end checks its CRC-32 (zipfile.BadZipFile otherwise).
    with np.load(path, allow_pickle=False) as z:
        source = str(z["source"]) if "source" in z.files else None
        if source != key:
            raise ValueError(f"built from {source!r}, not from this source ({key!r})")
        return z["images"], z["labels"]
