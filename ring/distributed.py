"""Multi-process (multi-host) start-up through JAX's own runtime, `jax.distributed`.

`experiments/launch.py` starts P local processes and tells each where the coordinator is through
environment variables; on a cluster the variables are absent and `jax.distributed.initialize()` is
called with no arguments so JAX detects SLURM / cloud TPU / MPI settings itself.
"""

import os

import jax

COORDINATOR_ENV = "RINGRL_COORDINATOR"  # "127.0.0.1:PORT"
NUM_PROCESSES_ENV = "RINGRL_NUM_PROCESSES"
PROCESS_ID_ENV = "RINGRL_PROCESS_ID"
CLUSTER_ENV = "RINGRL_DISTRIBUTED"  # "auto": call jax.distributed.initialize() with no arguments

# A dead peer is noticed by the coordination service's heartbeat; the default (100 s) is too long
# for "exit within a bounded time".
HEARTBEAT_TIMEOUT_S = 15
INIT_TIMEOUT_S = 120
SHUTDOWN_TIMEOUT_S = 30


def maybe_initialize() -> bool:
    """Initialises `jax.distributed` when launched as one of several processes.

    Returns:
      True if this process is part of a multi-process run.
    """
    if os.environ.get(COORDINATOR_ENV):
        # CPU collectives across processes go through Gloo (FACTS.md: works on loopback); the
        # setting only concerns the CPU backend. Don't touch jax.devices() before initialize().
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=os.environ[COORDINATOR_ENV],
            num_processes=int(os.environ[NUM_PROCESSES_ENV]),
            process_id=int(os.environ[PROCESS_ID_ENV]),
            initialization_timeout=INIT_TIMEOUT_S,
            heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
            shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S,
        )
        return True
    if os.environ.get(CLUSTER_ENV) == "auto":
        jax.distributed.initialize(heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
        return True
    return False
