"""Masked pooling of packed tokens into one vector per example slot [B, E_max, D].

`map`: multi-head attention pooling (a learned probe attends to the tokens of one image,
then a residual MLP, as in big_vision's MAP head); `mean`: the average of an image's tokens.
Slot e of a row pools the tokens whose segment id is e + 1; empty slots give zeros.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from navit_seq.models.attention import AttentionProjections, masked_attention
from navit_seq.models.partitioning import constrain, layer_norm, param

POOLINGS = ("map", "mean")


def slot_token_mask(segment_ids: jax.Array, max_examples: int) -> jax.Array:
    """Boolean [B, E_max, L]: True where token l belongs to the image in slot e."""
    slots = jnp.arange(1, max_examples + 1, dtype=jnp.int32)  # [E_max]
    return segment_ids[:, None, :] == slots[None, :, None]  # [B, E_max, L]


def masked_mean_pool(tokens: jax.Array, in_slot: jax.Array) -> jax.Array:
    """tokens [B, L, D], in_slot [B, E, L] -> per-slot mean [B, E, D] (zeros when empty)."""
    counts = jnp.maximum(in_slot.sum(-1, keepdims=True), 1).astype(tokens.dtype)  # [B, E, 1]
    return jnp.einsum("bel,bld->bed", in_slot.astype(tokens.dtype), tokens) / counts


class MAPHead(AttentionProjections):
    """Multi-head attention pooling: one learned probe query per example slot attends to the
    tokens of its image through the shared projections, then a residual MLP."""

    def __init__(
        self,
        width: int,
        num_heads: int,
        mlp: nnx.Module,
        *,
        use_bias: bool,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            width, width, num_heads, qk_norm=False, use_bias=use_bias, dtype=dtype,
            param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip
        self.probe = param(
            rngs, nnx.initializers.xavier_uniform(), (None, "embed"), (1, width), param_dtype
        )
        self.norm = layer_norm(
            width, "embed", use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.mlp = mlp  # the encoder's MLP block type, [B, E, D] -> [B, E, D]

    def __call__(self, tokens: jax.Array, in_slot: jax.Array) -> jax.Array:
        """tokens [B, L, D], in_slot [B, E, L] -> pooled [B, E, D] (finite for empty slots)."""
        query = self.queries(self.probe[...].astype(self.dtype))  # [1, H, Dh]
        batch, max_examples = in_slot.shape[:2]
        query = jnp.broadcast_to(query, (batch, max_examples, *query.shape[1:]))  # [B, E, H, Dh]
        key, value = self.keys_values(tokens)  # [B, L, H, Dh] each
        mixed = masked_attention(query, key, value, in_slot[:, None])  # [B, E, H, Dh]
        pooled = self.output(mixed)  # [B, E, D]
        pooled = constrain(pooled, ("act_batch", "act_examples", "act_emb"))
        return pooled + self.mlp(self.norm(pooled))
