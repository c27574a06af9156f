"""Test setup: 8 virtual CPU devices (generous collective timeouts), set before jax starts.

XLA's persistent compilation cache, in a directory of this session only, lets tests that build
equal programs (smoke runs of configs with the same shapes, a run and its resumption) compile
them once; the library holds no caches of its own for that.
"""

import atexit
import os
import shutil
import tempfile

from ringrl.experiments import xla_flags  # standard library only: jax starts after this

# 8 virtual devices, and collectives that tolerate a busy machine (see experiments/xla_flags.py).
xla_flags.force_host_devices(8)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
_CACHE = tempfile.mkdtemp(prefix="ringrl-test-xla-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
