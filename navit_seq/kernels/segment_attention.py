"""Segment-blocked self-attention on CPU: a fused C++ kernel (segment_attention.cc) behind
`jax.custom_vjp`, selected with `model.attention_impl="fused_cpu"`.

Why a kernel: with XLA, a packed row's attention computes all L x L scores, masks most of them
(a row of 256 holding three images keeps about a third), and writes and re-reads the
[B, H, L, L] score, probability and gradient tensors through memory several times per layer:
on the 2-core Zen 4 benchmark machine one layer's forward + backward took 129-131 ms, about a
quarter of the XLA-attention training step, against 31-39 ms for this kernel
(experiments/benchmarks/attention.py). The kernel runs each image's own n x n block in cache and
recomputes probabilities in the backward pass, so it does (sum of n^2) instead of L^2 work and
keeps nothing of size L x L between the passes.

It computes exactly the segment mask of `attention.segment_attend_mask` (q attends to k iff
their segment ids are equal and > 0, whether or not a segment's tokens are contiguous). Padding
queries get zero outputs (XLA's path gives them a finite average that callers mask anyway).
Inputs of other float dtypes are computed in float32. CPU only: on GPU/TPU use "xla".

Sharding: both custom calls carry a partitioning rule (`custom_partitioning`): rows and heads
may be sharded over any mesh axes and each device runs the kernel on its own shard; the token
and head-feature dims are gathered (a row's attention needs all of its tokens).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

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


def _scale(query) -> np.float32:
    return np.float32(query.shape[-1] ** -0.5)


def _forward_kernel(query, key, value, segment_ids):
    """q, k, v [B, L, H, D] f32, segment_ids [B, L] i32 -> (out [B, L, H, D], lse [B, L, H])."""
    out_types = (
        jax.ShapeDtypeStruct(query.shape, jnp.float32),
        jax.ShapeDtypeStruct(query.shape[:-1], jnp.float32),
    )
    call = jax.ffi.ffi_call(_FORWARD, out_types)
    return call(query, key, value, segment_ids, scale=_scale(query))


def _backward_kernel(query, key, value, segment_ids, out, lse, d_out):
    """The forward's inputs and outputs + d_out [B, L, H, D] -> (d_query, d_key, d_value)."""
    grad_types = tuple(jax.ShapeDtypeStruct(query.shape, jnp.float32) for _ in range(3))
    call = jax.ffi.ffi_call(_BACKWARD, grad_types)
    return call(query, key, value, segment_ids, out, lse, d_out, scale=_scale(query))


def _row_head_shardings(mesh, arg_shapes):
    """(tokens [B, L, H, D], segment_ids [B, L], lse [B, L, H]) shardings: the query's row and
    head sharding kept, L and D whole on every device."""
    spec = tuple(arg_shapes[0].sharding.spec)
    rows, _, heads, _ = spec + (None,) * (4 - len(spec))
    named = lambda *axes: NamedSharding(mesh, PartitionSpec(*axes))
    return named(rows, None, heads, None), named(rows, None), named(rows, None, heads)


def _partitioned(kernel, rule: str, result_kinds: tuple[str, ...], arg_kinds: tuple[str, ...]):
    """`kernel` with a partitioning rule: each device runs it on its rows and heads."""
    partitioned = custom_partitioning(kernel)

    def shardings(mesh, arg_shapes, kinds):
        tokens, segments, lse = _row_head_shardings(mesh, arg_shapes)
        by_kind = {"tokens": tokens, "segments": segments, "lse": lse}
        return tuple(by_kind[kind] for kind in kinds)

    def infer(mesh, arg_shapes, result_shape):
        return shardings(mesh, arg_shapes, result_kinds)

    def partition(mesh, arg_shapes, result_shape):
        return (
            mesh,
            kernel,
            shardings(mesh, arg_shapes, result_kinds),
            shardings(mesh, arg_shapes, arg_kinds),
        )

    partitioned.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer,
        sharding_rule=rule,
        need_replication_factors=("l", "d"),
    )
    return partitioned


_TOKENS = "b l h d"
_forward = _partitioned(
    _forward_kernel,
    f"{_TOKENS}, {_TOKENS}, {_TOKENS}, b l -> {_TOKENS}, b l h",
    result_kinds=("tokens", "lse"),
    arg_kinds=("tokens", "tokens", "tokens", "segments"),
)
_backward = _partitioned(
    _backward_kernel,
    f"{_TOKENS}, {_TOKENS}, {_TOKENS}, b l, {_TOKENS}, b l h, {_TOKENS} -> "
    f"{_TOKENS}, {_TOKENS}, {_TOKENS}",
    result_kinds=("tokens", "tokens", "tokens"),
    arg_kinds=("tokens", "tokens", "tokens", "segments", "tokens", "lse", "tokens"),
)


@jax.custom_vjp
def _attention(query, key, value, segment_ids):
    return _forward(query, key, value, segment_ids)[0]


def _attention_fwd(query, key, value, segment_ids):
    out, lse = _forward(query, key, value, segment_ids)
    return out, (query, key, value, segment_ids, out, lse)


def _attention_bwd(residuals, d_out):
    d_query, d_key, d_value = _backward(*residuals, d_out.astype(jnp.float32))
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
    # Leading dims flattened into one row dim [B, L, H, D] (a no-op for the encoder's inputs).
    rows = lambda x: x.reshape(-1, *x.shape[-3:]).astype(jnp.float32)
    out = _attention(
        rows(query),
        rows(key),
        rows(value),
        segment_ids.reshape(-1, segment_ids.shape[-1]).astype(jnp.int32),
    )
    return out.reshape(query.shape).astype(query.dtype)
