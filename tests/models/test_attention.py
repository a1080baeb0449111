"""Segment-masked attention against a float64 numpy masked softmax."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from navit_seq.models.attention import (
    SEGMENT_ATTENTION_IMPLS,
    AttentionProjections,
    SelfAttention,
    masked_attention,
    segment_attend_mask,
)

SEGMENT_IDS = np.array([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]])


def numpy_masked_attention(query, key, value, attend):
    """Reference: per query, softmax over its allowed keys only, in float64."""
    query, key, value = (np.asarray(a, np.float64) for a in (query, key, value))
    batch, num_q, heads, head_dim = query.shape
    out = np.zeros_like(query)
    for b in range(batch):
        for h in range(heads):
            for q in range(num_q):
                allowed = np.asarray(attend[b, 0, q])
                if not allowed.any():
                    continue
                logits = key[b, allowed, h] @ query[b, q, h] / np.sqrt(head_dim)
                weights = np.exp(logits - logits.max())
                weights /= weights.sum()
                out[b, q, h] = weights @ value[b, allowed, h]
    return out


def test_segment_attend_mask_allows_only_same_image_non_padding_keys():
    attend = np.asarray(segment_attend_mask(jnp.asarray(SEGMENT_IDS[:1])))[0, 0]
    expected = np.zeros((7, 7), bool)
    expected[:3, :3] = True
    expected[3:5, 3:5] = True
    np.testing.assert_array_equal(attend, expected)


def test_masked_attention_matches_float64_numpy_masked_softmax():
    rng = np.random.default_rng(0)
    query, key, value = (rng.normal(size=(3, 7, 2, 8)).astype(np.float32) for _ in range(3))
    attend = segment_attend_mask(jnp.asarray(SEGMENT_IDS))
    got = np.asarray(masked_attention(query, key, value, attend))
    expected = numpy_masked_attention(query, key, value, np.asarray(attend))
    token_valid = SEGMENT_IDS > 0
    np.testing.assert_allclose(got[token_valid], expected[token_valid], rtol=1e-5, atol=1e-6)


def test_fully_masked_queries_give_finite_outputs_and_gradients():
    rng = np.random.default_rng(1)
    query, key, value = (rng.normal(size=(3, 7, 2, 8)).astype(np.float32) for _ in range(3))
    attend = segment_attend_mask(jnp.asarray(SEGMENT_IDS))
    loss = lambda q, k, v: masked_attention(q, k, v, attend).sum()
    out = masked_attention(query, key, value, attend)
    grads = jax.grad(loss, argnums=(0, 1, 2))(query, key, value)
    assert np.isfinite(np.asarray(out)).all()
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


@pytest.mark.parametrize("impl", SEGMENT_ATTENTION_IMPLS)
def test_self_attention_with_qk_norm_matches_numpy(impl):
    width, heads = 16, 2
    module = SelfAttention(
        width, heads, qk_norm=True, use_bias=True, impl=impl,
        dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0),
    )  # fmt: skip
    x = np.random.default_rng(2).normal(size=(3, 7, width)).astype(np.float32)
    attend = segment_attend_mask(jnp.asarray(SEGMENT_IDS))
    got = np.asarray(module(jnp.asarray(x), jnp.asarray(SEGMENT_IDS)))

    f64 = lambda p: np.asarray(p[...], np.float64)
    qkv = np.einsum("bld,dthk->blthk", x, f64(module.qkv_kernel)) + f64(module.qkv_bias)

    def layer_norm(y, norm):
        y = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-6)
        return y * f64(norm.scale) + f64(norm.bias)

    query = layer_norm(qkv[:, :, 0], module.query_norm)
    key = layer_norm(qkv[:, :, 1], module.key_norm)
    mixed = numpy_masked_attention(query, key, qkv[:, :, 2], np.asarray(attend))
    expected = np.einsum("blhk,hkd->bld", mixed, f64(module.out_kernel)) + f64(module.out_bias)
    token_valid = SEGMENT_IDS > 0
    np.testing.assert_allclose(got[token_valid], expected[token_valid], rtol=1e-4, atol=1e-5)


def test_unknown_attention_impl_raises_naming_the_option():
    with pytest.raises(ValueError, match="attention_impl='cudnn'"):
        qkv = jnp.zeros((1, 2, 1, 4))
        masked_attention(qkv, qkv, qkv, jnp.ones((1, 1, 2, 2), bool), "cudnn")


@pytest.mark.parametrize("module", [SelfAttention, AttentionProjections])
def test_width_that_does_not_split_into_heads_is_a_clear_error(module):
    common = dict(qk_norm=False, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32)
    args = (10, 3) if module is SelfAttention else (10, 10, 3)
    extra = {"impl": "xla"} if module is SelfAttention else {}
    with pytest.raises(ValueError, match="width 10 is not divisible by num_heads 3"):
        module(*args, **common, **extra, rngs=nnx.Rngs(0))


def test_xla_models_never_import_the_cpu_kernel():
    """The fused_cpu kernel module (custom_partitioning objects built at import, C++ compiled
    on first call) loads only when attention_impl="fused_cpu" runs."""
    code = (
        "import sys, jax.numpy as jnp; from flax import nnx\n"
        "from navit_seq.models import navit, pix2seq, text, two_tower\n"
        "from navit_seq.models.attention import SelfAttention\n"
        "m = SelfAttention(8, 2, qk_norm=False, use_bias=False, impl='xla',"
        " dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))\n"
        "m(jnp.zeros((1, 4, 8)), jnp.ones((1, 4), jnp.int32))\n"
        "print('navit_seq.kernels.segment_attention' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
