"""Segment-masked multi-head self-attention with a fused QKV projection.

Packed sequences hold several images; a token attends only to tokens of its own image:
`attend[b, q, k] = (segment_ids[b, q] == segment_ids[b, k]) & (segment_ids[b, k] > 0)`.

Two implementations of that segment self-attention (`model.attention_impl`):
- "xla" (default, any backend): the L x L scores masked by `segment_attend_mask`;
- "fused_cpu": a C++ XLA:CPU kernel that computes each image's own block only
  (navit_seq/kernels/segment_attention.py; tests/models/test_fused_cpu_attention.py checks it
  against "xla" and a float64 reference on contiguous, scattered and empty segments).
Attention with other masks (causal, cross-attention, the MAP probe) is `masked_attention`, XLA.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from navit_seq.models.partitioning import constrain, layer_norm, param

# Implementations of attention under an arbitrary boolean mask (decoder, MAP head).
ATTENTION_IMPLS = ("xla",)
# Implementations of self-attention within segments (the NaViT and text encoders).
SEGMENT_ATTENTION_IMPLS = ("xla", "fused_cpu")


def segment_attend_mask(segment_ids: jax.Array) -> jax.Array:
    """Boolean mask [B, 1, L, L]: True where query token q may attend to key token k."""
    same_image = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, L, L]
    key_is_token = (segment_ids > 0)[:, None, :]  # [B, 1, L]
    return (same_image & key_is_token)[:, None]  # [B, 1, L, L]


def head_dim_of(width: int, num_heads: int) -> int:
    """Per-head size; a clear error when `width` does not split into `num_heads` heads."""
    if width % num_heads:
        raise ValueError(
            f"width {width} is not divisible by num_heads {num_heads}; "
            "pick a width that is a multiple of the head count."
        )
    return width // num_heads


def segment_self_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, segment_ids: jax.Array | None, impl: str
) -> jax.Array:
    """Self-attention of query/key/value [B, L, H, Dh] within segments [B, L] (0 = padding)
    -> [B, L, H, Dh]; padding queries give finite values that callers mask. `segment_ids=None`
    lets every token attend to every token (a plain unpacked ViT, the benchmark's baseline)."""
    if segment_ids is None:
        return masked_attention(query, key, value, jnp.ones((1, 1, 1, 1), bool))
    if impl == "fused_cpu":
        # Imported on first use: the kernel module builds its custom_partitioning rules (and,
        # when called, compiles C++) at import, which no "xla" run should pay for.
        from navit_seq.kernels import segment_attention as fused

        return fused.segment_attention(query, key, value, segment_ids)
    return masked_attention(query, key, value, segment_attend_mask(segment_ids), impl)


def masked_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, attend: jax.Array, impl: str = "xla"
) -> jax.Array:
    """Softmax attention of query [B, Q, H, Dh] over key/value [B, K, H, Dh].

    `attend` [B, 1 or H, Q, K] is True where attention is allowed. A query with no allowed key
    (padding token, empty slot) gets a finite uniform average instead of NaN; callers mask it.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r} is not supported; use one of {ATTENTION_IMPLS}.")
    head_dim = query.shape[-1]
    query = query * jnp.asarray(head_dim**-0.5, query.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key)  # [B, H, Q, K]
    # Softmax in float32; the finite fill keeps fully masked rows NaN-free (exp(-inf - -inf)).
    logits = jnp.where(attend, logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)  # [B, H, Q, K]
    return jnp.einsum("bhqk,bkhd->bqhd", weights, value)  # [B, Q, H, Dh]


class AttentionProjections(nnx.Module):
    """Multi-head attention projections: queries from a stream of `width`, keys and values from
    a source of `source_width` (the stream itself, or other tokens: the decoder's self- and
    cross-attention, the MAP head's probe over the image tokens)."""

    def __init__(
        self,
        width: int,
        source_width: int,
        num_heads: int,
        *,
        qk_norm: bool,
        use_bias: bool,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        head_dim = head_dim_of(width, num_heads)
        self.dtype = dtype
        new = lambda init, names, shape: param(rngs, init, names, shape, param_dtype)
        xavier = nnx.initializers.xavier_uniform
        zeros = nnx.initializers.zeros
        self.query_kernel = new(
            xavier(in_axis=0, out_axis=(1, 2)), ("embed", "heads", "head_dim"),
            (width, num_heads, head_dim),
        )  # fmt: skip
        self.kv_kernel = new(
            xavier(in_axis=0, out_axis=(2, 3), batch_axis=1),
            ("embed", None, "heads", "head_dim"), (source_width, 2, num_heads, head_dim),
        )  # fmt: skip
        self.out_kernel = new(
            xavier(in_axis=(0, 1), out_axis=2), ("heads", "head_dim", "embed"),
            (num_heads, head_dim, width),
        )  # fmt: skip
        self.query_bias = (
            new(zeros, ("heads", "head_dim"), (num_heads, head_dim)) if use_bias else None
        )
        self.kv_bias = (
            new(zeros, (None, "heads", "head_dim"), (2, num_heads, head_dim)) if use_bias else None
        )
        self.out_bias = new(zeros, ("embed",), (width,)) if use_bias else None
        norm = lambda: layer_norm(
            head_dim, "head_dim", use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.query_norm = norm() if qk_norm else None
        self.key_norm = norm() if qk_norm else None

    def _cast(self, p: nnx.Param | None) -> jax.Array | None:
        return None if p is None else p[...].astype(self.dtype)

    def queries(self, x: jax.Array) -> jax.Array:
        """x [..., D] -> queries [..., H, Dh]."""
        query = jnp.einsum("...d,dhk->...hk", x, self._cast(self.query_kernel))
        if self.query_bias is not None:
            query = query + self._cast(self.query_bias)
        return query if self.query_norm is None else self.query_norm(query)

    def keys_values(self, source: jax.Array) -> tuple[jax.Array, jax.Array]:
        """source [..., D_source] -> (keys, values), each [..., H, Dh]."""
        kv = jnp.einsum("...d,dthk->...thk", source, self._cast(self.kv_kernel))
        if self.kv_bias is not None:
            kv = kv + self._cast(self.kv_bias)  # [..., 2, H, Dh]
        key, value = kv[..., 0, :, :], kv[..., 1, :, :]
        return (key if self.key_norm is None else self.key_norm(key)), value

    def output(self, mixed: jax.Array) -> jax.Array:
        """Attention output [..., H, Dh] -> [..., D]."""
        out = jnp.einsum("...hk,hkd->...d", mixed, self._cast(self.out_kernel))
        return out if self.out_bias is None else out + self._cast(self.out_bias)


class SelfAttention(nnx.Module):
    """Pre-projected multi-head self-attention: fused QKV, optional query-key LayerNorm."""

    def __init__(
        self,
        width: int,
        num_heads: int,
        *,
        qk_norm: bool,
        use_bias: bool,
        impl: str,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        if impl not in SEGMENT_ATTENTION_IMPLS:
            raise ValueError(
                f"attention_impl={impl!r} is not supported; use one of {SEGMENT_ATTENTION_IMPLS}."
            )
        head_dim = head_dim_of(width, num_heads)
        self.impl = impl
        init = lambda initializer, names, shape: param(rngs, initializer, names, shape, param_dtype)
        self.dtype = dtype
        self.qkv_kernel = init(
            nnx.initializers.xavier_uniform(in_axis=0, out_axis=(2, 3), batch_axis=1),
            ("embed", None, "heads", "head_dim"),
            (width, 3, num_heads, head_dim),
        )
        self.out_kernel = init(
            nnx.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2),
            ("heads", "head_dim", "embed"),
            (num_heads, head_dim, width),
        )
        zeros = nnx.initializers.zeros
        self.qkv_bias = (
            init(zeros, (None, "heads", "head_dim"), (3, num_heads, head_dim)) if use_bias else None
        )
        self.out_bias = init(zeros, ("embed",), (width,)) if use_bias else None
        norm = lambda: layer_norm(
            head_dim, "head_dim", use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.query_norm = norm() if qk_norm else None
        self.key_norm = norm() if qk_norm else None

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        """x [B, L, D], segment_ids [B, L] (0 = padding; None: no mask) -> [B, L, D]."""
        # Three projections with slices of the fused kernel rather than one [B, L, 3, H, Dh]
        # einsum: slicing q, k, v out of that copied 3 x [B, L, H, Dh] forward, and backward
        # XLA:CPU padded the three gradients back together and transposed the result for the
        # weight gradient (benchmark step 5.09 -> 4.87 s, experiments/benchmarks/README.md).
        kernel = self.qkv_kernel[...].astype(self.dtype)  # [D, 3, H, Dh]
        bias = None if self.qkv_bias is None else self.qkv_bias[...].astype(self.dtype)
        projections = []
        for i in range(3):
            projected = jnp.einsum("bld,dhk->blhk", x, kernel[:, i])  # [B, L, H, Dh]
            projected = projected if bias is None else projected + bias[i]
            projections.append(constrain(projected, ("act_batch", "act_len", "act_heads", None)))
        query, key, value = projections
        if self.query_norm is not None:
            query, key = self.query_norm(query), self.key_norm(key)
        mixed = segment_self_attention(query, key, value, segment_ids, self.impl)  # [B, L, H, Dh]
        out = jnp.einsum("blhk,hkd->bld", mixed, self.out_kernel[...].astype(self.dtype))
        if self.out_bias is not None:
            out = out + self.out_bias[...].astype(self.dtype)
        return out  # [B, L, D]
