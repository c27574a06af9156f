"""Blockwise feed-forward (Blockwise Parallel Transformer, Liu & Abbeel 2023).

Dimension letters: B batch, T tokens, E model width, F hidden width.

The MLP is applied chunk by chunk over the sequence with each chunk rematerialised
(`jax.checkpoint`), so the [B, T, F] hidden activations never exist for the whole shard at once,
neither in the forward pass nor in the backward pass. A shard of one chunk is applied directly:
its activations are one chunk's, and recomputing them would only cost time.
"""

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

_KEYS = ("w1", "b1", "w2", "b2")


def mlp(x: jax.Array, params: Mapping[str, jax.Array]) -> jax.Array:
    """gelu MLP: gelu(x @ w1 + b1) @ w2 + b2, with w1 [E, F], b1 [F], w2 [F, E'], b2 [E']."""
    h = jax.nn.gelu(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def blockwise_ffn(
    x: jax.Array,
    params_or_fn: Mapping[str, jax.Array] | Callable[[jax.Array], jax.Array],
    chunk: int,
) -> jax.Array:
    """Applies a position-wise feed-forward over sequence chunks of x, rematerialising each chunk.

    Args:
      x: [B, T, E].
      params_or_fn: a callable x_chunk [B, chunk, E] -> [B, chunk, E'] (position-wise), or a dict
        {w1, b1, w2, b2} for the gelu MLP `mlp`.
      chunk: tokens per chunk; must divide T.

    Returns:
      [B, T, E'] (E' = E for the usual MLP).
    """
    if getattr(x, "ndim", None) != 3:
        raise ValueError(f"x must be [B, T, E], got shape {jnp.shape(x)}")
    b, t, _ = x.shape
    if not isinstance(chunk, int) or chunk < 1 or t % chunk:
        raise ValueError(f"T={t} is not divisible by chunk={chunk!r}; pick a divisor of {t}")
    if callable(params_or_fn):
        fn = params_or_fn
    else:
        missing = [key for key in _KEYS if key not in params_or_fn]
        if missing:
            raise ValueError(f"FFN params need keys {_KEYS}, missing {missing}")
        params = params_or_fn

        def fn(xc):
            return mlp(xc, params)

    n = t // chunk
    if n == 1:  # one chunk: its hidden activations are the chunk's anyway, so keep them
        return fn(x)  # (rematerialising would only add a third FFN pass to the backward)
    xs = jnp.moveaxis(x.reshape(b, n, chunk, x.shape[-1]), 1, 0)  # [n, B, chunk, E]
    ys = jax.lax.map(jax.checkpoint(fn), xs)
    return jnp.moveaxis(ys, 0, 1).reshape(b, t, ys.shape[-1])
