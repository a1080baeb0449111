"""Pix2Seq decoder: row-to-image cross-attention mask, causality, KV cache vs teacher forcing,
padding rows, presets, tied/untied output, logical axis names, sharded forward."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from navit_seq.models.attention import masked_attention
from navit_seq.models.decoder import (
    PRESETS,
    Decoder,
    decoder_sizes,
    default_decoder_config,
    row_image_mask,
)

ENCODER_WIDTH, VOCAB, MAX_LEN, T = 24, 40, 16, 10
# Two packed rows of 12 encoder tokens: row 0 holds images 1, 2; row 1 image 1 and padding.
SEGMENT_IDS = np.array([[1] * 5 + [2] * 5 + [0] * 2, [1] * 7 + [0] * 5], np.int32)
# Rows 0 and 2 of packed row 0 read the same image; rows of slot -1 are padding.
ROW_SLOT = np.array([[0, 1, 0], [0, -1, -1]], np.int32)


def tiny_config(**overrides):
    config = default_decoder_config()
    config.update(dict(width=32, depth=2, num_heads=4, mlp_dim=64, vocab_size=VOCAB))
    config.update(dict(max_len=MAX_LEN, **overrides))
    return config


def inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [2, 3, T], encoder tokens [2, 12, ENCODER_WIDTH], zero at padding)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, ROW_SLOT.shape + (T,)).astype(np.int32)
    encoded = rng.normal(size=SEGMENT_IDS.shape + (ENCODER_WIDTH,)).astype(np.float32)
    return tokens, encoded * (SEGMENT_IDS > 0)[..., None]


@nnx.jit
def forward(decoder: Decoder, tokens, encoded, segment_ids, row_slot):
    return decoder(tokens, encoded, segment_ids, row_slot, deterministic=True)


@nnx.jit
def extend(decoder: Decoder, tokens, start, encoded, segment_ids, row_slot, cache):
    cross_kv = decoder.cross_keys_values(encoded)
    return decoder.extend(tokens, start, cross_kv, row_image_mask(segment_ids, row_slot), cache)


@pytest.fixture(scope="module")
def decoder() -> Decoder:
    return Decoder(tiny_config(), ENCODER_WIDTH, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def reference_logits(decoder):
    tokens, encoded = inputs()
    return np.asarray(forward(decoder, tokens, encoded, SEGMENT_IDS, ROW_SLOT))


def test_row_image_mask_reads_only_its_slot_and_padding_rows_read_nothing():
    mask = np.asarray(row_image_mask(SEGMENT_IDS, ROW_SLOT))
    expected = np.zeros(ROW_SLOT.shape + SEGMENT_IDS.shape[1:], bool)
    for b, r in np.ndindex(*ROW_SLOT.shape):
        for token, segment in enumerate(SEGMENT_IDS[b]):
            expected[b, r, token] = ROW_SLOT[b, r] >= 0 and segment == ROW_SLOT[b, r] + 1
    np.testing.assert_array_equal(mask, expected)
    assert not mask[1, 1:].any()  # slot -1 must not match the padding tokens (segment 0)


def test_future_tokens_do_not_change_earlier_logits(decoder, reference_logits):
    tokens, encoded = inputs()
    changed = tokens.copy()
    changed[:, :, 6:] = (changed[:, :, 6:] + 7) % VOCAB
    logits = np.asarray(forward(decoder, changed, encoded, SEGMENT_IDS, ROW_SLOT))
    np.testing.assert_allclose(logits[:, :, :6], reference_logits[:, :, :6], rtol=1e-6, atol=1e-6)
    assert not np.allclose(logits[0, :, 6:], reference_logits[0, :, 6:])


def test_cached_extension_one_token_at_a_time_equals_teacher_forcing(decoder, reference_logits):
    tokens, encoded = inputs()
    cache = decoder.init_cache(tokens.shape[0] * tokens.shape[1], MAX_LEN)
    prefill = 3
    logits, cache = extend(
        decoder, tokens[:, :, :prefill], 0, encoded, SEGMENT_IDS, ROW_SLOT, cache
    )
    pieces = [np.asarray(logits)]
    for position in range(prefill, T):
        logits, cache = extend(
            decoder, tokens[:, :, position : position + 1], position, encoded, SEGMENT_IDS,
            ROW_SLOT, cache,
        )  # fmt: skip
        pieces.append(np.asarray(logits))
    np.testing.assert_allclose(
        np.concatenate(pieces, axis=2), reference_logits, rtol=1e-5, atol=1e-5
    )


def test_rows_reading_the_same_image_with_the_same_tokens_agree(decoder):
    tokens, encoded = inputs()
    tokens[0, 2] = tokens[0, 0]
    logits = np.asarray(forward(decoder, tokens, encoded, SEGMENT_IDS, ROW_SLOT))
    np.testing.assert_array_equal(logits[0, 0], logits[0, 2])
    assert not np.allclose(logits[0, 0], logits[0, 1])  # another image, other logits


def test_padding_rows_have_zero_logits_and_every_gradient_is_finite(decoder, reference_logits):
    assert np.isfinite(reference_logits).all()
    assert not reference_logits[ROW_SLOT < 0].any()
    assert np.abs(reference_logits[ROW_SLOT >= 0]).min(axis=-1).max() > 0
    tokens, encoded = inputs()
    graphdef, params, rest = nnx.split(decoder, nnx.Param, ...)

    def loss(params, encoded):
        decoder = nnx.merge(graphdef, params, rest)
        logits = decoder(tokens, encoded, SEGMENT_IDS, ROW_SLOT, deterministic=True)
        return (jax.nn.log_softmax(logits) ** 2).sum()

    param_grads, encoded_grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, encoded)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(param_grads))
    assert np.isfinite(encoded_grads).all()
    assert not np.asarray(encoded_grads)[SEGMENT_IDS == 0].any()  # padding tokens are unread


def test_untied_output_adds_exactly_one_vocabulary_projection():
    count = lambda config: sum(
        x.size
        for x in jax.tree.leaves(
            nnx.state(nnx.eval_shape(lambda: Decoder(config, 48, rngs=nnx.Rngs(0))), nnx.Param)
        )
    )
    tied, untied = count(tiny_config()), count(tiny_config(tie_embeddings=False))
    assert untied - tied == 32 * VOCAB  # the projection's bias replaces the tied output bias
    assert tied - count(tiny_config(output_bias=False)) == VOCAB


def test_paper_decoder_preset_and_parameter_count_formula():
    """ "S" = Pix2Seq v2's decoder; counted: embeddings, per block self- and cross-attention
    (with biases), MLP, three LayerNorms; final LayerNorm; tied output."""
    assert PRESETS["S"] == {"width": 512, "depth": 6, "num_heads": 8, "mlp_dim": 2048}
    config = default_decoder_config()
    config.vocab_size = 3000
    d, m, depth = (decoder_sizes(config)[k] for k in ("width", "mlp_dim", "depth"))
    encoder_width = 768
    attention = lambda source: d * d + d + 2 * (source * d + d) + d * d + d
    per_block = attention(d) + attention(encoder_width) + 2 * d * m + m + d + 3 * 2 * d
    expected = 3000 * d + config.max_len * d + depth * per_block + 2 * d + 3000
    abstract = nnx.eval_shape(lambda: Decoder(config, encoder_width, rngs=nnx.Rngs(0)))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == expected


ALLOWED_NAMES = {"embed", "mlp", "heads", "head_dim", "vocab", "posemb_len", None}


def test_every_parameter_has_one_logical_axis_name_per_dimension(decoder):
    for path, variable in nnx.to_flat_state(nnx.state(decoder, nnx.Param)):
        names = variable.get_metadata()["out_sharding"]
        assert len(names) == variable[...].ndim, path
        assert set(names) <= ALLOWED_NAMES, path


def test_forward_under_a_sharded_mesh_matches_unsharded(decoder, reference_logits):
    tokens, encoded = inputs()
    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
    rules = (
        ("act_batch", "data"), ("mlp", "tensor"), ("heads", "tensor"), ("vocab", "tensor"),
        ("act_mlp", "tensor"), ("act_heads", "tensor"),
        *((name, None) for name in ("embed", "head_dim", "posemb_len")),
    )  # fmt: skip
    graphdef, state = nnx.split(decoder)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        state = jax.device_put(state, nnx.get_named_sharding(state, mesh))
        apply = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a, deterministic=True))
        sharded = apply(state, tokens, encoded, SEGMENT_IDS, ROW_SLOT)
        assert state["token_embed"]["embedding"][...].sharding.spec[0] == "tensor"
    np.testing.assert_allclose(sharded, reference_logits, rtol=1e-5, atol=1e-6)


def test_bad_configs_and_rows_longer_than_max_len_raise_naming_the_fix(decoder):
    with pytest.raises(ValueError, match="vocab_size"):
        Decoder(tiny_config(vocab_size=None), ENCODER_WIDTH, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="variant"):
        Decoder(tiny_config(variant="XL"), ENCODER_WIDTH, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="divisible"):
        Decoder(tiny_config(num_heads=5), ENCODER_WIDTH, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="'fused_cpu' is the encoders'"):
        Decoder(tiny_config(attention_impl="fused_cpu"), ENCODER_WIDTH, rngs=nnx.Rngs(0))
    tokens, encoded = inputs()
    too_long = np.zeros((2, 3, MAX_LEN + 1), np.int32)
    with pytest.raises(ValueError, match="max_len"):
        decoder(too_long, encoded, SEGMENT_IDS, ROW_SLOT, deterministic=True)


def test_bfloat16_activations_run_and_stay_close_to_float32(reference_logits):
    tokens, encoded = inputs()
    decoder = Decoder(tiny_config(dtype="bfloat16"), ENCODER_WIDTH, rngs=nnx.Rngs(0))
    logits = forward(decoder, tokens, encoded, SEGMENT_IDS, ROW_SLOT)
    assert logits.dtype == np.float32  # logits always leave in float32 for the loss
    np.testing.assert_allclose(np.asarray(logits), reference_logits, atol=0.05)


def test_sinusoidal_coordinate_init_sets_only_the_coordinate_rows():
    """Coordinate rows start as the (float64 numpy) sinusoidal embedding of their bin, centred
    over the bins: similar for neighbours, near orthogonal far apart; other rows stay N(0, .02)."""
    num_bins, offset, width, vocab = 64, 20, 32, 100
    config = tiny_config(
        coord_embedding_init="sinusoidal", coord_offset=offset, num_bins=num_bins, vocab_size=vocab
    )
    table = np.asarray(Decoder(config, ENCODER_WIDTH, rngs=nnx.Rngs(0)).token_embed.embedding[...])
    plain = np.asarray(
        Decoder(
            tiny_config(vocab_size=vocab), ENCODER_WIDTH, rngs=nnx.Rngs(0)
        ).token_embed.embedding[...]
    )
    outside = np.r_[0:offset, offset + num_bins : vocab]
    np.testing.assert_array_equal(table[outside], plain[outside])
    # Reference: phi_row + phi_col at fraction k / (num_bins - 1) of the memory's frame (64).
    position = np.arange(num_bins) / (num_bins - 1) * 64.0
    half = width // 2
    rows = 0.0
    for axis in (0, 1):
        angles = position[:, None] / 10_000 ** ((np.arange(half) + 0.5 * axis) / half)
        rows = rows + np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    rows = rows - rows.mean(axis=0)
    rows = 0.02 * rows / rows.std(axis=1, keepdims=True)
    np.testing.assert_allclose(table[offset : offset + num_bins], rows, atol=1e-5)
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    similarity = unit @ unit.T
    assert similarity[30, 31] > 0.8 and np.abs(similarity[30, [0, 10, 50, 63]]).max() < 0.5


def test_sinusoidal_coordinate_init_without_the_vocabulary_range_is_refused():
    with pytest.raises(ValueError, match="coord_offset"):
        Decoder(tiny_config(coord_embedding_init="sinusoidal"), ENCODER_WIDTH, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="coord_embedding_init='fourier'"):
        Decoder(tiny_config(coord_embedding_init="fourier"), ENCODER_WIDTH, rngs=nnx.Rngs(0))


def test_copy_init_makes_cross_attention_return_the_mean_of_its_images_memory():
    """cross_attention_init='copy': value then output is the identity, so with the queries
    zeroed (uniform attention) a row's cross-attention output is its image's mean memory."""
    width = 24
    decoder = Decoder(tiny_config(width=width, cross_attention_init="copy"), width,
                      rngs=nnx.Rngs(0))  # fmt: skip
    _, encoded = inputs()
    for block in decoder.blocks:
        attention = block.cross_attention
        value = np.asarray(attention.kv_kernel[...])[:, 1].reshape(width, width)
        output = np.asarray(attention.out_kernel[...]).reshape(width, width)
        np.testing.assert_allclose(value @ output, np.eye(width), atol=1e-5)
        attention.query_kernel[...] = np.zeros_like(attention.query_kernel[...])
        if attention.query_bias is not None:
            attention.query_bias[...] = np.zeros_like(attention.query_bias[...])
        key, value_tokens = attention.keys_values(encoded)  # [B, L, H, Dh]
        bias = 0 if attention.out_bias is None else np.asarray(attention.out_bias[...])
        for b, r in [(0, 0), (0, 1), (1, 0)]:
            mask = SEGMENT_IDS[b] == ROW_SLOT[b, r] + 1
            query = np.zeros((1, 1, *key.shape[2:]), np.float32)
            mixed = masked_attention(query, key[b : b + 1], value_tokens[b : b + 1],
                                     mask[None, None, None])  # fmt: skip
            got = np.asarray(attention.output(mixed))[0, 0]
            value_bias = 0
            if attention.kv_bias is not None:
                value_bias = np.asarray(attention.kv_bias[...])[1].reshape(-1) @ output
            want = encoded[b, mask].mean(0) + value_bias + bias
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_copy_init_needs_a_memory_as_wide_as_the_decoder():
    with pytest.raises(ValueError, match="cross_attention_init='copy' needs a memory"):
        Decoder(tiny_config(cross_attention_init="copy"), ENCODER_WIDTH, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="cross_attention_init='eye'"):
        Decoder(tiny_config(cross_attention_init="eye"), ENCODER_WIDTH, rngs=nnx.Rngs(0))
