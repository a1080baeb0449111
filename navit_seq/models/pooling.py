"""Masked pooling of packed tokens into one vector per example slot [B, E_max, D].

`map`: multi-head attention pooling (a learned probe attends to the tokens of one image,
then a residual MLP, as in big_vision's MAP head); `mean`: the average of an image's tokens.
Slot e of a row pools the tokens whose segment id is e + 1; empty slots give zeros.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from navit_seq.models.attention import masked_attention
from navit_seq.models.partitioning import constrain, param, partitioned

POOLINGS = ("map", "mean")


def slot_token_mask(segment_ids: jax.Array, max_examples: int) -> jax.Array:
    """Boolean [B, E_max, L]: True where token l belongs to the image in slot e."""
    slots = jnp.arange(1, max_examples + 1, dtype=jnp.int32)  # [E_max]
    return segment_ids[:, None, :] == slots[None, :, None]  # [B, E_max, L]


def masked_mean_pool(tokens: jax.Array, in_slot: jax.Array) -> jax.Array:
    """tokens [B, L, D], in_slot [B, E, L] -> per-slot mean [B, E, D] (zeros when empty)."""
    counts = jnp.maximum(in_slot.sum(-1, keepdims=True), 1).astype(tokens.dtype)  # [B, E, 1]
    return jnp.einsum("bel,bld->bed", in_slot.astype(tokens.dtype), tokens) / counts


class MAPHead(nnx.Module):
    """Multi-head attention pooling: one learned probe query per example slot."""

    def __init__(
        self,
        width: int,
        num_heads: int,
        mlp: nnx.Module,
        *,
        use_bias: bool,
        impl: str,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        head_dim = width // num_heads
        self.impl, self.dtype = impl, dtype
        new = lambda init, names, shape: param(rngs, init, names, shape, param_dtype)
        xavier = nnx.initializers.xavier_uniform
        self.probe = new(xavier(), (None, "embed"), (1, width))
        self.query_kernel = new(
            xavier(in_axis=0, out_axis=(1, 2)), ("embed", "heads", "head_dim"),
            (width, num_heads, head_dim),
        )  # fmt: skip
        self.kv_kernel = new(
            xavier(in_axis=0, out_axis=(2, 3), batch_axis=1),
            ("embed", None, "heads", "head_dim"), (width, 2, num_heads, head_dim),
        )  # fmt: skip
        self.out_kernel = new(
            xavier(in_axis=(0, 1), out_axis=2), ("heads", "head_dim", "embed"),
            (num_heads, head_dim, width),
        )  # fmt: skip
        zeros = nnx.initializers.zeros
        self.query_bias = (
            new(zeros, ("heads", "head_dim"), (num_heads, head_dim)) if use_bias else None
        )
        self.kv_bias = (
            new(zeros, (None, "heads", "head_dim"), (2, num_heads, head_dim)) if use_bias else None
        )
        self.out_bias = new(zeros, ("embed",), (width,)) if use_bias else None
        self.norm = nnx.LayerNorm(
            width, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
            scale_init=partitioned(nnx.initializers.ones, ("embed",)),
            bias_init=partitioned(nnx.initializers.zeros, ("embed",)),
            rngs=rngs,
        )  # fmt: skip
        self.mlp = mlp  # the encoder's MLP block type, [B, E, D] -> [B, E, D]

    def __call__(self, tokens: jax.Array, in_slot: jax.Array) -> jax.Array:
        """tokens [B, L, D], in_slot [B, E, L] -> pooled [B, E, D] (finite for empty slots)."""
        cast = lambda p: None if p is None else p[...].astype(self.dtype)
        query = jnp.einsum("qd,dhk->qhk", cast(self.probe), cast(self.query_kernel))  # [1, H, Dh]
        if self.query_bias is not None:
            query = query + cast(self.query_bias)
        batch, max_examples = in_slot.shape[:2]
        query = jnp.broadcast_to(query, (batch, max_examples, *query.shape[1:]))  # [B, E, H, Dh]
        kv = jnp.einsum("bld,dthk->blthk", tokens, cast(self.kv_kernel))  # [B, L, 2, H, Dh]
        if self.kv_bias is not None:
            kv = kv + cast(self.kv_bias)
        mixed = masked_attention(query, kv[:, :, 0], kv[:, :, 1], in_slot[:, None], self.impl)
        pooled = jnp.einsum("behk,hkd->bed", mixed, cast(self.out_kernel))  # [B, E, D]
        if self.out_bias is not None:
            pooled = pooled + cast(self.out_bias)
        pooled = constrain(pooled, ("act_batch", "act_examples", "act_emb"))
        return pooled + self.mlp(self.norm(pooled))
