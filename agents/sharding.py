"""Host <-> device placement on the (DATA, SEQ) mesh, in one process or several.

Dimension letters: B batch, T steps.

Parameters and optimizer state are replicated (`P()`); every [B, T, ...] batch array is split
`P(DATA, SEQ)`. Every process passes the same GLOBAL host arrays and transfers only the shards its
own devices hold, so the same code runs unchanged under `jax.distributed`.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ringrl.ring.mesh import DATA, SEQ


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Sharding of a value every device holds whole: P()."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Sharding of every [B, T, ...] batch array: P(DATA, SEQ)."""
    return NamedSharding(mesh, P(DATA, SEQ))


def put_global(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array of the GLOBAL shape placed with `sharding`.

    Every process passes the same array and transfers only the shards its own devices hold, so
    this works unchanged in one process and across several (`jax.distributed`), where
    `jax.device_put` refuses shardings with devices of other processes.
    """
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-process) array as numpy, on every process."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def put_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Places a host batch of the GLOBAL shape on the mesh with P(DATA, SEQ).

    Every process passes the same global batch (the samplers are seeded identically and cheap to
    run); each process transfers only the shards its own devices hold, so with the sequence split
    over processes a process never copies the other processes' tokens to a device.
    """
    sharding = batch_sharding(mesh)
    return {k: put_global(v, sharding) for k, v in batch.items()}
