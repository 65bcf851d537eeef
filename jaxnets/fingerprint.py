"""Per-leaf fingerprints of a pytree, computed on the device, independent of sharding.

A 64-bit fingerprint per leaf from wrapping uint32 sums: exact and associative, so the value
does not depend on how an array is sharded. Orbax does not checksum array data (a flipped
byte in a data file restores silently); `jaxnets.checkpoint` stores these and checks them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def _fmix32(h: jax.Array) -> jax.Array:
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: Any) -> jax.Array:
    x = jnp.asarray(x)
    if jnp.iscomplexobj(x):
        x = jnp.stack([x.real, x.imag], axis=-1)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


@jax.jit
def fingerprints(leaves: list[Any]) -> jax.Array:
    """uint32[len(leaves), 2]: (sum of words, sum of position-mixed words) per leaf."""
    rows = []
    for x in leaves:
        w = _words(x)
        i = jnp.arange(w.size, dtype=jnp.uint32)
        mixed = _fmix32(w ^ _fmix32(i + jnp.uint32(0x9E3779B9)))
        rows.append(jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(mixed, dtype=jnp.uint32)]))
    return jnp.stack(rows) if rows else jnp.zeros((0, 2), jnp.uint32)
