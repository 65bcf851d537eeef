"""Type aliases shared by every jaxnets module."""

from typing import Any

import jax

Array = jax.Array
PRNGKey = jax.Array
PyTree = Any
Params = PyTree
Batch = PyTree  # any pytree of arrays with a leading example axis, e.g. {'image', 'label'}

# The mesh axis the batch is split over (`jaxnets.engine.sharding`); models that run per-device code
# (`shard_map`) find it here without importing the engine.
DATA_AXIS = "data"
