"""Where arrays live: a mesh over the devices, the batch split over its data axis, and
sharding rules for the train state (replicated, or FSDP: sharded over the data axis).

The train step is a function of the **global** batch, jitted with these shardings; XLA
inserts the collectives (the gradient all-reduce, FSDP's all-gathers). User code never names
an axis.

Example:
    >>> mesh = make_mesh()                          # every device, one axis "data"
    >>> rule = fsdp(min_bytes=2**20)                # or `replicated`
    >>> shardings = state_shardings(state, mesh, rule)
    >>> state = place(state, shardings)             # global arrays, sharded by the rule
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxnets.core.types import DATA_AXIS
from jaxnets.engine.platform import check_backend

DATA = DATA_AXIS  # the mesh axis the batch (and FSDP's state) is split over

# (mesh, shape, dtype) -> PartitionSpec of one state leaf.
Rule = Callable[[Mesh, tuple, Any], P]

BATCH_NOT_DIVISIBLE = (
    "global batch {batch} is not divisible by {n} devices; use batch_size={suggestion} "
    "(a multiple of {n}) or devices={divisor}"
)


def make_mesh(devices: Sequence[Any] | int | None = None) -> Mesh:
    """A 1-D mesh with axis `DATA` over `devices`.

    Args:
      devices: the devices to use; an int takes the first n of `jax.devices()`; None: all
        (over every process when `jax.distributed` is initialised).
    """
    check_backend()  # JAX_PLATFORMS naming a backend that cannot start: say why
    all_devices = jax.devices()
    if devices is None:
        chosen = list(all_devices)
    elif isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        if not 1 <= devices <= len(all_devices):
            raise ValueError(
                f"devices={devices} asked for, but {len(all_devices)} "
                f"{all_devices[0].platform} device(s) are available; use 1..{len(all_devices)} "
                "(or None: all)"
            )
        if jax.process_count() > 1 and devices != len(all_devices):
            raise ValueError(
                f"devices={devices}: with several processes, use all {len(all_devices)} devices "
                "(devices=None)"
            )
        chosen = list(all_devices[:devices])
    elif isinstance(devices, (str, bytes, float, bool)) or not isinstance(devices, Sequence):
        raise TypeError(
            f"devices={devices!r}: must be an int (the first n devices), a sequence of "
            "jax devices, or None (all)"
        )
    else:
        chosen = list(devices)
        if not chosen or not all(isinstance(d, jax.Device) for d in chosen):
            raise TypeError(f"devices={devices!r}: a non-empty sequence of jax devices")
    return Mesh(np.array(chosen), (DATA,))


def num_devices(mesh: Mesh) -> int:
    return int(mesh.devices.size)


def local_devices(mesh: Mesh) -> list:
    return [d for d in mesh.devices.flat if d.process_index == jax.process_index()]


def check_batch(mesh: Mesh, global_batch: int) -> int:
    """The per-device batch; a clear error naming the fix when it does not divide."""
    n = num_devices(mesh)
    if global_batch % n:
        suggestion = max(n, round(global_batch / n) * n)
        divisor = max(d for d in range(1, n + 1) if global_batch % d == 0 and n % d == 0)
        raise ValueError(
            BATCH_NOT_DIVISIBLE.format(
                batch=global_batch, n=n, suggestion=suggestion, divisor=divisor
            )
        )
    return global_batch // n


# ---------------------------------------------------------------------------- state rules


def replicated(mesh: Mesh, shape: tuple, dtype: Any) -> P:
    """Data parallelism: every device holds the whole leaf."""
    return P()


def fsdp(*, min_bytes: int = 2**14) -> Rule:
    """Fully sharded data parallelism: a leaf of at least `min_bytes` is split over the data
    axis along its largest dimension that the device count divides; smaller leaves (biases,
    scalars, keys) and leaves with no such dimension are replicated.

    The numbers are those of `replicated` up to reduction order: XLA gathers the
    parameters where the step needs them whole and reduce-scatters the gradients.
    """

    def rule(mesh: Mesh, shape: tuple, dtype: Any) -> P:
        n = mesh.shape[DATA]
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if n == 1 or nbytes < min_bytes:
            return P()
        dims = [d for d in np.argsort(shape, kind="stable")[::-1] if shape[d] % n == 0]
        if not dims:
            return P()
        spec: list = [None] * len(shape)
        spec[int(dims[0])] = DATA
        return P(*spec)

    rule.__name__ = f"fsdp(min_bytes={min_bytes})"
    return rule


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def state_shardings(tree: Any, mesh: Mesh, rule: Rule = replicated) -> Any:
    """A `NamedSharding` per leaf of `tree` (arrays or ShapeDtypeStructs) by `rule`."""

    def one(x):
        if _is_key(x):
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, rule(mesh, tuple(np.shape(x)), x.dtype))

    return jax.tree.map(one, tree)


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, axis: int = 0) -> NamedSharding:
    """Examples split over the data axis along `axis` (1 for `[steps, batch, ...]` chunks)."""
    return NamedSharding(mesh, P(*([None] * axis), DATA))


# ---------------------------------------------------------------------------- placement


def _host_value(x: Any) -> np.ndarray:
    """A numpy value of `x`; a global array not fully addressable is read from its shards
    only when they hold the whole value (replicated)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


def place(tree: Any, shardings: Any) -> Any:
    """Puts a tree of host values (every process holds the whole value) onto `shardings`
    as global arrays; typed PRNG keys travel as their key data. Always a copy: what is
    placed may be donated to a step without deleting the caller's arrays."""

    def put(x, sharding):
        if _is_key(x):
            impl = jax.random.key_impl(x)
            return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding), impl=impl)
        if isinstance(x, jax.Array) and x.is_fully_addressable and jax.process_count() == 1:
            return jax.device_put(x.copy(), sharding)  # the copy: never alias the caller's
        host = _host_value(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])

    return jax.tree.map(put, tree, shardings)


def place_columns(mesh: Mesh, local_columns: Any) -> Any:
    """`[steps, batch, ...]` arrays split over devices along axis 1, from this process's
    columns (`process_columns`; with one process, the whole global batch)."""
    sharding = batch_sharding(mesh, axis=1)
    n_local = len(local_devices(mesh))

    def put(x):
        x = np.asarray(x)
        if x.shape[1] % n_local:
            raise ValueError(
                BATCH_NOT_DIVISIBLE.format(
                    batch=x.shape[1], n=n_local, suggestion=n_local, divisor=1
                )
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, local_columns)


def process_columns(mesh: Mesh, global_columns: np.ndarray) -> np.ndarray:
    """This process's block of columns of a global `[steps, global_batch]` array."""
    per_device = check_batch(mesh, global_columns.shape[1])
    devices = list(mesh.devices.flat)
    first = devices.index(local_devices(mesh)[0])
    lo = first * per_device
    return global_columns[:, lo : lo + len(local_devices(mesh)) * per_device]


def to_host(tree: Any) -> Any:
    """Numpy values of a tree of global arrays (gathered across processes when sharded)."""
    from jax.experimental import multihost_utils

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.sharding.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(get, tree)


def per_device_bytes(tree: Any) -> int:
    """The most bytes any one device holds of `tree`'s arrays (their shards' sizes)."""
    totals: dict = {}
    for x in jax.tree.leaves(tree):
        if _is_key(x):
            x = jax.random.key_data(x)
        for shard in x.addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return max(totals.values()) if totals else 0


# ---------------------------------------------------------------------------- processes


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_collectives: str | None = None,
) -> None:
    """Starts multi-host JAX (`jax.distributed.initialize`) once, before any computation.

    With no arguments on Cloud TPU, Slurm or Kubernetes JAX finds the cluster itself.
    Elsewhere give the coordinator ("host:port"), the process count and this process's id,
    as arguments or through JAX_COORDINATOR_ADDRESS / JAXNETS_NUM_PROCESSES /
    JAXNETS_PROCESS_ID. On CPU, several processes need `cpu_collectives="gloo"`.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "JAXNETS_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAXNETS_NUM_PROCESSES"])
    if process_id is None and "JAXNETS_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAXNETS_PROCESS_ID"])
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def is_main_process() -> bool:
    """Only process 0 writes logs, plots, summaries."""
    return jax.process_index() == 0
