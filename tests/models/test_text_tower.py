"""Text tower: packed-vs-alone invariance for captions, isolation, NaN-free padding, positions
restarting per caption, clear errors for ids or lengths past the tables; the model-level tests
run with both segment-attention implementations ("xla", "fused_cpu")."""

import jax
import numpy as np
import pytest
from flax import nnx
from test_navit import jitted_forward

from navit_seq.models.attention import segment_attend_mask
from navit_seq.models.text import TextTower, caption_positions, default_text_config

VOCAB, MAX_LEN = 50, 12
SEQ_LEN, MAX_EXAMPLES = 20, 3
# Caption lengths per row; row 2 is all padding.
PACKING = [[5, 3, 7], [4], []]


def tiny_text_config(**overrides):
    config = default_text_config()
    config.update(dict(width=32, depth=2, num_heads=4, mlp_dim=64, vocab_size=VOCAB))
    config.max_len = MAX_LEN
    config.update(overrides)
    return config


def random_captions(seed: int = 0) -> list[list[np.ndarray]]:
    """Token ids [n] in [1, VOCAB) (never PAD) for every caption of PACKING."""
    rng = np.random.default_rng(seed)
    return [[rng.integers(1, VOCAB, n).astype(np.int32) for n in row] for row in PACKING]


def pack_captions(captions, seq_len: int, max_examples: int) -> dict[str, np.ndarray]:
    """Packs captions back to back, caption e of a row under segment id e + 1 (by hand)."""
    batch = {
        "text_tokens": np.zeros((len(captions), seq_len), np.int32),
        "text_segment_ids": np.zeros((len(captions), seq_len), np.int32),
        "example_valid": np.zeros((len(captions), max_examples), bool),
    }
    for b, row in enumerate(captions):
        start = 0
        for e, tokens in enumerate(row):
            batch["text_tokens"][b, start : start + len(tokens)] = tokens
            batch["text_segment_ids"][b, start : start + len(tokens)] = e + 1
            batch["example_valid"][b, e] = True
            start += len(tokens)
    return batch


def caption_slices(row: int) -> list[slice]:
    starts = np.cumsum([0, *PACKING[row]])
    return [slice(a, b) for a, b in zip(starts[:-1], starts[1:], strict=True)]


@pytest.fixture(scope="module", params=["xla", "fused_cpu"])
def model(request) -> TextTower:
    """The tiny tower with each segment-attention implementation (the model-level tests run on
    both)."""
    return TextTower(tiny_text_config(attention_impl=request.param), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def forward(model):
    """Jitted deterministic forward shared by the tests."""
    return jitted_forward(model)


@pytest.fixture(scope="module")
def packed_outputs(forward):
    captions = random_captions()
    return captions, forward(pack_captions(captions, SEQ_LEN, MAX_EXAMPLES))


def test_packed_captions_match_each_caption_run_alone(forward, packed_outputs):
    captions, packed = packed_outputs
    for row, row_captions in enumerate(captions):
        for e, (tokens, where) in enumerate(zip(row_captions, caption_slices(row), strict=True)):
            alone = forward(pack_captions([[tokens]], MAX_LEN, 1))
            np.testing.assert_allclose(
                packed["tokens"][row, where], alone["tokens"][0, : len(tokens)], rtol=1e-4,
                atol=1e-5,
            )  # fmt: skip
            np.testing.assert_allclose(
                packed["pooled"][row, e], alone["pooled"][0, 0], rtol=1e-4, atol=1e-5
            )


def test_changing_one_caption_leaves_every_other_output_bit_identical(forward, packed_outputs):
    captions, before = packed_outputs
    changed = [list(row) for row in captions]
    changed[0][1] = VOCAB - changed[0][1]  # the middle caption of row 0, ids stay in [1, VOCAB)
    after = forward(pack_captions(changed, SEQ_LEN, MAX_EXAMPLES))
    middle = caption_slices(0)[1]
    assert not np.array_equal(before["tokens"][0, middle], after["tokens"][0, middle])
    others = np.ones((len(PACKING), SEQ_LEN), bool)
    others[0, middle] = False
    np.testing.assert_array_equal(before["tokens"][others], after["tokens"][others])
    slots = np.ones((len(PACKING), MAX_EXAMPLES), bool)
    slots[0, 1] = False
    np.testing.assert_array_equal(before["pooled"][slots], after["pooled"][slots])


def test_padding_tokens_and_empty_slots_are_zero_finite_and_invalid(packed_outputs):
    captions, outputs = packed_outputs
    batch = pack_captions(captions, SEQ_LEN, MAX_EXAMPLES)
    padding = batch["text_segment_ids"] == 0
    assert padding[2].all()
    assert all(np.isfinite(v).all() for v in outputs.values())
    assert not outputs["tokens"][padding].any()
    np.testing.assert_array_equal(outputs["pooled_valid"], batch["example_valid"])
    assert not outputs["pooled"][~batch["example_valid"]].any()


def test_valid_example_without_caption_tokens_is_text_invalid(forward):
    batch = pack_captions(random_captions(), SEQ_LEN, MAX_EXAMPLES)
    batch["example_valid"][1, 1] = True  # slot 1 of row 1 has no caption tokens
    outputs = forward(batch)
    assert not outputs["pooled_valid"][1, 1] and outputs["pooled_valid"][1, 0]
    assert not outputs["pooled"][1, 1].any()


def test_gradients_are_finite_with_padding_rows_and_empty_slots(model):
    batch = pack_captions(random_captions(), SEQ_LEN, MAX_EXAMPLES)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        outputs = nnx.merge(graphdef, params, rest)(batch, deterministic=True)
        return (outputs["pooled"] ** 2).sum() + (outputs["tokens"] ** 2).sum()

    leaves = jax.tree.leaves(jax.jit(jax.grad(loss))(params))
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert all(np.abs(np.asarray(g)).sum() > 0 for g in leaves)


def test_positions_count_earlier_tokens_of_the_same_caption_in_any_layout():
    # Segments need not be contiguous: segment 1 resumes after segment 2.
    segment_ids = np.array([[1, 1, 2, 2, 2, 1, 0, 3], [0, 0, 0, 0, 0, 0, 0, 0]], np.int32)
    expected = np.zeros_like(segment_ids)
    for b, row in enumerate(segment_ids):
        for q, segment in enumerate(row):
            expected[b, q] = sum(row[k] == segment for k in range(q)) if segment else 0
    positions = caption_positions(segment_attend_mask(segment_ids))
    np.testing.assert_array_equal(positions, expected)
    np.testing.assert_array_equal(expected[0], [0, 1, 0, 1, 2, 2, 0, 0])


def test_token_id_past_the_vocabulary_raises_naming_the_fix(model):
    batch = pack_captions([[np.array([3, VOCAB], np.int32)]], 4, 1)
    with pytest.raises(ValueError, match=r"holds id 50 .*model.text.vocab_size"):
        model(batch, deterministic=True)


def test_caption_longer_than_the_position_table_raises_naming_the_fix(model):
    batch = pack_captions([[np.ones(MAX_LEN + 1, np.int32)]], MAX_LEN + 1, 1)
    with pytest.raises(ValueError, match=r"position 12 .*model.text.max_len"):
        model(batch, deterministic=True)


def test_missing_vocab_size_raises_naming_the_fix():
    with pytest.raises(ValueError, match="model.text.vocab_size=None; set it"):
        TextTower(tiny_text_config(vocab_size=None), rngs=nnx.Rngs(0))


def test_mean_pooling_is_the_average_of_each_captions_tokens():
    model = TextTower(tiny_text_config(pooling="mean"), rngs=nnx.Rngs(0))
    batch = pack_captions(random_captions(), SEQ_LEN, MAX_EXAMPLES)
    outputs = jax.jit(lambda b: model(b, deterministic=True))(batch)
    for e, where in enumerate(caption_slices(0)):
        np.testing.assert_allclose(
            outputs["pooled"][0, e], np.asarray(outputs["tokens"][0, where]).mean(0), rtol=1e-5,
            atol=1e-6,
        )  # fmt: skip


ALLOWED_NAMES = {"embed", "mlp", "heads", "head_dim", "vocab", "posemb_len", None}


def test_every_parameter_has_one_logical_axis_name_per_dimension(model):
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = variable.get_metadata()["out_sharding"]
        assert len(names) == variable[...].ndim, path
        assert set(names) <= ALLOWED_NAMES, path
