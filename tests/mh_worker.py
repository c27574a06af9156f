"""A worker script for tests/test_multihost.py, run by experiments/launch.py in each process.

worker.py ring   : a ppermute ring over a (data, seq) mesh spanning every process; prints result
worker.py die    : as `ring`, then rank 1 kills itself with SIGKILL while rank 0 waits in a barrier
"""

import os
import signal
import sys

from ringrl.ring import distributed

distributed.maybe_initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from ringrl.ring import DATA, SEQ, make_mesh  # noqa: E402

mesh = make_mesh([(DATA, 1), (SEQ, -1)])
n = jax.device_count()
ring = jax.jit(
    jax.shard_map(
        lambda x: jax.lax.ppermute(x, SEQ, [(i, (i + 1) % n) for i in range(n)]),
        mesh=mesh,
        in_specs=P(DATA, SEQ),
        out_specs=P(DATA, SEQ),
    )
)
per = jax.local_device_count()
local = np.arange(n, dtype=np.float32)[
    None, jax.process_index() * per : (jax.process_index() + 1) * per
]
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P(DATA, SEQ)), local, (1, n))
out = multihost_utils.process_allgather(ring(x), tiled=True)
print(f"RESULT {jax.process_index()} {jax.process_count()} {out.ravel().tolist()}", flush=True)
if sys.argv[1:] == ["die"] and jax.process_index() == 1:
    os.kill(os.getpid(), signal.SIGKILL)
multihost_utils.sync_global_devices("end")
print("DONE", flush=True)
