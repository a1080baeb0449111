"""Pix2Seq (NaViT encoder + decoder rows): cross-attention isolation between packed images,
packed rows vs each image encoded alone, gradients to both parts, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_navit import PATCH
from test_navit import pack as pack_images
from test_navit import random_images as navit_random_images

from navit_seq.models.pix2seq import Pix2Seq, default_pix2seq_config

SEQ_LEN, MAX_EXAMPLES, VOCAB, T = 24, 3, 40, 8
# Image grids of each packed row; row 1 has one image and padding.
PACKING = [[(2, 3), (3, 3), (2, 2)], [(3, 2)]]
# Decoder rows: (packed row, image slot); slot 0 of packed row 0 has two rows (two prompts).
ROW_SLOT = np.array([[0, 1, 2, 0], [0, -1, -1, -1]], np.int32)
ALONE_LEN = max(r * c for row in PACKING for r, c in row)


def tiny_config():
    config = default_pix2seq_config()
    config.update(dict(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=PATCH))
    config.posemb.max_len = 8
    config.decoder.update(
        dict(width=32, depth=2, num_heads=4, mlp_dim=64, vocab_size=VOCAB, max_len=16)
    )
    return config


def random_images(seed: int = 0) -> list[list[np.ndarray]]:
    return navit_random_images(seed, PACKING)


def pack(images, grids, row_slot, decoder_input, seq_len=SEQ_LEN, max_examples=MAX_EXAMPLES):
    """The encoder's packed batch (docs/architecture.md §3) + decoder rows (§9)."""
    return {
        **pack_images(images, grids, seq_len, max_examples),
        "row_slot": np.asarray(row_slot, np.int32),
        "decoder_input": np.asarray(decoder_input, np.int32),
    }


def decoder_input(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, VOCAB, ROW_SLOT.shape + (T,)).astype(np.int32)


@nnx.jit
def forward(model: Pix2Seq, batch):
    return model(batch, deterministic=True)["logits"]


@pytest.fixture(scope="module")
def model() -> Pix2Seq:
    return Pix2Seq(tiny_config(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def packed_logits(model):
    images, tokens = random_images(), decoder_input()
    return images, tokens, np.asarray(forward(model, pack(images, PACKING, ROW_SLOT, tokens)))


def test_changing_another_image_leaves_each_row_bit_identical(model, packed_logits):
    images, tokens, before = packed_logits
    changed = [list(row) for row in images]
    changed[0][1] = 255 - changed[0][1]  # slot 1 of packed row 0
    after = np.asarray(forward(model, pack(changed, PACKING, ROW_SLOT, tokens)))
    reads_changed = (np.arange(2)[:, None] == 0) & (ROW_SLOT == 1)  # [B, R]
    assert not np.allclose(before[reads_changed], after[reads_changed])
    np.testing.assert_array_equal(before[~reads_changed], after[~reads_changed])


def test_each_row_equals_its_image_encoded_alone(model, packed_logits):
    images, tokens, packed = packed_logits
    for b, r in zip(*np.nonzero(ROW_SLOT >= 0), strict=True):
        slot = ROW_SLOT[b, r]
        patches, grid = images[b][slot], PACKING[b][slot]
        # Alone in its own batch (one image, one row), padded to one shape for all images.
        alone = pack([[patches]], [[grid]], [[0]], tokens[b, r][None, None], ALONE_LEN, 1)
        np.testing.assert_allclose(
            packed[b, r], np.asarray(forward(model, alone))[0, 0], rtol=1e-4, atol=1e-5
        )


def test_padding_rows_are_zero_and_all_logits_finite(packed_logits):
    _, _, logits = packed_logits
    assert logits.shape == ROW_SLOT.shape + (T, VOCAB)
    assert np.isfinite(logits).all()
    assert not logits[ROW_SLOT < 0].any()


def test_token_loss_gradients_reach_encoder_and_decoder(model):
    batch = pack(random_images(), PACKING, ROW_SLOT, decoder_input())
    targets = decoder_input(seed=1)
    weights = (ROW_SLOT >= 0)[..., None].astype(np.float32)  # [B, R, 1]
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        logits = nnx.merge(graphdef, params, rest)(batch, deterministic=True)["logits"]
        per_token = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return (per_token * weights).sum() / weights.sum() / T

    grads = jax.jit(jax.grad(loss))(params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert np.abs(np.asarray(grads["encoder"]["patch_embed"]["kernel"][...])).sum() > 0
    assert np.abs(np.asarray(grads["decoder"]["token_embed"]["embedding"][...])).sum() > 0


def test_batch_without_decoder_rows_raises_naming_the_fix(model):
    batch = pack(random_images(), PACKING, ROW_SLOT, decoder_input())
    del batch["row_slot"]
    with pytest.raises(ValueError, match="row_slot"):
        model(batch, deterministic=True)
    config = tiny_config()
    del config["decoder"]
    with pytest.raises(ValueError, match="default_pix2seq_config"):
        Pix2Seq(config, rngs=nnx.Rngs(0))


@nnx.jit
def memory_of(model: Pix2Seq, batch):
    return model.encode(batch, deterministic=True)


def test_encoder_memory_is_the_encoder_tokens_and_projected_memory_knows_positions():
    batch = pack(random_images(), PACKING, ROW_SLOT, decoder_input())
    config = tiny_config()
    config.decoder.memory = "encoder"
    outputs = memory_of(Pix2Seq(config, rngs=nnx.Rngs(0)), batch)
    np.testing.assert_array_equal(outputs["memory"], outputs["tokens"])

    projected = Pix2Seq(tiny_config(), rngs=nnx.Rngs(0))  # default: "projected"
    memory = np.asarray(memory_of(projected, batch)["memory"])  # [B, L, D_dec]
    assert not memory[batch["segment_ids"] == 0].any()  # padding tokens stay zero
    # Identical encoder tokens everywhere: what differs between memory tokens is the memory's
    # own position embedding, in fractional coordinates (patch (0, 0) is 0 in every grid).
    constant = jnp.ones(memory.shape[:2] + (32,), jnp.float32)  # [B, L, D_enc]
    memory = np.asarray(projected.memory(constant, batch))
    segments, coords = batch["segment_ids"], batch["patch_coords"]
    first = (segments > 0) & (coords == 0).all(-1)  # [B, L]: patch (0, 0) of each image
    assert first.sum() == 4
    np.testing.assert_allclose(memory[first], np.broadcast_to(memory[first][0], (4, 32)),
                               atol=1e-5)  # fmt: skip
    image = segments[0] == 1
    assert np.ptp(memory[0, image], axis=0).max() > 0.1


def test_unknown_memory_kind_raises_naming_the_choices():
    config = tiny_config()
    config.decoder.memory = "pooled"
    with pytest.raises(ValueError, match=r"model.decoder.memory='pooled'.*encoder.*projected"):
        Pix2Seq(config, rngs=nnx.Rngs(0))
