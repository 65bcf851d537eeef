"""The array cache: every data source read once, then loaded as a dense `.npz`."""

from __future__ import annotations

import hashlib
import logging
import os

import numpy as np

logger = logging.getLogger("jaxnets.data")

_CACHE_VERSION = 1


def default_cache_dir() -> str:
    """``$JAXNETS_CACHE_DIR``, else ``$XDG_CACHE_HOME/jaxnets``, else ``~/.cache/jaxnets``."""
    if "JAXNETS_CACHE_DIR" in os.environ:
        return os.environ["JAXNETS_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxnets")


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
    cache; an unwritable cache directory only costs a warning.

    Returns:
      (images, labels, hit): ``hit`` is True when the arrays came from the cache.
    """
    path = os.path.join(cache_dir or default_cache_dir(), key + ".npz")
    if os.path.isfile(path):
        try:
            with np.load(path, allow_pickle=False) as z:
                return z["images"], z["labels"], True
        except (OSError, ValueError, KeyError) as e:
            logger.warning("ignoring unreadable cache %s (%s); rebuilding it", path, e)
    images, labels = build()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(f, images=images, labels=labels)
        os.replace(tmp, path)
    except OSError as e:
        logger.warning("could not write the cache %s (%s); set JAXNETS_CACHE_DIR", path, e)
    return images, labels, False
