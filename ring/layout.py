"""Sequence layouts: which original positions live on which shard of the `seq` axis.

Dimension letters: B batch, T timesteps (tokens), n devices on the ring, Tl = T / n.

- "contiguous": device d holds positions d*Tl .. (d+1)*Tl - 1. Causal work is unbalanced (the last
  device attends to everything, the first only to itself).
- "striped": token i lives on device (i // stripe) % n (Striped Attention, Brandon et al. 2023 for
  stripe=1). With stripe=s whole groups of s consecutive tokens (one agent timestep) stay together.
  Balanced, but every hop has masked diagonal chunks: more total work than contiguous.
- "zigzag": the sequence is cut into 2n chunks of Tl/2 and device d holds chunks d and 2n-1-d (as
  in Llama 3 context parallelism and zigzag ring attention). Only the first hop is masked; every
  later hop is exactly half a block of unmasked pairs on every device: contiguous's total work with
  almost ideal balance.

`to_layout` / `from_layout` permute a global array once at the model boundary so that plain
contiguous sharding over `seq` gives the layout; masks are always computed from original positions
(`local_positions`). `check_layout` is the one place that validates a layout, its stripe and a
length; `num_hops` is the ring geometry a sliding window allows.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

LAYOUTS = ("contiguous", "striped", "zigzag")


def layout_unit(n: int, layout: str, stripe: int = 1) -> int:
    """Granularity of a global length in `layout` on n devices: T must be a multiple of it.

    On one device every layout is the identity (nothing to balance), so any length fits.
    """
    if n == 1:
        return 1
    if layout == "striped":
        return n * stripe
    if layout == "zigzag":
        return 2 * n
    return n


def check_layout(
    layout: str, stripe: int = 1, *, length: int | None = None, n: int = 1, what: str = "sequence"
) -> None:
    """Validates a layout, its stripe and (optionally) a global length on n devices.

    Args:
      layout: one of LAYOUTS.
      stripe: tokens kept together per device (striped); must be a positive int for any layout
        (it is ignored by the other layouts).
      length: global length T to check, or None.
      n: ring size the length is split over.
      what: the name of the length in the message ("sequence", "cache", ...).

    Raises:
      ValueError: one line naming the problem and the fix.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; use one of {LAYOUTS}")
    if not isinstance(stripe, (int, np.integer)) or stripe < 1:
        raise ValueError(f"stripe must be a positive int, got {stripe!r}")
    if length is None:
        return
    unit = layout_unit(n, layout, stripe)
    if length < 1 or length % unit:
        how = {"striped": f"n devices {n} x stripe {stripe}", "zigzag": f"2 x n devices {n}"}
        raise ValueError(
            f"{what} length {length} is not a positive multiple of {unit} (= "
            f"{how.get(layout, f'n devices {n}')}) for layout {layout!r}; pad it to "
            f"{max(unit, -(-length // unit) * unit)}"
        )


def _chunk_order(n: int) -> np.ndarray:
    """Zigzag: original chunk index (of 2n) at each layout slot: 0, 2n-1, 1, 2n-2, ..."""
    return np.stack([np.arange(n), 2 * n - 1 - np.arange(n)], 1).reshape(-1)


def to_layout(x: jax.Array, n: int, layout: str, stripe: int = 1, axis: int = 1) -> jax.Array:
    """Permutes a global array (original token order) into `layout` order along `axis`.

    After this, sharding `axis` contiguously over `n` devices puts each token on the device that
    `local_positions` says holds it (identity for "contiguous").

    Args:
      x: global array, e.g. [B, T, ...] with T on `axis`.
      n: number of devices on the ring (size of the `seq` mesh axis).
      layout: one of LAYOUTS.
      stripe: tokens kept together per device turn (striped only).
      axis: the sequence axis.

    Returns:
      The permuted array, same shape as `x`.
    """
    return _permute(x, n, layout, stripe, axis, inverse=False)


def from_layout(x: jax.Array, n: int, layout: str, stripe: int = 1, axis: int = 1) -> jax.Array:
    """Inverse of `to_layout`: brings a `layout`-ordered global array back to original order."""
    return _permute(x, n, layout, stripe, axis, inverse=True)


def _permute(x, n, layout, stripe, axis, inverse):
    t = x.shape[axis]
    check_layout(layout, stripe, length=t, n=n)
    if layout == "contiguous" or n == 1:
        return x
    axis = axis % x.ndim
    if layout == "zigzag":
        order = _chunk_order(n)
        if inverse:
            order = np.argsort(order)
        y = x.reshape(x.shape[:axis] + (2 * n, t // (2 * n)) + x.shape[axis + 1 :])
        return jnp.take(y, jnp.asarray(order), axis=axis).reshape(x.shape)
    groups = t // (n * stripe)
    # original position (g * n + d) * stripe + r goes to index d * groups * stripe + g * stripe + r
    split = (n, groups) if inverse else (groups, n)
    y = x.reshape(x.shape[:axis] + split + (stripe,) + x.shape[axis + 1 :])
    return jnp.swapaxes(y, axis, axis + 1).reshape(x.shape)


def local_positions(
    device: jax.Array | int, n: int, t_local: int, layout: str, stripe: int = 1, xp=jnp
) -> jax.Array:
    """Original positions [T_local] of the tokens held by `device` (increasing in local index).

    Args:
      device: index on the ring (traced `lax.axis_index` or a Python int).
      n: ring size.
      t_local: tokens per device.
      layout: one of LAYOUTS.
      stripe: stripe width (striped only).
      xp: array module (`jnp` inside traced code, `np` for static planning).

    Returns:
      int32 positions in the original sequence.
    """
    j = xp.arange(t_local, dtype=xp.int32)
    if layout == "contiguous" or n == 1:
        return device * t_local + j
    if layout == "zigzag":
        half = t_local // 2
        chunk = xp.where(j < half, device, 2 * n - 1 - device)
        return chunk * half + j % half
    return ((j // stripe) * n + device) * stripe + j % stripe


def position_owner(
    pos: jax.Array, t_local: int, n: int, layout: str = "contiguous", stripe: int = 1
) -> tuple[jax.Array, jax.Array]:
    """(device, local slot) owning original position `pos` (any int array shape).

    The inverse of `local_positions`: `local_positions(device, n, t_local, layout,
    stripe)[slot] == pos`.
    """
    if layout == "contiguous" or n == 1:
        return pos // t_local, pos % t_local
    if layout == "zigzag":
        half = t_local // 2
        chunk = pos // half
        first = chunk < n
        return (
            jnp.where(first, chunk, 2 * n - 1 - chunk),
            jnp.where(first, 0, half) + pos % half,
        )
    block = pos // stripe
    return block % n, (block // n) * stripe + pos % stripe


@functools.lru_cache(maxsize=256)
def num_hops(layout: str, stripe: int, window: int | None, t_local: int, n: int) -> int:
    """Number of ring hops (blocks visited, own block included) any device needs.

    Hop h brings device i the block of device (i - h) mod n. Without a window every hop is needed
    (some device sees every block). With window w a hop is needed only if some query at position p
    on some device has a key p-w+1 .. p on the block h hops back. For the contiguous layout and
    w <= T_local that is 2 hops.
    """
    if window is None or n == 1:
        return n
    if layout == "contiguous":
        # keys of block i-h reach up to (i-h+1)*T_local - 1; the earliest query on i is i*T_local,
        # which sees keys >= i*T_local - w + 1. Needed iff (1-h)*T_local - 1 >= 1 - w.
        # Hops with i - h < 0 wrap round to future blocks and are never needed.
        need = [h for h in range(n) if (1 - h) * t_local - 1 >= 1 - window]
        return max(need) + 1
    last = 0
    for h in range(1, n):
        for i in range(n):
            qp = local_positions(i, n, t_local, layout, stripe, xp=np)
            kp = local_positions((i - h) % n, n, t_local, layout, stripe, xp=np)
            # nearest key at or before each query (kp sorted)
            j = np.searchsorted(kp, qp, side="right") - 1
            ok = j >= 0
            if np.any(qp[ok] - kp[j[ok]] < window):
                last = h
                break
    return last + 1
