"""Data parallelism over every local device and host: one per-device function, two backends.

The per-device function is written in the pmap programming model: it sees its own shard of
the batch and averages gradients and metrics with `lax.pmean` / `lax.psum` over a named
axis. `DataParallel.map` runs it either with `jax.pmap` (what most TPU tutorials and Colab
code use) or with `jax.shard_map` inside `jax.jit` on a 1-D mesh; both take the same global
arrays laid out the same way and give the same numbers.

Conventions (both backends):
- replicated values (train state, the data set) go through `dp.replicate` once;
- per-step batch indices are `[steps, global_batch]`, split over devices along axis 1
  (`dp.shard_columns`): device d of process p gets a contiguous block of columns.

Example:
    >>> import jax, jax.numpy as jnp
    >>> dp = make_data_parallel(backend="shard_map")
    >>> total = dp.map(lambda x: jax.lax.psum(x.sum(), dp.axis_name),
    ...                in_specs=(COLUMNS,), out_specs=REPLICATED)
    >>> float(dp.unreplicate(total(dp.shard_columns(jnp.ones((1, 8 * dp.num_devices))))))
    64.0
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxnets.platform import check_backend

BACKENDS = ("pmap", "shard_map")

# in_specs/out_specs vocabulary shared by both backends.
REPLICATED = "replicated"  # the same value on every device
COLUMNS = "columns"  # split along axis 1: [steps, global_batch] -> [steps, local_batch]
ROWS = "rows"  # split along axis 0: [models, ...] -> [models / devices, ...]

BATCH_NOT_DIVISIBLE = (
    "global batch {batch} is not divisible by {n} devices; use batch_size={suggestion} "
    "(a multiple of {n}) or devices={divisor}"
)


class DataParallel(NamedTuple):
    """How a per-device function is spread over devices.

    Attributes:
      backend: "pmap" or "shard_map".
      axis_name: the name collectives use (`lax.pmean(x, axis_name)`).
      devices: the global devices taking part, in mesh order.
      mesh: a 1-D mesh over `devices` with axis `axis_name`.
    """

    backend: str
    axis_name: str
    devices: tuple
    mesh: Mesh

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def local_devices(self) -> tuple:
        return tuple(d for d in self.devices if d.process_index == jax.process_index())

    @property
    def num_local_devices(self) -> int:
        return len(self.local_devices)

    def check_batch(self, global_batch: int) -> int:
        """Returns the per-device batch; raises a clear error when it does not divide."""
        n = self.num_devices
        if global_batch % n:
            suggestion = max(n, round(global_batch / n) * n)
            divisor = max(d for d in range(1, n + 1) if global_batch % d == 0 and n % d == 0)
            raise ValueError(
                BATCH_NOT_DIVISIBLE.format(
                    batch=global_batch, n=n, suggestion=suggestion, divisor=divisor
                )
            )
        return global_batch // n

    def replicate(self, tree: Any) -> Any:
        """Puts the same value on every device (pmap: stacked along a new leading axis)."""
        if self.backend == "pmap":
            sharding = NamedSharding(self.mesh, P(self.axis_name))

            def put(x):
                x = _host_value(x)
                stacked = np.broadcast_to(x, (self.num_local_devices, *np.shape(x)))
                return jax.make_array_from_process_local_data(
                    sharding, stacked, (self.num_devices, *np.shape(x))
                )

            return jax.tree.map(_keys_as_data(put), tree)
        sharding = NamedSharding(self.mesh, P())
        put = lambda x: _put_global(_host_value(x), sharding)
        return jax.tree.map(_keys_as_data(put), tree)

    def to_checkpoint(self, tree: Any) -> Any:
        """A replicated tree as a checkpoint should hold it, whatever the device count.

        One process: device 0's copy. Several processes: a global array replicated over every
        device (each process holds the same value; Orbax's primary process writes it).
        """
        local = self.unreplicate(tree)
        if jax.process_count() == 1:
            return local
        sharding = NamedSharding(self.mesh, P())
        return jax.tree.map(lambda x: _put_global(np.asarray(x), sharding), local)

    def checkpoint_target(self, host_tree: Any) -> Any:
        """The restore layout matching `to_checkpoint`, for a freshly initialised host tree."""
        if jax.process_count() == 1:
            return host_tree
        sharding = NamedSharding(self.mesh, P())
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), host_tree
        )

    def unreplicate(self, tree: Any) -> Any:
        """The value of a replicated tree, as host-local arrays of device 0's copy.

        Runs no device computation (nothing to compile): pmap's stacked copy is read
        through the host and put back on its device.
        """
        if self.backend == "pmap":

            def first(x):
                shard = x.addressable_shards[0].data  # [1, ...]
                return jax.device_put(np.asarray(shard)[0], shard.device)

            return jax.tree.map(_keys_as_data(first), tree)
        return jax.tree.map(lambda x: x.addressable_shards[0].data, tree)

    def shard_columns(self, local_columns: Any) -> Any:
        """Splits `[steps, batch]` arrays over devices along axis 1.

        Args:
          local_columns: this process's columns, `[steps, local_devices * per_device]`
            (with one process: the whole global batch).
        """
        sharding = NamedSharding(self.mesh, P(None, self.axis_name))
        n_local = self.num_local_devices

        def put(x):
            x = np.asarray(x)
            if x.shape[1] % n_local:
                raise ValueError(
                    BATCH_NOT_DIVISIBLE.format(
                        batch=x.shape[1], n=n_local, suggestion=n_local, divisor=1
                    )
                )
            if self.backend == "pmap":  # pmap maps a device axis: [steps, devices, per_device]
                x = x.reshape(x.shape[0], n_local, x.shape[1] // n_local, *x.shape[2:])
            return jax.make_array_from_process_local_data(sharding, x)

        return jax.tree.map(put, local_columns)

    def shard_rows(self, tree: Any) -> Any:
        """Splits arrays over devices along axis 0 (e.g. many independent models).

        One process only; the leading size must divide by the device count.
        """
        sharding = NamedSharding(self.mesh, P(self.axis_name))
        n = self.num_devices

        def put(x):
            x = np.asarray(x)
            self.check_batch(x.shape[0])
            if self.backend == "pmap":
                x = x.reshape(n, x.shape[0] // n, *x.shape[1:])
            return jax.device_put(x, sharding)

        return jax.tree.map(put, tree)

    def gather_rows(self, tree: Any) -> Any:
        """The host value of a ROWS-sharded output, leading axis restored."""
        if self.backend == "pmap":
            return jax.tree.map(lambda x: np.asarray(x).reshape(-1, *x.shape[2:]), tree)
        return jax.tree.map(np.asarray, tree)

    def process_columns(self, global_columns: np.ndarray) -> np.ndarray:
        """This process's block of columns of a global `[steps, global_batch]` array."""
        per_device = self.check_batch(global_columns.shape[1])
        first = self.devices.index(self.local_devices[0])
        lo = first * per_device
        return global_columns[:, lo : lo + self.num_local_devices * per_device]

    def map(
        self,
        fn: Callable,
        *,
        in_specs: Sequence[str],
        out_specs: Any,
        donate_argnums: int | Sequence[int] = (),
    ) -> Callable:
        """Wraps a per-device `fn` so that it runs on every device.

        Args:
          fn: the per-device function; collectives over `self.axis_name` inside.
          in_specs: one of REPLICATED / COLUMNS / ROWS per positional argument.
          out_specs: a pytree prefix of REPLICATED / COLUMNS / ROWS for the outputs.
          donate_argnums: arguments whose buffers may be reused (the train state).
        """
        for spec in list(in_specs) + jax.tree.leaves(out_specs):
            if spec not in (REPLICATED, COLUMNS, ROWS):
                raise ValueError(f"unknown spec {spec!r}: use REPLICATED, COLUMNS or ROWS")
        if self.backend == "pmap":
            axes = {REPLICATED: 0, COLUMNS: 1, ROWS: 0}
            return jax.pmap(
                fn,
                axis_name=self.axis_name,
                in_axes=tuple(axes[s] for s in in_specs),
                out_axes=jax.tree.map(lambda s: axes[s], out_specs),
                devices=self.devices,
                donate_argnums=donate_argnums,
            )
        specs = {REPLICATED: P(), COLUMNS: P(None, self.axis_name), ROWS: P(self.axis_name)}
        mapped = jax.shard_map(
            fn,
            mesh=self.mesh,
            in_specs=tuple(specs[s] for s in in_specs),
            out_specs=jax.tree.map(lambda s: specs[s], out_specs),
            check_vma=False,
        )
        return jax.jit(mapped, donate_argnums=donate_argnums)


def _keys_as_data(put: Callable[[Any], jax.Array]) -> Callable[[Any], jax.Array]:
    """`put` for typed PRNG keys too (an NNX module's rng streams): moved as their data."""

    def put_fn(x):
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            impl = jax.random.key_impl(x)
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=impl)
        return put(x)

    return put_fn


def _host_value(x: Any) -> np.ndarray:
    """A numpy value of `x`; a replicated global array is read from a local copy."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


def _put_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    return jax.make_array_from_process_local_data(sharding, x, x.shape)


def make_data_parallel(
    *,
    backend: str = "shard_map",
    devices: Sequence[Any] | int | None = None,
    axis_name: str = "batch",
) -> DataParallel:
    """Builds the data-parallel plan over `devices`.

    Args:
      backend: "pmap" (jax.pmap) or "shard_map" (jax.shard_map under jit).
      devices: the devices to use; an int takes the first n of `jax.devices()`; None: all
        (over every process when `jax.distributed` is initialised).
      axis_name: the collective axis name.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown parallel backend {backend!r}; choose one of {BACKENDS}")
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
    mesh = Mesh(np.array(chosen), (axis_name,))
    return DataParallel(backend, axis_name, tuple(chosen), mesh)


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
