"""XLA_FLAGS for virtual CPU devices that share a few busy cores.

`--xla_force_host_platform_device_count=N` makes N CPU devices in one process. Their collectives
(all-reduce, ppermute) wait for all N participants, and XLA aborts the whole process when one
arrives more than 40 s late ("Termination timeout for `all reduce` ... only 4 of them arrived"),
which happens on a loaded machine. Wherever the project forces host devices (tests/conftest.py,
the benchmarks, ringrl-launch's workers, ringrl-train/-eval/-ablate when XLA_FLAGS asks for host
devices) these timeouts are raised. Both flags exist in jaxlib 0.10.2; an unknown XLA flag aborts
the process at backend start, so tests/test_robust.py starts jax with them.

Only the standard library is imported here: callers use it before jax starts its backend.
"""

from __future__ import annotations

import os

FORCE_DEVICES = "--xla_force_host_platform_device_count"
# Seconds before a stuck in-process collective aborts the process (XLA default 40) and before it
# warns (default 20): long enough for a compile or a neighbour's job to hog the cores.
COLLECTIVE_TIMEOUTS = {
    "--xla_cpu_collective_call_terminate_timeout_seconds": 1800,
    "--xla_cpu_collective_call_warn_stuck_timeout_seconds": 300,
}


def with_collective_timeouts(xla_flags: str) -> str:
    """`xla_flags` plus the generous collective timeouts, unless it already sets them."""
    flags = xla_flags.split()
    for name, seconds in COLLECTIVE_TIMEOUTS.items():
        if not any(f.split("=")[0] == name for f in flags):
            flags.append(f"{name}={seconds}")
    return " ".join(flags)


def host_devices(xla_flags: str, num_devices: int) -> str:
    """`xla_flags` with exactly `num_devices` virtual CPU devices and the collective timeouts."""
    flags = [f for f in xla_flags.split() if f.split("=")[0] != FORCE_DEVICES]
    return with_collective_timeouts(" ".join([*flags, f"{FORCE_DEVICES}={num_devices}"]))


def force_host_devices(num_devices: int) -> None:
    """Sets XLA_FLAGS for `num_devices` CPU devices (call before jax starts its backend)."""
    os.environ["XLA_FLAGS"] = host_devices(os.environ.get("XLA_FLAGS", ""), num_devices)


def guard_host_devices() -> None:
    """Adds the collective timeouts to XLA_FLAGS if it forces host devices (entry points)."""
    xla_flags = os.environ.get("XLA_FLAGS", "")
    if FORCE_DEVICES in xla_flags:
        os.environ["XLA_FLAGS"] = with_collective_timeouts(xla_flags)
