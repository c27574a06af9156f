"""Online-softmax arithmetic shared by ring attention and sharded decoding.

A partial attention result over a subset of keys is kept as `(o, lse)`: the output normalised over
that subset (`o`, float32) and the log-sum-exp of its scores (`lse`, float32, -inf where the subset
is empty). Two partials over disjoint key sets merge exactly (Milakov & Gimelshein 2018; the
"online softmax" that blockwise and ring attention rest on).
"""

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def merge(o1: jax.Array, lse1: jax.Array, o2: jax.Array, lse2: jax.Array):
    """Merges two partial softmax results over disjoint key sets.

    Args:
      o1, o2: [..., D] float32 outputs, each normalised over its own keys (zeros where empty).
      lse1, lse2: [...] float32 log-sum-exp of the scores (-inf where no key was visible).

    Returns:
      `(o, lse)` over the union; rows where both are empty stay `(0, -inf)`, never NaN.
    """
    lse = jnp.logaddexp(lse1, lse2)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    w1 = jnp.where(jnp.isfinite(lse1), jnp.exp(lse1 - safe), 0.0)
    w2 = jnp.where(jnp.isfinite(lse2), jnp.exp(lse2 - safe), 0.0)
    return o1 * w1[..., None] + o2 * w2[..., None], lse


def merge_over_axis(o: jax.Array, lse: jax.Array, axis_name: str):
    """Merges per-device partials `(o, lse)` over a mesh axis (inside shard_map).

    Every device contributes a partial over its own keys; the result, identical on every device, is
    the softmax over all of them. One collective: `(o, lse)` travel packed in a single all_gather
    (the partials are tiny at decode time, so latency, not bandwidth, is what a collective costs),
    then every device merges the n partials locally.
    """
    packed = jnp.concatenate([o, lse[..., None].astype(o.dtype)], axis=-1)
    every = jax.lax.all_gather(packed, axis_name, to="invarying")  # [n, ..., D + 1]
    os_, lses = every[..., :-1], every[..., -1]
    m = jnp.max(lses, axis=0)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.where(jnp.isfinite(lses), jnp.exp(lses - m_safe), 0.0)
    denom = w.sum(0)
    num = (os_ * w[..., None]).sum(0)
    out = jnp.where(denom[..., None] > 0, num / jnp.where(denom > 0, denom, 1.0)[..., None], 0.0)
    lse_all = jnp.where(denom > 0, m_safe + jnp.log(jnp.where(denom > 0, denom, 1.0)), NEG_INF)
    return out, lse_all
