"""The fused CPU segment-attention kernel (navit_seq/kernels) against XLA's masked attention and
a float64 numpy reference: outputs, gradients, every segment layout, padding, dtypes, sharding,
and the build's errors and cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from test_attention import numpy_masked_attention

from navit_seq.kernels import build
from navit_seq.kernels.segment_attention import segment_attention
from navit_seq.models.attention import masked_attention, segment_attend_mask

# Segment layouts, one per row: contiguous images with padding, one image over the whole row,
# all padding, scattered ids (the kernel groups by id, it never assumes contiguity), ids out of
# order, single-token images, negative ids (padding, as for segment_attend_mask).
LAYOUTS = {
    "packed": [1] * 9 + [2] * 17 + [3] * 5 + [0] * 9,
    "one_image": [1] * 40,
    "padding_only": [0] * 40,
    "scattered": ([1, 2, 0, 3, 2] * 8),
    "out_of_order": [3] * 12 + [1] * 20 + [2] * 8,
    "single_tokens": list(range(1, 41)),
    "negative_ids_are_padding": [1] * 15 + [-1] * 10 + [2] * 15,
}
SEGMENT_IDS = np.array(list(LAYOUTS.values()), np.int32)  # [7, 40]


def qkv(shape, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.normal(size=shape).astype(np.float32) for _ in range(3))


def xla_attention(query, key, value, segment_ids):
    return masked_attention(query, key, value, segment_attend_mask(segment_ids))


@pytest.mark.parametrize("heads, head_dim", [(2, 8), (3, 20), (1, 64)])
def test_forward_matches_float64_numpy_on_every_layout(heads, head_dim):
    query, key, value = qkv((len(SEGMENT_IDS), SEGMENT_IDS.shape[1], heads, head_dim))
    got = np.asarray(jax.jit(segment_attention)(query, key, value, SEGMENT_IDS))
    attend = np.asarray(segment_attend_mask(jnp.asarray(SEGMENT_IDS)))
    expected = numpy_masked_attention(query, key, value, attend)
    valid = SEGMENT_IDS > 0
    np.testing.assert_allclose(got[valid], expected[valid], rtol=1e-5, atol=1e-6)
    assert not got[~valid].any()  # padding queries: exact zeros


def test_gradients_match_xla_masked_attention():
    shape = (len(SEGMENT_IDS), SEGMENT_IDS.shape[1], 3, 20)
    query, key, value = qkv(shape, seed=1)
    # Cotangent on real tokens only, as every caller masks padding outputs.
    weights = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    weights *= (SEGMENT_IDS > 0)[..., None, None]

    def loss(attention):
        return lambda q, k, v: (attention(q, k, v, SEGMENT_IDS) * weights).sum()

    got = jax.jit(jax.grad(loss(segment_attention), argnums=(0, 1, 2)))(query, key, value)
    expected = jax.jit(jax.grad(loss(xla_attention), argnums=(0, 1, 2)))(query, key, value)
    for name, g, e in zip("qkv", got, expected, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-5, err_msg=name)
    padding = SEGMENT_IDS <= 0
    assert all(not np.asarray(g)[padding].any() for g in got)  # no gradient reaches padding


def test_gradients_match_central_differences_in_float64_terms():
    """A check independent of XLA: the directional derivative of a random projection of the
    output against (f(x + eps d) - f(x - eps d)) / 2 eps computed in float64 numpy."""
    segment_ids = SEGMENT_IDS[:1]  # the packed layout
    query, key, value = qkv((1, 40, 2, 8), seed=3)
    rng = np.random.default_rng(4)
    weights = rng.normal(size=query.shape) * (segment_ids > 0)[..., None, None]
    directions = [rng.normal(size=query.shape) for _ in range(3)]
    attend = np.asarray(segment_attend_mask(jnp.asarray(segment_ids)))
    f64 = lambda q, k, v: (numpy_masked_attention(q, k, v, attend) * weights).sum()
    loss = lambda q, k, v: (segment_attention(q, k, v, segment_ids) * weights).sum()
    grads = jax.grad(loss, argnums=(0, 1, 2))(query, key, value)
    eps = 1e-4
    for i, (grad, direction) in enumerate(zip(grads, directions, strict=True)):
        plus = [np.asarray(x, np.float64) for x in (query, key, value)]
        minus = [p.copy() for p in plus]
        plus[i] += eps * direction
        minus[i] -= eps * direction
        numeric = (f64(*plus) - f64(*minus)) / (2 * eps)
        analytic = float((np.asarray(grad, np.float64) * direction).sum())
        np.testing.assert_allclose(analytic, numeric, rtol=1e-4)


def test_benchmark_sized_rows_match_xla():
    """Rows of 256 tokens with head_dim 64, images of 20-169 tokens (the shared benchmark's)."""
    rng = np.random.default_rng(5)
    segment_ids = np.zeros((4, 256), np.int32)
    for row, sizes in enumerate([[169, 80], [56, 99, 30, 20], [256], [143]]):
        ends = np.cumsum(sizes)
        for e, (start, end) in enumerate(zip(ends - sizes, ends, strict=True)):
            segment_ids[row, start:end] = e + 1
    query, key, value = qkv((4, 256, 6, 64), seed=6)
    weights = rng.normal(size=query.shape).astype(np.float32) * (segment_ids > 0)[..., None, None]

    def value_and_grads(attention):
        loss = lambda q, k, v: (attention(q, k, v, segment_ids) * weights).sum()
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(query, key, value)

    (got_loss, got), (expected_loss, expected) = map(
        value_and_grads, (segment_attention, xla_attention)
    )
    np.testing.assert_allclose(got_loss, expected_loss, rtol=1e-5)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=2e-5)


def test_leading_dims_are_rows():
    query, key, value = qkv((2, 3, 40, 2, 8), seed=7)
    segment_ids = np.stack([SEGMENT_IDS[:3], SEGMENT_IDS[3:6]])  # [2, 3, 40]
    got = segment_attention(query, key, value, segment_ids)
    flat = lambda x: x.reshape(6, *x.shape[2:])
    expected = segment_attention(flat(query), flat(key), flat(value), flat(segment_ids))
    np.testing.assert_array_equal(np.asarray(got).reshape(expected.shape), np.asarray(expected))


def test_sharded_rows_and_heads_run_per_shard_and_match_unsharded():
    """Under a (data 4, tensor 2) mesh with rows over data and heads over tensor, each device
    runs the kernel on its shard (no all-gather in the compiled program), with the unsharded
    outputs and gradients."""
    segment_ids = np.concatenate([SEGMENT_IDS, SEGMENT_IDS[::-1]])[:8]  # 8 rows
    query, key, value = qkv((8, 40, 4, 16), seed=9)
    loss = lambda q, k, v: (segment_attention(q, k, v, segment_ids) ** 2).sum()
    value_and_grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    expected_loss, expected = value_and_grads(query, key, value)
    mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        tokens = NamedSharding(mesh, PartitionSpec("data", None, "tensor", None))
        sharded = [jax.device_put(x, tokens) for x in (query, key, value)]
        got_loss, got = value_and_grads(*sharded)
        compiled = value_and_grads.lower(*sharded).compile().as_text()
    assert "all-gather" not in compiled
    assert got[0].sharding.spec == tokens.spec
    np.testing.assert_allclose(got_loss, expected_loss, rtol=1e-5)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-6)


def test_bfloat16_inputs_are_computed_in_float32_and_returned_as_bfloat16():
    query, key, value = qkv((len(SEGMENT_IDS), 40, 2, 8), seed=8)
    bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (query, key, value)]
    got = segment_attention(*bf16, SEGMENT_IDS)
    assert got.dtype == jnp.bfloat16
    expected = xla_attention(*(x.astype(jnp.float32) for x in bf16), jnp.asarray(SEGMENT_IDS))
    valid = SEGMENT_IDS > 0
    np.testing.assert_allclose(
        np.asarray(got, np.float32)[valid], np.asarray(expected)[valid], atol=2e-2
    )


def test_mismatched_shapes_are_clear_errors():
    query, key, value = qkv((2, 40, 2, 8))
    with pytest.raises(ValueError, match="segment_ids"):
        segment_attention(query, key, value, SEGMENT_IDS)  # 6 rows for 2
    with pytest.raises(ValueError, match="self-attention"):
        segment_attention(query, key[:, :20], value[:, :20], SEGMENT_IDS[:2])


def test_missing_compiler_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("NAVIT_SEQ_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(build.KernelBuildError, match="attention_impl='xla'"):
        build.load_kernel.__wrapped__("segment_attention.cc")


def test_unwritable_cache_is_a_clear_error(monkeypatch, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("NAVIT_SEQ_KERNEL_CACHE", str(blocker / "kernels"))  # under a file
    with pytest.raises(build.KernelBuildError, match="NAVIT_SEQ_KERNEL_CACHE"):
        build.load_kernel.__wrapped__("segment_attention.cc")


def test_library_is_built_once_per_cache_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("NAVIT_SEQ_KERNEL_CACHE", str(tmp_path))
    build.load_kernel.__wrapped__("segment_attention.cc")
    (library,) = tmp_path.glob("segment_attention-*.so")
    built_at = library.stat().st_mtime_ns
    build.load_kernel.__wrapped__("segment_attention.cc")
    assert [library] == list(tmp_path.iterdir())
    assert library.stat().st_mtime_ns == built_at
