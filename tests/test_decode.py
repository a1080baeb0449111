"""Decoding: cached == recomputed greedy, greedy == argmax of teacher-forced logits, early stop
changes nothing, samplers vs a numpy reference, constraints, beam search."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from navit_seq.decode import DecodeConfig, cyclic_token_mask, filter_logits, generate
from navit_seq.models.pix2seq import Pix2Seq, default_pix2seq_config

VOCAB, MAX_LEN, END = 40, 12, 0
PATCH_DIM = 2 * 2 * 3
# Two packed rows of 16 tokens: row 0 holds two 2x3 images, row 1 one 3x3 image + padding.
SEGMENT_IDS = np.array([[1] * 6 + [2] * 6 + [0] * 4, [1] * 9 + [0] * 7], np.int32)
GRIDS = np.array([[[2, 3], [2, 3]], [[3, 3], [0, 0]]], np.int32)
ROW_SLOT = np.array([[0, 1, 0], [0, -1, -1]], np.int32)
PROMPT = np.array([[[3], [5], [7]], [[4], [1], [1]]], np.int32)  # [B, R, P = 1]
GREEDY = DecodeConfig(max_len=MAX_LEN)
SAMPLE = DecodeConfig(max_len=MAX_LEN, method="sample", temperature=2.0)
BEAM = DecodeConfig(max_len=MAX_LEN, method="beam", beam_size=4)


def packed_batch(row_slot=ROW_SLOT) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    coords = np.zeros(SEGMENT_IDS.shape + (2,), np.int32)
    for b, row in enumerate(SEGMENT_IDS):
        for e, (rows, cols) in enumerate(GRIDS[b]):
            grid = np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"), -1)
            coords[b, row == e + 1] = grid.reshape(-1, 2)
    return {
        "patches": rng.integers(0, 256, SEGMENT_IDS.shape + (PATCH_DIM,), dtype=np.uint8),
        "segment_ids": SEGMENT_IDS,
        "patch_coords": coords,
        "image_grid": GRIDS,
        "example_valid": GRIDS[..., 0] > 0,
        "row_slot": np.asarray(row_slot, np.int32),
    }


@pytest.fixture(scope="module")
def model() -> Pix2Seq:
    config = default_pix2seq_config()
    config.update(dict(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=2))
    config.posemb.max_len = 8
    config.decoder.update(
        dict(width=32, depth=1, num_heads=4, mlp_dim=64, vocab_size=VOCAB, max_len=16)
    )  # one layer compiles faster; tests/models/test_decoder.py checks the cache over two
    return Pix2Seq(config, rngs=nnx.Rngs(0))


@nnx.jit
def teacher_forced_log_probs(model: Pix2Seq, batch):
    return jax.nn.log_softmax(model(batch, deterministic=True)["logits"])


def decode(model, config, token_mask=None, rng=0, batch=None, prompt=PROMPT):
    batch = packed_batch() if batch is None else batch
    out = generate(model, batch, prompt, jax.random.key(rng), config, token_mask)
    return {k: np.asarray(v) for k, v in out.items()}


def rescore(model, prompt, tokens):
    """Teacher-forced log-probs [B, R, max_len] of `tokens` after `prompt` (full recomputation)."""
    batch = packed_batch()
    batch["decoder_input"] = np.concatenate([prompt, tokens[:, :, :-1]], axis=2)
    log_probs = np.asarray(teacher_forced_log_probs(model, batch))[:, :, prompt.shape[-1] - 1 :]
    return np.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]


def after_first_end(tokens: np.ndarray) -> np.ndarray:
    """True for the positions after each row's first END."""
    return np.cumsum(tokens == END, axis=-1) - (tokens == END) > 0


@pytest.fixture(scope="module")
def greedy(model):
    return decode(model, GREEDY)


def test_cached_greedy_equals_recomputed_greedy_token_for_token(model, greedy):
    recomputed = decode(model, DecodeConfig(max_len=MAX_LEN, use_cache=False))
    np.testing.assert_array_equal(greedy["tokens"], recomputed["tokens"])
    np.testing.assert_allclose(greedy["token_log_probs"], recomputed["token_log_probs"], atol=1e-5)


def test_greedy_picks_the_argmax_of_teacher_forced_logits(model, greedy):
    tokens = greedy["tokens"]
    batch = packed_batch()
    batch["decoder_input"] = np.concatenate([PROMPT, tokens[:, :, :-1]], axis=2)
    log_probs = np.asarray(teacher_forced_log_probs(model, batch))  # [B, R, max_len, V]
    live = (ROW_SLOT >= 0)[..., None] & ~after_first_end(tokens)
    assert live.sum() > 2 * MAX_LEN
    np.testing.assert_array_equal(log_probs.argmax(-1)[live], tokens[live])
    expected = np.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(greedy["token_log_probs"][live], expected[live], atol=1e-5)
    assert not greedy["token_log_probs"][~live].any()


def test_padding_rows_produce_only_end_and_are_finished(greedy):
    padding = ROW_SLOT < 0
    assert not greedy["tokens"][padding].any()
    assert greedy["finished"][padding].all()
    assert (greedy["score"][padding] == 0).all()


def stop_at_prompt_value(tokens: jax.Array, position: jax.Array) -> jax.Array:
    """Row r must end exactly at step tokens[r, 0] (its prompt token): before it END is
    forbidden, from it only END is allowed. Rows end at different steps."""
    stop_now = position - 1 >= tokens[:, :, :1]  # [B, R, 1]
    is_end = jnp.arange(VOCAB) == END  # [V]
    return jnp.where(stop_now, is_end, ~is_end)  # [B, R, V]


@pytest.mark.parametrize("method", ["greedy", "sample", "beam"])
def test_early_stop_gives_the_same_tokens_as_full_length_decoding(model, method):
    early = {"greedy": GREEDY, "sample": SAMPLE, "beam": BEAM}[method]
    full = dataclasses.replace(early, early_stop=False)
    stopped = decode(model, early, stop_at_prompt_value, rng=3)
    complete = decode(model, full, stop_at_prompt_value, rng=3)
    for key in ("tokens", "token_log_probs", "score", "finished"):
        np.testing.assert_array_equal(stopped[key], complete[key], err_msg=key)
    # Every real row ended at its prompt's step, so the early loop ran only until the last.
    ends = np.argmax(stopped["tokens"] == END, axis=-1)
    np.testing.assert_array_equal(ends[ROW_SLOT >= 0], PROMPT[..., 0][ROW_SLOT >= 0])
    assert stopped["num_steps"] == PROMPT[ROW_SLOT >= 0].max() + 1 < complete["num_steps"]
    assert complete["num_steps"] == MAX_LEN


def numpy_filtered_probs(logits, temperature, top_k, top_p):
    """float64 reference: softmax(logits / T) restricted to the top k, then to the nucleus."""
    scaled = np.asarray(logits, np.float64) / temperature
    order = np.argsort(-scaled, kind="stable")
    keep = np.zeros(scaled.shape, bool)
    kept_k = order[: top_k or len(order)]
    probs = np.exp(scaled - scaled.max())
    probs[np.setdiff1d(order, kept_k)] = 0
    probs /= probs.sum()
    mass = 0.0
    for token in kept_k:  # nucleus: add the most likely tokens until their mass reaches p
        keep[token] = True
        mass += probs[token]
        if mass >= top_p:
            break
    filtered = np.where(keep, probs, 0)
    return filtered / filtered.sum()


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 5, 1.0), (1.0, 0, 0.6), (0.7, 8, 0.9), (1.0, 1, 1.0)],
)
def test_filter_logits_matches_the_numpy_filtered_distribution(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(scale=2.0, size=(6, VOCAB)).astype(np.float32)
    filtered = np.asarray(jax.nn.softmax(filter_logits(logits, temperature, top_k, top_p)))
    for row, probs in zip(logits, filtered, strict=True):
        expected = numpy_filtered_probs(row, temperature, top_k, top_p)
        np.testing.assert_array_equal(probs > 0, expected > 0)
        np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-7)


def test_sampled_first_tokens_follow_the_filtered_distribution(model):
    """4096 rows read one image with one prompt: their first tokens are 4096 draws."""
    rows = 4096
    config = DecodeConfig(max_len=1, method="sample", temperature=0.7, top_k=8, top_p=0.9)
    row_slot = np.zeros((2, rows // 2), np.int32)
    prompt = np.full((2, rows // 2, 1), 5, np.int32)
    out = decode(model, config, batch=packed_batch(row_slot), prompt=prompt)
    batch = packed_batch(row_slot[:, :1])
    batch["decoder_input"] = prompt[:, :1]
    logits = np.asarray(teacher_forced_log_probs(model, batch))[:, 0, 0]  # [B, V]
    for b in range(2):
        expected = numpy_filtered_probs(logits[b], 0.7, 8, 0.9)
        counts = np.bincount(out["tokens"][b, :, 0], minlength=VOCAB) / (rows // 2)
        assert not counts[expected == 0].any()
        np.testing.assert_allclose(counts, expected, atol=0.04)  # ~4 standard deviations
        assert (expected > 0).sum() > 2


# Detection-like grammar: (coordinate or END, coordinate x3, class); classes 10-14, coords 20-39.
CLASSES, COORDS = np.arange(10, 15), np.arange(20, 40)
GRAMMAR = np.zeros((5, VOCAB), bool)
GRAMMAR[0, [END, *COORDS]] = GRAMMAR[1:4, COORDS] = GRAMMAR[4, CLASSES] = True
DETECTION_GRAMMAR = cyclic_token_mask(GRAMMAR, prompt_length=1)


@pytest.mark.parametrize("method", ["greedy", "sample"])
def test_constrained_decoding_never_emits_a_masked_token(model, method):
    config = {"greedy": GREEDY, "sample": SAMPLE}[method]
    unconstrained = decode(model, config)
    out = decode(model, config, DETECTION_GRAMMAR)
    live = (ROW_SLOT >= 0)[..., None] & ~after_first_end(out["tokens"])
    allowed = GRAMMAR[np.arange(MAX_LEN) % 5][None, None]  # [1, 1, max_len, V]
    obeys = np.take_along_axis(allowed, out["tokens"][..., None], axis=-1)[..., 0]
    assert obeys[live].all()
    # Without the mask the same model breaks the grammar, so the test could fail.
    live = (ROW_SLOT >= 0)[..., None] & ~after_first_end(unconstrained["tokens"])
    obeys = np.take_along_axis(allowed, unconstrained["tokens"][..., None], axis=-1)[..., 0]
    assert not obeys[live].all()


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_model_log_probs_are_the_unconstrained_teacher_forced_log_probs(model, method):
    config = {"greedy": GREEDY, "beam": BEAM}[method]
    out = decode(model, config, DETECTION_GRAMMAR)
    live = (ROW_SLOT >= 0)[..., None] & ~after_first_end(out["tokens"])
    expected = rescore(model, PROMPT, out["tokens"])  # the model's full softmax, no mask
    np.testing.assert_allclose(out["model_log_probs"][live], expected[live], atol=1e-5)
    assert not out["model_log_probs"][~live].any()
    # The grammar renormalizes: constrained >= unconstrained, strictly where it cut mass.
    assert (out["token_log_probs"][live] >= out["model_log_probs"][live] - 1e-6).all()
    assert (out["token_log_probs"][live] > out["model_log_probs"][live] + 1e-3).any()


def test_beam_search_with_one_beam_equals_greedy(model, greedy):
    # Without the cache, so the recomputing path of beam search is checked too.
    config = DecodeConfig(max_len=MAX_LEN, method="beam", beam_size=1, use_cache=False)
    beam = decode(model, config)
    np.testing.assert_array_equal(beam["tokens"], greedy["tokens"])
    np.testing.assert_allclose(beam["score"], greedy["score"], rtol=1e-5)


def test_beam_search_scores_at_least_greedy_and_its_score_is_the_true_log_prob(model, greedy):
    beam = decode(model, BEAM)
    real = ROW_SLOT >= 0
    assert (beam["score"][real] >= greedy["score"][real] - 1e-5).all()
    assert (beam["score"][real] > greedy["score"][real] + 1e-3).any()
    # The reported score is the teacher-forced log-probability of the returned tokens.
    rescored = np.where(after_first_end(beam["tokens"]), 0, rescore(model, PROMPT, beam["tokens"]))
    np.testing.assert_allclose(beam["score"][real], rescored.sum(-1)[real], rtol=1e-4)


@pytest.mark.parametrize(
    "field, value",
    [("method", "nucleus"), ("max_len", 0), ("temperature", 0.0), ("top_k", -1), ("top_p", 0.0),
     ("beam_size", 0)],
)  # fmt: skip
def test_bad_decode_config_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        DecodeConfig(**{"max_len": MAX_LEN, field: value})


def test_prompts_that_do_not_fit_the_rows_or_positions_raise(model):
    with pytest.raises(ValueError, match="max_len"):
        decode(model, DecodeConfig(max_len=16))
    with pytest.raises(ValueError, match="row_slot"):
        decode(model, GREEDY, prompt=PROMPT[:, :2])
    with pytest.raises(ValueError, match="P >= 1"):
        decode(model, GREEDY, prompt=PROMPT[:, :, :0])
