"""The sequence model: token embeddings, pre-norm ring-attention blocks, action head.

Dimension letters: B batch, T steps, k tokens per step, L tokens (= T * k), W width, H heads,
D head dim, A action dim.

`Backbone` is written per shard: its `__call__` sees the local [B_local, T_local, ...] slice of a
batch and calls `ring.attention.ring_attention` over the `seq` axis, so it must run inside
`jax.shard_map`. The wrapping happens in one place, `shard_apply`, used by `forward` (predictions)
and `loss` (the training objective); on a 1 x 1 mesh the same code runs on one device.

Layout: the global step arrays are permuted once at the model boundary (`ring.layout.to_layout`
over steps, stripe 1) and each shard interleaves its own steps into tokens. A zigzag chunk of steps
is a zigzag chunk of tokens, so ring attention is told `layout="zigzag"`; the striped layout keeps
whole timesteps together and is told `layout="striped", stripe=k` (k tokens per step). Either way
its masks use original token positions.

Padding: steps with `mask = False` get segment id 0 and real steps segment id 1, so real tokens
never attend to padding (and padding only to padding), exactly what the cached actor sees.

Regularisation (off by default; the Decision Transformer config turns it on, as GPT-2 in Chen et al.
2021): `embed_norm` puts a LayerNorm on the token embeddings, and `dropout` drops embeddings and
both residual branches (attention output, FFN output) while training. Attention probabilities are
not dropped: ring attention never materialises them. Evaluation (`forward`, the actors) is always
deterministic; `loss` drops only when given a key, and every shard folds its own index into it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ringrl.agents.batch import KEYS as BATCH_KEYS
from ringrl.agents.batch import zeros as zero_batch
from ringrl.agents.tokens import TokenEmbed, check_tokens
from ringrl.ring.attention import RESIDUAL_POLICY, ring_attention
from ringrl.ring.ffn import blockwise_ffn
from ringrl.ring.layout import check_layout, from_layout, layout_unit, to_layout
from ringrl.ring.mesh import DATA, SEQ
from ringrl.ring.reference import dense_attention

REMAT_POLICIES = {
    # Keep the ring's output and log-sum-exp; recompute the rest (projections, FFN), so the
    # backward never walks the ring forward again.
    "ring_residuals": RESIDUAL_POLICY,
    "none": None,  # no rematerialisation
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}
ATTENTIONS = ("ring", "dense")
ACTIVATIONS = {"gelu": jax.nn.gelu, "relu": jax.nn.relu}  # FFN nonlinearity (GPT-2 DT: relu)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    attention: str,
    window: int | None,
    segment_ids: jax.Array | None,
    layout: str,
    stripe: int,
    block_q: int | None = None,
    block_kv: int | None = None,
) -> jax.Array:
    """Causal attention of the local shard [B, Tl, H, D] (inside shard_map over SEQ).

    "ring" runs ring attention over SEQ; "dense" is the plain single-device baseline and needs the
    whole sequence on the device (SEQ of size 1).
    """
    if attention == "dense":
        return dense_attention(q, k, v, causal=True, window=window, segment_ids=segment_ids)
    return ring_attention(
        q,
        k,
        v,
        axis_name=SEQ,
        causal=True,
        window=window,
        segment_ids=segment_ids,
        layout=layout,
        stripe=stripe,
        block_q=block_q,
        block_kv=block_kv,
    )


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + FFN(LN(x)) applied blockwise.

    Attributes:
      embed_dim: W.
      num_heads: H (D = W / H).
      mlp_ratio: FFN hidden width / W.
      window: attention window in tokens (None: full causal).
      ffn_chunk: tokens per FFN chunk (None: whole shard at once).
      attention: "ring" or "dense".
      layout, stripe, block_q, block_kv: passed to ring attention.
      dropout: rate on both residual branches while training (0: none, no rng needed).
      activation: FFN nonlinearity, a key of ACTIVATIONS.
    """

    embed_dim: int
    num_heads: int
    mlp_ratio: int = 4
    window: int | None = None
    ffn_chunk: int | None = None
    attention: str = "ring"
    layout: str = "contiguous"
    stripe: int = 1
    block_q: int | None = None
    block_kv: int | None = None
    dropout: float = 0.0
    activation: str = "gelu"

    def setup(self):
        w, h = self.embed_dim, self.num_heads
        self.ln_attn = nn.LayerNorm(name="ln_attn")
        self.qkv = nn.DenseGeneral((3, h, w // h), name="qkv")
        self.out = nn.DenseGeneral(w, axis=(-2, -1), name="out")
        self.ln_ffn = nn.LayerNorm(name="ln_ffn")
        hidden = self.mlp_ratio * w
        self.w1 = self.param("w1", nn.initializers.lecun_normal(), (w, hidden))
        self.b1 = self.param("b1", nn.initializers.zeros, (hidden,))
        self.w2 = self.param("w2", nn.initializers.lecun_normal(), (hidden, w))
        self.b2 = self.param("b2", nn.initializers.zeros, (w,))
        self.drop = nn.Dropout(self.dropout)

    def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q, k, v [B, L, H, D] of the tokens x [B, L, W]."""
        qkv = self.qkv(self.ln_attn(x))
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

    def finish(self, x: jax.Array, a: jax.Array, train: bool = False) -> jax.Array:
        """Residual output projection of the attention result a [B, L, H, D], then the FFN;
        with `train`, both residual branches go through dropout."""
        x = x + self.drop(self.out(a), deterministic=not train)
        h = self.ln_ffn(x)
        # The chunk is capped at the local length so tiny inputs (init, acting) need no divisor.
        chunk = h.shape[1] if self.ffn_chunk is None else min(self.ffn_chunk, h.shape[1])
        mlp = {"w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": self.b2}  # ring.ffn.mlp's
        if self.activation != "gelu":  # ring.ffn.mlp is the gelu MLP
            act, p = ACTIVATIONS[self.activation], mlp

            def mlp(xc):
                return act(xc @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

        return x + self.drop(blockwise_ffn(h, mlp, chunk), deterministic=not train)

    def __call__(self, x: jax.Array, segment_ids: jax.Array, train: bool = False) -> jax.Array:
        q, k, v = self.project(x)
        a = attend(
            q,
            k,
            v,
            attention=self.attention,
            window=self.window,
            segment_ids=segment_ids,
            layout=self.layout,
            stripe=self.stripe,
            block_q=self.block_q,
            block_kv=self.block_kv,
        )
        return self.finish(x, a, train)


class Backbone(nn.Module):
    """Token embedding + `num_layers` blocks + final norm + action head (per shard).

    Attributes:
      action_dim: number of discrete actions, or the continuous action size.
      discrete: cross-entropy over logits (True) or tanh mean with MSE (False).
      tokens: token types per step, e.g. agents.at.TOKENS.
      embed_dim, num_layers, num_heads, mlp_ratio: transformer size.
      windows: per-layer attention window in tokens (None entries: full causal); None: all full.
      ffn_chunk: tokens per blockwise-FFN chunk (None: whole shard).
      remat: name in REMAT_POLICIES ("none" disables jax.checkpoint).
      attention: "ring" or "dense" (single-device baseline).
      layout: "zigzag" (default: balanced causal work with no extra masked pairs), "contiguous"
        or "striped" (stripe = tokens per step).
      block_q, block_kv: ring attention inner blocks (None: its default).
      max_timestep: timestep-embedding rows (timesteps must be < this).
      max_trajectories: trajectory-index rows (context slots / attempts must be < this).
      return_scale: multiplies target returns before embedding.
      reward_scale: multiplies rewards before embedding.
      slot_embedding: embed each step's trajectory index (slot in the context).
      dropout: training-time dropout on the embeddings and every residual branch (0: none).
      embed_norm: LayerNorm on the token embeddings (GPT-2 DT's `embed_ln`).
      activation: FFN nonlinearity, a key of ACTIVATIONS.
    """

    action_dim: int
    discrete: bool
    tokens: tuple[str, ...]
    embed_dim: int = 128
    num_layers: int = 3
    num_heads: int = 4
    mlp_ratio: int = 4
    windows: tuple[int | None, ...] | None = None
    ffn_chunk: int | None = None
    remat: str = "ring_residuals"
    attention: str = "ring"
    layout: str = "zigzag"
    block_q: int | None = None
    block_kv: int | None = None
    max_timestep: int = 1024
    max_trajectories: int = 64
    return_scale: float = 1.0
    reward_scale: float = 1.0
    slot_embedding: bool = True
    dropout: float = 0.0
    embed_norm: bool = False
    activation: str = "gelu"

    def setup(self):
        check_tokens(tuple(self.tokens))
        check_layout(self.layout, self.tokens_per_step)
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat {self.remat!r} unknown; use one of {list(REMAT_POLICIES)}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention {self.attention!r} unknown; use one of {ATTENTIONS}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} not divisible by num_heads")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout {self.dropout} must be in [0, 1)")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} unknown; use one of {ACTIVATIONS}")
        windows = self.layer_windows
        self.embed = TokenEmbed(
            self.embed_dim,
            self.action_dim,
            self.discrete,
            self.max_timestep,
            self.max_trajectories,
            self.return_scale,
            self.reward_scale,
            self.slot_embedding,
            embed_norm=self.embed_norm,
        )
        self.embed_drop = nn.Dropout(self.dropout)
        block = Block
        if self.remat != "none":
            # `train` (argument 3, counting self) selects dropout: static under remat.
            block = nn.remat(
                Block, policy=REMAT_POLICIES[self.remat], prevent_cse=True, static_argnums=(3,)
            )
        self.blocks = [
            block(
                self.embed_dim,
                self.num_heads,
                self.mlp_ratio,
                windows[i],
                self.ffn_chunk,
                self.attention,
                self.layout,
                self.tokens_per_step,
                self.block_q,
                self.block_kv,
                self.dropout,
                self.activation,
                name=f"block_{i}",
            )
            for i in range(self.num_layers)
        ]
        self.ln_f = nn.LayerNorm(name="ln_f")
        self.head = nn.Dense(self.action_dim, name="head")

    @property
    def tokens_per_step(self) -> int:
        return len(self.tokens)

    @property
    def action_token(self) -> int:
        """Index within a step of the token the action is predicted from ("state" or "step")."""
        tokens = list(self.tokens)
        return tokens.index("step") if "step" in tokens else tokens.index("state")

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        if self.windows is None:
            return (None,) * self.num_layers
        if len(self.windows) != self.num_layers:
            raise ValueError(
                f"windows has {len(self.windows)} entries, need one per layer ({self.num_layers})"
            )
        return tuple(None if w is None else int(w) for w in self.windows)

    def predict(self, h: jax.Array) -> jax.Array:
        """Action prediction from state-token outputs h [..., W]: logits or tanh mean [..., A]."""
        out = self.head(self.ln_f(h))
        return out if self.discrete else jnp.tanh(out)

    def __call__(self, batch: dict[str, jax.Array], train: bool = False) -> jax.Array:
        """Per-shard forward: step arrays [B, Tl, ...] -> action predictions [B, Tl, A].

        `train` turns dropout on (needs a "dropout" rng when `dropout` > 0)."""
        k = self.tokens_per_step
        x = self.embed_drop(self.embed(batch, tuple(self.tokens)), deterministic=not train)
        segment_ids = jnp.repeat(batch["mask"].astype(jnp.int32), k, axis=1)
        for blk in self.blocks:
            x = blk(x, segment_ids, train)
        b, lt, w = x.shape
        h = x.reshape(b, lt // k, k, w)[:, :, self.action_token]
        return self.predict(h)


def action_loss(
    pred: jax.Array, actions: jax.Array, mask: jax.Array, discrete: bool
) -> tuple[jax.Array, jax.Array]:
    """Summed per-step action loss over valid steps, and their count.

    Discrete: cross-entropy of logits pred [B, T, A] against int actions [B, T]. Continuous: mean
    over A of the squared error of the tanh mean pred [B, T, A] against actions [B, T, A].

    Returns:
      (sum of losses over steps with mask, number of such steps), both float32 scalars.
    """
    m = mask.astype(jnp.float32)
    pred = pred.astype(jnp.float32)
    if discrete:
        logp = jax.nn.log_softmax(pred, axis=-1)
        per_step = -jnp.take_along_axis(logp, actions.astype(jnp.int32)[..., None], -1)[..., 0]
    else:
        per_step = jnp.mean(jnp.square(pred - actions.astype(jnp.float32)), axis=-1)
    return jnp.sum(per_step * m), jnp.sum(m)


def mesh_sizes(mesh: jax.sharding.Mesh) -> tuple[int, int]:
    """(data, seq) sizes; raises ValueError if either axis is missing."""
    for name in (DATA, SEQ):
        if name not in mesh.shape:
            raise ValueError(
                f"mesh axes {tuple(mesh.shape)} lack {name!r}; build it with "
                f"ring.mesh.make_mesh([('{DATA}', d), ('{SEQ}', s)])"
            )
    return mesh.shape[DATA], mesh.shape[SEQ]


def check_batch(model: Backbone, batch: dict[str, Any], mesh: jax.sharding.Mesh) -> None:
    """Raises ValueError if the batch does not fit the mesh or the model (shapes only)."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing}; agents.batch.KEYS lists the arrays a batch needs")
    n_data, n_seq = mesh_sizes(mesh)
    b, t = batch["mask"].shape[:2]
    if b % n_data:
        raise ValueError(f"batch size {b} is not divisible by mesh axis {DATA!r} size {n_data}")
    if t % layout_unit(n_seq, model.layout):
        unit = layout_unit(n_seq, model.layout)
        raise ValueError(
            f"context of {t} steps is not divisible by mesh axis {SEQ!r} size {n_seq} x "
            f"{unit // n_seq} = {unit} (layout {model.layout!r}); choose num_trajectories * "
            "horizon (or the DT window) divisible by it"
        )
    if model.attention == "dense" and n_seq != 1:
        raise ValueError(f"attention='dense' needs mesh axis {SEQ!r} of size 1, got {n_seq}")


def batch_spec(batch: dict[str, Any]) -> dict[str, P]:
    """P(DATA, SEQ) for every [B, T, ...] array of a batch."""
    return {k: P(DATA, SEQ) for k in batch}


def shard_apply(model: Backbone, mesh: jax.sharding.Mesh, fn, out_specs):
    """Wraps a per-shard `fn(params, local_batch, *extra)` in the single shard_map of the model.

    Params and `extra` arguments (e.g. a dropout key) are replicated (P()), batch arrays split
    P(DATA, SEQ) after conversion to the model's layout; call the result with global arrays
    (inside jit).
    """
    _, n_seq = mesh_sizes(mesh)

    def run(params, batch, *extra):
        batch = {k: to_layout(v, n_seq, model.layout, 1, axis=1) for k, v in batch.items()}
        in_specs = (P(), batch_spec(batch), *(P() for _ in extra))
        mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
        return mapped(params, batch, *extra)

    return run


def forward(
    model: Backbone, params: Any, batch: dict[str, jax.Array], mesh: jax.sharding.Mesh
) -> jax.Array:
    """Action predictions [B, T, A] (logits or tanh means) in original step order.

    Args:
      model: the Backbone.
      params: its parameters (the "params" collection).
      batch: global step arrays [B, T, ...] (see agents.sampler).
      mesh: a (DATA, SEQ) mesh.
    """
    check_batch(model, batch, mesh)
    _, n_seq = mesh_sizes(mesh)

    def per_shard(p, local):
        return model.apply({"params": p}, local)

    out = shard_apply(model, mesh, per_shard, P(DATA, SEQ))(params, dict(batch))
    return from_layout(out, n_seq, model.layout, 1, axis=1)


def loss(
    model: Backbone,
    params: Any,
    batch: dict[str, jax.Array],
    mesh: jax.sharding.Mesh,
    rng: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean action loss over every valid step of the GLOBAL batch (exact over any mesh).

    Each shard sums its per-step losses and counts; both are psum'd over (DATA, SEQ), so the
    result (and its gradient) equals the single-device value. With `rng` the model runs in
    training mode (dropout, if `model.dropout` > 0): each shard draws its masks from `rng` folded
    with its own index, so masks differ across shards (and so depend on the mesh).

    Returns:
      (loss scalar, {"loss": loss, "num_targets": number of valid action targets}).
    """
    check_batch(model, batch, mesh)
    _, n_seq = mesh_sizes(mesh)

    def per_shard(p, local, *key):
        if key:  # training mode: this shard's own dropout key
            shard = jax.lax.axis_index(DATA) * n_seq + jax.lax.axis_index(SEQ)
            rngs = {"dropout": jax.random.fold_in(key[0], shard)}
            pred = model.apply({"params": p}, local, True, rngs=rngs)
        else:
            pred = model.apply({"params": p}, local)
        total, count = action_loss(pred, local["actions"], local["mask"], model.discrete)
        total, count = jax.lax.psum((total, count), (DATA, SEQ))
        return total / jnp.maximum(count, 1.0), count

    extra = () if rng is None else (rng,)
    value, count = shard_apply(model, mesh, per_shard, (P(), P()))(params, dict(batch), *extra)
    return value, {"loss": value, "num_targets": count}


def init_params(model: Backbone, rng: jax.Array, obs_dim: int) -> Any:
    """Initial parameters (host, unsharded) from a one-step dummy batch; shapes only matter."""
    small = model.clone(attention="dense", layout="contiguous")

    # Jitted: op-by-op init of a few hundred tiny arrays is slower than one small compile.
    @jax.jit
    def init(rng):
        return small.init(rng, dummy_batch(model, obs_dim, batch_size=1, steps=1))["params"]

    return init(rng)


def dummy_batch(model: Backbone, obs_dim: int, batch_size: int, steps: int) -> dict[str, Any]:
    """A zero batch with the model's shapes and dtypes (for init and shape checks)."""
    out = zero_batch(
        batch_size,
        steps,
        obs_dim,
        action_dim=model.action_dim,
        discrete=model.discrete,
        xp=jnp,
    )
    out["mask"] = jnp.ones((batch_size, steps), bool)
    return out
