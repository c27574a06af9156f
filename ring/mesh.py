"""Mesh axis names and mesh construction.

The names are defined here once; every other module imports them and never writes the literals.
Axes are ordered (DATA, SEQ) so that the ring runs over the fastest links.
"""

from collections.abc import Sequence

import jax
import numpy as np

DATA = "data"  # batch axis
SEQ = "seq"  # the axis the ring runs over (trajectory / time)


def make_mesh(
    axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
    """Builds a mesh from `[(name, size), ...]`; one size may be -1 (all remaining devices).

    Args:
      axes: axis names and sizes in order, e.g. `[("data", -1), ("seq", 4)]`.
      devices: devices to use; defaults to `jax.devices()`.

    Returns:
      A `jax.sharding.Mesh` over the first prod(sizes) devices, arranged by `jax.make_mesh`
      (physical topology: neighbours on the ring share the fastest links).

    Raises:
      ValueError: the sizes don't divide the device count, or there are too few devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    names = [str(name) for name, _ in axes]
    sizes = [int(size) for _, size in axes]
    if len(set(names)) != len(names):
        raise ValueError(f"mesh axis names repeat: {names}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(names, sizes))}")
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if fixed < 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive or -1, got {dict(zip(names, sizes))}")
    if -1 in sizes:
        if len(devices) % fixed:
            raise ValueError(
                f"mesh {dict(zip(names, sizes))} needs a multiple of {fixed} devices, have "
                f"{len(devices)}; change the sizes in config.mesh"
            )
        sizes[sizes.index(-1)] = len(devices) // fixed
    total = int(np.prod(sizes))
    if total > len(devices):
        raise ValueError(
            f"mesh {dict(zip(names, sizes))} needs {total} devices but only {len(devices)} are "
            f"available; shrink config.mesh or, on CPU, set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={total}"
        )
    # jax.make_mesh orders devices by physical topology (ring neighbours on the fastest links on
    # GPU/TPU); Auto axis types keep shard_map / jit sharding semantics as with a plain Mesh.
    auto = (jax.sharding.AxisType.Auto,) * len(names)
    return jax.make_mesh(sizes, tuple(names), axis_types=auto, devices=devices[:total])
