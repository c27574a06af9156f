"""Pure-JAX sequence parallelism: Ring Attention and what it needs."""

from ring.mesh import DATA, SEQ, make_mesh

__all__ = ["DATA", "SEQ", "make_mesh"]
