"""Positional embeddings: every variant at unseen resolutions, formulas, out-of-range policy."""

import itertools

import jax
import numpy as np
import pytest
from flax import nnx

from navit_seq.models.posemb import (
    COMBINES,
    COORDS,
    EMBEDDINGS,
    PositionalEmbedding,
    default_posemb_config,
)

WIDTH = 16
MAX_LEN = 8
FACTORIZED = [
    {"kind": "factorized", "embedding": e, "coords": c, "combine": m}
    for e, c, m in itertools.product(EMBEDDINGS, COORDS, COMBINES)
]
VARIANTS = FACTORIZED + [{"kind": "learned_1d"}, {"kind": "learned_2d"}]


def make(seed: int = 0, **options) -> PositionalEmbedding:
    config = default_posemb_config()
    config.max_len = MAX_LEN
    config.update(options)
    return PositionalEmbedding(config, WIDTH, rngs=nnx.Rngs(seed))


def grid_inputs(rows: int, cols: int):
    """One image filling one row: patch_coords [1, N, 2], segment_ids [1, N], image_grid."""
    coords = np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"), -1)
    coords = coords.reshape(1, rows * cols, 2).astype(np.int32)
    return coords, np.ones((1, rows * cols), np.int32), np.array([[[rows, cols]]], np.int32)


@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: "-".join(o.values()))
def test_variant_embeds_every_position_of_an_unseen_resolution_distinctly(options):
    module = make(**options)
    # "Training" would use 4x4; 7x5 is a resolution and aspect ratio never seen (within max_len).
    embedding = np.asarray(module(*grid_inputs(7, 5)))  # [1, 35, D]
    assert embedding.shape == (1, 35, WIDTH)
    assert np.isfinite(embedding).all()
    if options.get("coords") == "fractional" and options.get("embedding") == "learned":
        return  # fractional tables bin positions: neighbours can share a bin by design
    distinct_rows = np.unique(embedding[0].round(6), axis=0)
    assert len(distinct_rows) == 35


@pytest.mark.parametrize("embedding", EMBEDDINGS)
def test_fractional_coordinates_give_same_embedding_at_same_relative_position(embedding):
    module = make(embedding=embedding, coords="fractional")
    small = np.asarray(module(*grid_inputs(4, 4)))[0].reshape(4, 4, WIDTH)
    large = np.asarray(module(*grid_inputs(8, 8)))[0].reshape(8, 8, WIDTH)
    np.testing.assert_allclose(small, large[::2, ::2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("embedding", ("sinusoidal", "fourier"))
def test_sinusoidal_and_initial_fourier_match_numpy_formula_far_beyond_max_len(embedding):
    module = make(embedding=embedding, combine="sum")
    rows, cols = 3, 2 * MAX_LEN + 5  # wider than any learned table: no limit for these
    got = np.asarray(module(*grid_inputs(rows, cols)))[0]
    half = WIDTH // 2

    def phi(position, axis):  # column frequencies sit half-way between the row ones
        angles = np.float64(position) / 10_000 ** ((np.arange(half) + 0.5 * axis) / half)
        return np.concatenate([np.sin(angles), np.cos(angles)])

    expected = np.stack([phi(r, 0) + phi(c, 1) for r in range(rows) for c in range(cols)])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("combine", COMBINES)
def test_learned_factorized_combines_row_and_column_tables(combine):
    module = make(combine=combine)
    got = np.asarray(module(*grid_inputs(3, 4)))[0]
    row_table, col_table = np.asarray(module.row_table[...]), np.asarray(module.col_table[...])
    combined = {
        "sum": lambda r, c: row_table[r] + col_table[c],
        "product": lambda r, c: row_table[r] * col_table[c],
        "stack": lambda r, c: np.concatenate([row_table[r], col_table[c]]),
    }[combine]
    expected = np.stack([combined(r, c) for r in range(3) for c in range(4)])
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_learned_1d_indexes_flattened_position_and_learned_2d_the_pair():
    coords, segments, grid = grid_inputs(3, 5)
    one_d, two_d = make(kind="learned_1d"), make(kind="learned_2d")
    flat = [r * 5 + c for r in range(3) for c in range(5)]
    np.testing.assert_array_equal(
        np.asarray(one_d(coords, segments, grid))[0], np.asarray(one_d.table[...])[flat]
    )
    pairs = coords[0]
    np.testing.assert_array_equal(
        np.asarray(two_d(coords, segments, grid))[0],
        np.asarray(two_d.table[...])[pairs[:, 0], pairs[:, 1]],
    )


@pytest.mark.parametrize("kind", ("factorized", "learned_1d", "learned_2d"))
def test_absolute_position_past_learned_table_raises_clear_error(kind):
    module = make(kind=kind)
    with pytest.raises(ValueError, match="model.posemb.max_len"):
        module(*grid_inputs(MAX_LEN + 1, MAX_LEN))  # 72 patches > 64 table entries too


def test_absolute_position_past_learned_table_raises_under_jit():
    graphdef, state = nnx.split(make())
    forward = jax.jit(lambda s, *inputs: nnx.merge(graphdef, s)(*inputs))
    forward(state, *grid_inputs(MAX_LEN, 2)).block_until_ready()  # the largest allowed grid
    with pytest.raises(Exception, match="model.posemb.max_len"):
        forward(state, *grid_inputs(MAX_LEN + 3, 2)).block_until_ready()


def test_clamp_policy_reuses_last_table_row_for_larger_images():
    module = make(out_of_range="clamp")
    got = np.asarray(module(*grid_inputs(MAX_LEN + 3, 1)))[0]  # rows 0..10, col 0
    row_table, col_table = np.asarray(module.row_table[...]), np.asarray(module.col_table[...])
    rows = np.minimum(np.arange(MAX_LEN + 3), MAX_LEN - 1)
    np.testing.assert_allclose(got, row_table[rows] + col_table[0], rtol=1e-6)


def test_padding_tokens_of_an_all_padding_row_are_finite():
    module = make(embedding="sinusoidal", coords="fractional")
    coords = np.zeros((1, 4, 2), np.int32)
    embedding = module(coords, np.zeros((1, 4), np.int32), np.zeros((1, 2, 2), np.int32))
    assert np.isfinite(np.asarray(embedding)).all()


def test_unknown_option_raises_naming_the_field():
    with pytest.raises(ValueError, match="model.posemb.embedding='rope'"):
        make(embedding="rope")
