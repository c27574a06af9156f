"""Sequence layouts: which original positions live on which shard of the `seq` axis.

Dimension letters: B batch, T timesteps (tokens), n devices on the ring.

- "contiguous": device d holds positions d*T_local .. (d+1)*T_local - 1. Causal work is unbalanced
  (the last device attends to everything, the first only to itself).
- "striped": token i lives on device (i // stripe) % n (Striped Attention, Brandon et al. 2023 for
  stripe=1). With stripe=s whole groups of s consecutive tokens (one agent timestep) stay together.
  Every device then does almost the same causal work.

`to_layout` / `from_layout` permute a global array once at the model boundary so that plain
contiguous sharding over `seq` gives the layout; masks are always computed from original positions
(`local_positions`).
"""

import jax
import jax.numpy as jnp
import numpy as np

LAYOUTS = ("contiguous", "striped")


def check_layout(layout: str, stripe: int) -> None:
    """Raises ValueError for an unknown layout or a bad stripe."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; use one of {LAYOUTS}")
    if not isinstance(stripe, (int, np.integer)) or stripe < 1:
        raise ValueError(f"stripe must be a positive int, got {stripe!r}")


def _check_length(t: int, n: int, layout: str, stripe: int) -> None:
    check_layout(layout, stripe)
    unit = n * stripe if layout == "striped" else n
    if t % unit:
        raise ValueError(
            f"sequence length {t} is not divisible by {unit} (= n devices {n}"
            + (f" x stripe {stripe}" if layout == "striped" else "")
            + f") for layout {layout!r}; pad the sequence to a multiple of {unit}"
        )


def to_layout(x: jax.Array, n: int, layout: str, stripe: int = 1, axis: int = 1) -> jax.Array:
    """Permutes a global array (original token order) into `layout` order along `axis`.

    After this, sharding `axis` contiguously over `n` devices puts token i on device
    (i // stripe) % n for "striped" (identity for "contiguous").

    Args:
      x: global array, e.g. [B, T, ...] with T on `axis`.
      n: number of devices on the ring (size of the `seq` mesh axis).
      layout: "contiguous" or "striped".
      stripe: tokens kept together per device turn (striped only).
      axis: the sequence axis.

    Returns:
      The permuted array, same shape as `x`.
    """
    t = x.shape[axis]
    _check_length(t, n, layout, stripe)
    if layout == "contiguous" or n == 1:
        return x
    axis = axis % x.ndim
    groups = t // (n * stripe)
    # original position (g * n + d) * stripe + r goes to index d * groups * stripe + g * stripe + r
    y = x.reshape(x.shape[:axis] + (groups, n, stripe) + x.shape[axis + 1 :])
    y = jnp.swapaxes(y, axis, axis + 1)
    return y.reshape(x.shape)


def from_layout(x: jax.Array, n: int, layout: str, stripe: int = 1, axis: int = 1) -> jax.Array:
    """Inverse of `to_layout`: brings a `layout`-ordered global array back to original order."""
    t = x.shape[axis]
    _check_length(t, n, layout, stripe)
    if layout == "contiguous" or n == 1:
        return x
    axis = axis % x.ndim
    groups = t // (n * stripe)
    y = x.reshape(x.shape[:axis] + (n, groups, stripe) + x.shape[axis + 1 :])
    y = jnp.swapaxes(y, axis, axis + 1)
    return y.reshape(x.shape)


def local_positions(
    device: jax.Array | int, n: int, t_local: int, layout: str, stripe: int = 1, xp=jnp
) -> jax.Array:
    """Original positions [T_local] of the tokens held by `device` (increasing in local index).

    Args:
      device: index on the ring (traced `lax.axis_index` or a Python int).
      n: ring size.
      t_local: tokens per device.
      layout: "contiguous" or "striped".
      stripe: stripe width (striped only).
      xp: array module (`jnp` inside traced code, `np` for static planning).

    Returns:
      int32 positions in the original sequence.
    """
    j = xp.arange(t_local, dtype=xp.int32)
    if layout == "contiguous" or n == 1:
        return device * t_local + j
    return ((j // stripe) * n + device) * stripe + j % stripe
