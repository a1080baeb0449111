import numpy as np
import pytest

from navit_seq.tasks import vocab as vocab_lib
from navit_seq.tasks.vocab import END, PAD, Vocab, build_row, dequantize, quantize


@pytest.mark.parametrize("num_bins", [2, 7, 1000, 2000])
def test_quantize_dequantize_round_trip_is_within_half_a_bin(num_bins):
    coords = np.concatenate([np.random.default_rng(0).random(10_000), [0.0, 1.0, 0.5]])
    recovered = dequantize(quantize(coords, num_bins), num_bins)
    half_bin = 0.5 / (num_bins - 1)
    assert np.abs(recovered - coords).max() <= half_bin + 1e-6
    # ... and quantization is not trivially exact: the error reaches close to half a bin.
    assert np.abs(recovered - coords).max() > 0.9 * half_bin


def test_quantize_matches_round_of_scaled_coordinate_and_clips():
    coords = np.array([-0.3, 0.0, 0.0005, 0.000501, 0.25, 1.0, 1.7])  # half a bin = 0.0005005
    np.testing.assert_array_equal(quantize(coords, 1000), [0, 0, 0, 1, 250, 999, 999])


def test_quantize_refuses_non_finite_coordinates():
    with pytest.raises(ValueError, match="2 non-finite coordinates"):
        quantize([0.1, np.nan, np.inf], 1000)


def test_offsets_follow_reference_layout_when_classes_fit_below_1000():
    vocab = Vocab(num_classes=80, num_bins=1000, text_vocab_size=32000)
    assert (vocab.coord_offset, vocab.text_offset, vocab.size) == (1000, 2000, 34000)
    np.testing.assert_array_equal(vocab.class_tokens([0, 79]), [100, 179])
    np.testing.assert_array_equal(vocab.coord_tokens([0.0, 1.0]), [1000, 1999])
    np.testing.assert_array_equal(vocab.text_tokens([0, 31999]), [2000, 33999])


def test_offsets_move_past_the_classes_when_there_are_more_than_900():
    vocab = Vocab(num_classes=1203, num_bins=500, text_vocab_size=10)
    assert (vocab.coord_offset, vocab.text_offset, vocab.size) == (1303, 1803, 1813)


def test_compact_layout_puts_coordinates_right_after_the_classes():
    vocab = Vocab(num_classes=12, num_bins=64, text_vocab_size=87, layout="compact")
    assert (vocab.coord_offset, vocab.text_offset, vocab.size) == (112, 176, 263)
    np.testing.assert_array_equal(vocab.class_tokens([0, 11]), [100, 111])
    np.testing.assert_array_equal(vocab.coord_tokens([0.0, 1.0]), [112, 175])
    np.testing.assert_allclose(vocab.token_coords(vocab.coord_tokens([0.0, 0.5, 1.0])),
                               [0.0, 32 / 63, 1.0])  # fmt: skip


def test_unknown_layout_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="layout='dense'.*reference"):
        Vocab(num_classes=3, layout="dense")


@pytest.mark.parametrize("layout", ["reference", "compact"])
@pytest.mark.parametrize("num_classes", [5, 1203])
def test_token_kinds_are_disjoint_and_specials_are_none_of_them(num_classes, layout):
    vocab = Vocab(num_classes=num_classes, num_bins=300, text_vocab_size=50, layout=layout)
    ids = np.arange(vocab.size)
    kinds = np.stack([vocab.is_class(ids), vocab.is_coord(ids), vocab.is_text(ids)])
    assert kinds.sum(axis=0).max() == 1
    assert kinds.sum(axis=1).tolist() == [num_classes, 300, 50]
    specials = [PAD, END, Vocab.DETECTION_PROMPT, Vocab.SEGMENTATION_PROMPT]
    specials += [Vocab.KEYPOINT_PROMPT, Vocab.CAPTION_PROMPT]
    specials += [Vocab.FAKE_CLASS, Vocab.SEPARATOR, Vocab.INVISIBLE]
    assert kinds[:, specials].sum() == 0


def test_class_tokens_rejects_unknown_class_naming_it():
    with pytest.raises(ValueError, match=r"\[3, 12\] outside \[0, 10\)"):
        Vocab(num_classes=10).class_tokens([3, 12])


def test_text_tokens_rejects_ids_beyond_text_vocab_size():
    with pytest.raises(ValueError, match="text_vocab_size=4"):
        Vocab(num_classes=1, text_vocab_size=4).text_tokens([1, 4])


def test_vocab_rejects_fewer_than_two_bins():
    with pytest.raises(ValueError, match="num_bins=1"):
        Vocab(num_classes=3, num_bins=1)


def test_build_row_shifts_label_and_weights_prompt_response_end_and_padding():
    prompt, response = np.array([11, 1005]), np.array([1001, 1002, 40])
    inputs, targets, weights = build_row(
        prompt, response, np.array([1.0, 0.5, 2.0]), seq_len=8, end_weight=0.1,
        input_response=np.array([1001, 30, 40]),
    )  # fmt: skip
    # label = 11 1005 | 1001 1002 40 | END | PAD PAD PAD (T + 1 = 9 tokens)
    np.testing.assert_array_equal(inputs, [11, 1005, 1001, 30, 40, 0, 0, 0])
    np.testing.assert_array_equal(targets, [1005, 1001, 1002, 40, 0, 0, 0, 0])
    np.testing.assert_allclose(weights, [0.0, 1.0, 0.5, 2.0, 0.1, 0.0, 0.0, 0.0])


def test_build_row_that_fills_the_row_ends_with_end_as_last_target():
    inputs, targets, weights = build_row([10], [1001, 1002], [1.0, 1.0], 3, 0.1)
    np.testing.assert_array_equal(inputs, [10, 1001, 1002])
    np.testing.assert_array_equal(targets, [1001, 1002, END])
    np.testing.assert_allclose(weights, [1.0, 1.0, 0.1])


def test_build_row_raises_when_the_response_does_not_fit():
    with pytest.raises(ValueError, match="does not fit seq_len=3"):
        build_row([10], [1001, 1002, 1003], [1.0] * 3, 3, 0.1)


def test_response_until_end_cuts_at_first_end():
    np.testing.assert_array_equal(vocab_lib.response_until_end([5, 6, 0, 7, 0]), [5, 6])
    np.testing.assert_array_equal(vocab_lib.response_until_end([5, 6]), [5, 6])
