"""Masked pooling against float64 numpy: MAP head and masked mean."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from navit_seq.models.navit import MLP
from navit_seq.models.pooling import MAPHead, masked_mean_pool, slot_token_mask

WIDTH, HEADS, MLP_DIM, MAX_EXAMPLES = 16, 2, 32, 3
# Row 0: two images and padding; row 1: one image, two empty slots; row 2: all padding.
SEGMENT_IDS = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])


@pytest.fixture(scope="module")
def map_head() -> MAPHead:
    rngs = nnx.Rngs(0)
    common = dict(dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
    mlp = MLP(WIDTH, MLP_DIM, use_bias=True, dropout=0.0, **common)
    return MAPHead(WIDTH, HEADS, mlp, use_bias=True, **common)


def numpy_map(head: MAPHead, tokens: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
    """Reference MAP in float64 with per-example Python loops (pooled [B, E, D])."""
    f64 = lambda p: np.asarray(p[...], np.float64)
    head_dim = WIDTH // HEADS
    query = np.einsum("d,dhk->hk", f64(head.probe)[0], f64(head.query_kernel))
    query = query + f64(head.query_bias)
    out = np.zeros((tokens.shape[0], MAX_EXAMPLES, WIDTH))
    for b in range(tokens.shape[0]):
        for e in range(MAX_EXAMPLES):
            own = tokens[b, segment_ids[b] == e + 1].astype(np.float64)  # [n, D]
            if not len(own):
                continue
            kv = np.einsum("nd,dthk->nthk", own, f64(head.kv_kernel)) + f64(head.kv_bias)
            heads = []
            for h in range(HEADS):
                logits = kv[:, 0, h] @ query[h] / np.sqrt(head_dim)
                weights = np.exp(logits - logits.max())
                heads.append((weights / weights.sum()) @ kv[:, 1, h])
            pooled = np.einsum("hk,hkd->d", np.stack(heads), f64(head.out_kernel))
            pooled = pooled + f64(head.out_bias)
            normed = (pooled - pooled.mean()) / np.sqrt(pooled.var() + 1e-6)
            normed = normed * f64(head.norm.scale) + f64(head.norm.bias)
            hidden = normed @ f64(head.mlp.fc1.kernel) + f64(head.mlp.fc1.bias)
            hidden = (
                0.5 * hidden * (1 + np.tanh(np.sqrt(2 / np.pi) * (hidden + 0.044715 * hidden**3)))
            )
            out[b, e] = pooled + hidden @ f64(head.mlp.fc2.kernel) + f64(head.mlp.fc2.bias)
    return out


def test_map_head_matches_numpy_per_example_reference(map_head):
    tokens = np.random.default_rng(0).normal(size=(3, 6, WIDTH)).astype(np.float32)
    in_slot = slot_token_mask(jnp.asarray(SEGMENT_IDS), MAX_EXAMPLES)
    got = np.asarray(map_head(jnp.asarray(tokens), in_slot))
    expected = numpy_map(map_head, tokens, SEGMENT_IDS)
    occupied = np.asarray(in_slot).any(-1)
    assert occupied.tolist() == [[True, True, False], [True, False, False], [False] * 3]
    np.testing.assert_allclose(got[occupied], expected[occupied], rtol=1e-4, atol=1e-5)
    assert np.isfinite(got).all()  # empty slots give finite (later zeroed) values


def test_masked_mean_pool_averages_each_image_and_zeros_empty_slots():
    tokens = np.random.default_rng(1).normal(size=(3, 6, WIDTH)).astype(np.float32)
    in_slot = slot_token_mask(jnp.asarray(SEGMENT_IDS), MAX_EXAMPLES)
    got = np.asarray(masked_mean_pool(jnp.asarray(tokens), in_slot))
    expected = np.zeros((3, MAX_EXAMPLES, WIDTH))
    for b, e in np.ndindex(3, MAX_EXAMPLES):
        own = tokens[b, SEGMENT_IDS[b] == e + 1]
        if len(own):
            expected[b, e] = own.astype(np.float64).mean(0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
