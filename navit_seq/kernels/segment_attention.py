"""Segment-blocked self-attention on CPU: a fused C++ kernel (segment_attention.cc) behind
`jax.custom_vjp`, selected with `model.attention_impl="fused_cpu"`.

Why a kernel: with XLA, a packed row's attention computes all L x L scores, masks most of them
(a row of 256 holding three images keeps about a third), and writes and re-reads the
[B, H, L, L] score, probability and gradient tensors through memory several times per layer;
on the 2-core benchmark machine that core ran at about 80 GFLOP/s, a third of the training step
(experiments/benchmarks/README.md). The kernel runs each image's own n x n block in cache and
recomputes probabilities in the backward pass, so it does (sum of n^2) instead of L^2 work and
keeps nothing of size L x L between the passes.

It computes exactly the segment mask of `attention.segment_attend_mask` (q attends to k iff
their segment ids are equal and > 0, whether or not a segment's tokens are contiguous). Padding
queries get zero outputs (XLA's path gives them a finite average that callers mask anyway).
Inputs of other float dtypes are computed in float32. CPU only: on GPU/TPU use "xla".
Under a multi-device mesh XLA treats the custom call as unpartitioned (it gathers the batch to
every device): correct, but use "xla" there until a partitioning rule is written.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from navit_seq.kernels import build

_FORWARD = "navit_seq_segment_attention_forward"
_BACKWARD = "navit_seq_segment_attention_backward"


@functools.cache
def _register_targets() -> None:
    library = build.load_kernel("segment_attention.cc")
    for name, symbol in (
        (_FORWARD, library.NavitSegmentAttentionForward),
        (_BACKWARD, library.NavitSegmentAttentionBackward),
    ):
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")


def _forward_call(query, key, value, segment_ids):
    """-> (out [..., L, H, D], lse [..., L, H])."""
    scale = np.float32(query.shape[-1] ** -0.5)
    out_types = (
        jax.ShapeDtypeStruct(query.shape, jnp.float32),
        jax.ShapeDtypeStruct(query.shape[:-1], jnp.float32),
    )
    call = jax.ffi.ffi_call(_FORWARD, out_types, vmap_method="broadcast_all")
    return call(query, key, value, segment_ids, scale=scale)


@jax.custom_vjp
def _attention(query, key, value, segment_ids):
    return _forward_call(query, key, value, segment_ids)[0]


def _attention_fwd(query, key, value, segment_ids):
    out, lse = _forward_call(query, key, value, segment_ids)
    return out, (query, key, value, segment_ids, out, lse)


def _attention_bwd(residuals, d_out):
    query, key, value, segment_ids, out, lse = residuals
    scale = np.float32(query.shape[-1] ** -0.5)
    grad_types = tuple(jax.ShapeDtypeStruct(query.shape, jnp.float32) for _ in range(3))
    call = jax.ffi.ffi_call(_BACKWARD, grad_types, vmap_method="broadcast_all")
    d_query, d_key, d_value = call(
        query, key, value, segment_ids, out, lse, d_out.astype(jnp.float32), scale=scale
    )
    return d_query, d_key, d_value, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def segment_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, segment_ids: jax.Array
) -> jax.Array:
    """Softmax self-attention of query/key/value [..., L, H, Dh] within segments [..., L]
    (0 = padding), scaled by Dh**-0.5 -> [..., L, H, Dh] in the query's dtype."""
    if jax.default_backend() != "cpu":
        raise ValueError(
            f"model.attention_impl='fused_cpu' runs on CPU only, but JAX's backend is "
            f"{jax.default_backend()!r}; set model.attention_impl='xla'."
        )
    if not (query.shape == key.shape == value.shape):
        raise ValueError(
            f"fused_cpu attention is self-attention: query {query.shape}, key {key.shape} and "
            f"value {value.shape} must have one [..., L, H, Dh] shape."
        )
    if segment_ids.shape != query.shape[:-2]:
        raise ValueError(
            f"segment_ids {segment_ids.shape} must be the query's [..., L] = {query.shape[:-2]}."
        )
    _register_targets()
    f32 = lambda x: x.astype(jnp.float32)
    out = _attention(f32(query), f32(key), f32(value), segment_ids.astype(jnp.int32))
    return out.astype(query.dtype)
