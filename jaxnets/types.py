"""Type aliases shared by every jaxnets module."""

from typing import Any

import jax

Array = jax.Array
PRNGKey = jax.Array
PyTree = Any
Params = PyTree
Batch = tuple[jax.Array, jax.Array]
