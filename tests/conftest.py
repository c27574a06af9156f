"""Test setup: 8 virtual CPU devices (generous collective timeouts), set before jax starts."""

import os

from ringrl.experiments import xla_flags  # standard library only: jax starts after this

# 8 virtual devices, and collectives that tolerate a busy machine (see experiments/xla_flags.py).
xla_flags.force_host_devices(8)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
