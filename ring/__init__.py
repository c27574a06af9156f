"""Pure-JAX sequence parallelism: Ring Attention and what it needs."""

from ringrl.ring.attention import blockwise_attention, ring_attention
from ringrl.ring.ffn import blockwise_ffn
from ringrl.ring.layout import from_layout, local_positions, to_layout
from ringrl.ring.mesh import DATA, SEQ, make_mesh
from ringrl.ring.reference import dense_attention

__all__ = [
    "DATA",
    "SEQ",
    "blockwise_attention",
    "blockwise_ffn",
    "dense_attention",
    "from_layout",
    "local_positions",
    "make_mesh",
    "ring_attention",
    "to_layout",
]
