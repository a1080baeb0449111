"""Analytic FLOP count of one NaViT classifier training step (forward + backward).

Counted: matmuls only, 2*m*n*k each; backward = 2x forward (gradients w.r.t. activations and
weights), so a step is 3x the forward. Elementwise work (norms, softmax, GELU, AdamW) is left
out, as in the usual MFU convention; XLA's `cost_analysis()` counts it and is the cross-check.
"""

from collections.abc import Sequence
from dataclasses import dataclass

BACKWARD_FACTOR = 2  # d(activations) and d(weights): two matmuls per forward matmul


@dataclass(frozen=True)
class ModelShape:
    """The sizes the count needs (a ViT classifier with a MAP head)."""

    width: int
    depth: int
    mlp_dim: int
    num_classes: int
    patch_dim: int  # P * P * C pixels per patch


def _token_matmul_flops(shape: ModelShape) -> int:
    """Forward FLOPs per token that do not depend on the sequence: patch embedding + blocks."""
    d, f = shape.width, shape.mlp_dim
    per_block = 2 * (3 * d * d + d * d + 2 * d * f)  # fused QKV, output projection, MLP in/out
    # The MAP head projects every token to keys and values once.
    return 2 * shape.patch_dim * d + shape.depth * per_block + 2 * (2 * d * d)


def _attention_flops(shape: ModelShape, query_key_pairs: int) -> int:
    """Forward FLOPs of q.k scores and the attention-weighted values over all heads."""
    return shape.depth * 2 * (2 * query_key_pairs * shape.width)


def _head_flops(shape: ModelShape, num_slots: int, slot_token_pairs: int) -> int:
    """Forward FLOPs of the MAP head and classifier: the probe's query (once), then per slot
    scores and values over its keys, output projection, MLP and logits."""
    d, f = shape.width, shape.mlp_dim
    per_slot = 2 * (d * d + 2 * d * f + d * shape.num_classes)
    return 2 * d * d + num_slots * per_slot + 2 * (2 * slot_token_pairs * d)


def packed_step_flops(
    shape: ModelShape,
    num_rows: int,
    seq_len: int,
    max_examples_per_seq: int,
    query_key_pairs: int | None = None,
) -> int:
    """FLOPs of one step as executed on a [num_rows, seq_len] batch.

    Every token (padding included) goes through every matmul and every pooling slot attends
    over its whole row. Attention scores `query_key_pairs` pairs: by default all seq_len keys
    per query (XLA's masked attention: the mask only zeroes weights); the fused CPU kernel
    scores each image's own tokens only (pass the sum of n^2 over images). Its backward pass
    recomputes the scores; that recomputation is not counted, as usual for model FLOPs.
    """
    tokens = num_rows * seq_len
    slots = num_rows * max_examples_per_seq
    if query_key_pairs is None:
        query_key_pairs = num_rows * seq_len * seq_len
    forward = (
        tokens * _token_matmul_flops(shape)
        + _attention_flops(shape, query_key_pairs)
        + _head_flops(shape, slots, slots * seq_len)
    )
    return (1 + BACKWARD_FACTOR) * forward


def useful_step_flops(shape: ModelShape, tokens_per_image: Sequence[int]) -> int:
    """FLOPs the step needs for its real work: each image alone, no padding, one pooled slot."""
    tokens = sum(tokens_per_image)
    forward = (
        tokens * _token_matmul_flops(shape)
        + _attention_flops(shape, sum(n * n for n in tokens_per_image))
        + _head_flops(shape, len(tokens_per_image), tokens)
    )
    return (1 + BACKWARD_FACTOR) * forward
