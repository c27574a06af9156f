"""Dense attention: the test oracle (plain softmax over a materialised [T, T] mask).

Dimension letters: B batch, T tokens, H heads, D head dim.
"""

import jax
import jax.numpy as jnp


def attention_mask(
    t: int,
    *,
    causal: bool = True,
    window: int | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Visibility mask [B or 1, 1, T, T] (query, key) in original positions.

    Query at p sees key k iff (not causal or k <= p) and (window is None or p - k < window)
    and segment_ids[p] == segment_ids[k].
    """
    pos = jnp.arange(t)
    mask = jnp.ones((t, t), bool)
    if causal:
        mask &= pos[None, :] <= pos[:, None]
    if window is not None:
        mask &= pos[:, None] - pos[None, :] < window
    mask = mask[None, None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return mask


def dense_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    window: int | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """softmax(q k^T / sqrt(D) + mask) v on full arrays in original order.

    Args:
      q, k, v: [B, T, H, D].
      causal: query at p sees keys <= p.
      window: if set, query at p sees keys p-window+1 .. p (needs causal).
      segment_ids: [B, T] int; attend only within equal ids.

    Returns:
      [B, T, H, D] in q.dtype. Statistics are float32; a row with no visible key is zero.
    """
    if window is not None and not causal:
        raise ValueError("window needs causal=True (window semantics: keys p-window+1 .. p)")
    t = q.shape[1]
    scale = q.shape[-1] ** -0.5
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    mask = attention_mask(t, causal=causal, window=window, segment_ids=segment_ids)
    s = jnp.where(mask, s, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)  # empty rows: all-zero p -> zero output
    out = jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32))
    return out.astype(q.dtype)
