import itertools

import numpy as np
import pytest

from navit_seq.data.scene_render import render_scene, scene_rng
from navit_seq.data.text import Tokenizer, train_sentencepiece
from navit_seq.tasks.captioning import CaptioningTask
from navit_seq.tasks.vocab import Vocab

COLOURS = ("red", "green", "blue", "yellow", "purple")
SHAPES = ("circle", "square", "triangle", "star")
PLACES = ("next to", "above", "below", "inside")
SENTENCES = [
    f"a {c1} {s1} {p} a {c2} {s2}"
    for c1, s1, p, c2, s2 in itertools.product(COLOURS, SHAPES, PLACES, COLOURS[:2], SHAPES[:2])
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("spm") / "captions.model"
    return Tokenizer(train_sentencepiece(SENTENCES, path, vocab_size=32))


@pytest.fixture(scope="module")
def task(tokenizer):
    vocab = Vocab(num_classes=4, num_bins=100, text_vocab_size=tokenizer.vocab_size)
    return CaptioningTask(vocab, tokenizer, seq_len=48)


def response(rows):
    return rows["target_tokens"][0, CaptioningTask.PROMPT_LENGTH - 1 :]


@pytest.mark.parametrize("caption", SENTENCES[::37] + ["a star", "purple"])
def test_round_trip_recovers_the_caption_exactly(task, caption):
    rows, stats = task.encode({"captions": [caption]}, training=False)
    decoded, decode_stats = task.decode(response(rows))
    assert decoded == caption
    assert (stats["captions"], stats["captions_truncated"]) == (1, 0)
    assert decode_stats["malformed_tokens"] == 0


def test_response_is_shifted_sentencepiece_ids_then_end_weighing_a_tenth(task, tokenizer):
    caption = "a red circle above a green square"
    rows, _ = task.encode({"captions": [caption.encode()]}, training=False)  # TFDS gives bytes
    ids = tokenizer.encode(caption)
    offset = task.vocab.text_offset
    np.testing.assert_array_equal(rows["prompt_tokens"], [[Vocab.CAPTION_PROMPT]])
    np.testing.assert_array_equal(
        rows["input_tokens"][0, : len(ids) + 2], [13, *(offset + np.array(ids)), 0]
    )
    np.testing.assert_array_equal(response(rows)[: len(ids) + 1], [*(offset + np.array(ids)), 0])
    expected = np.concatenate([np.ones(len(ids)), [0.1], np.zeros(48 - len(ids) - 1)])
    np.testing.assert_allclose(rows["token_weights"][0], expected)


def test_training_picks_a_random_caption_and_eval_the_first(task):
    example = {"captions": [SENTENCES[0], SENTENCES[1], SENTENCES[2]]}
    assert task.decode(response(task.encode(example, training=False)[0]))[0] == SENTENCES[0]
    picked = {
        task.decode(response(task.encode(example, training=True, rng=np.random.default_rng(s))[0]))[
            0
        ]
        for s in range(12)
    }
    assert picked == set(SENTENCES[:3])


def test_empty_captions_are_skipped_and_an_image_without_any_gives_no_row(task):
    rows, stats = task.encode({"captions": ["", "  ", "a red star"]}, training=False)
    assert task.decode(response(rows))[0] == "a red star" and stats["empty_captions"] == 2
    rows, stats = task.encode({"captions": [b""]}, training=False)
    assert rows["input_tokens"].shape == (0, 48)
    assert (stats["no_caption"], stats["empty_captions"]) == (1, 1)
    rows, stats = task.encode({"captions": []}, training=False)
    assert rows["input_tokens"].shape == (0, 48) and stats["no_caption"] == 1


def test_captions_longer_than_the_row_are_truncated_and_counted(tokenizer):
    vocab = Vocab(num_classes=4, num_bins=100, text_vocab_size=tokenizer.vocab_size)
    task = CaptioningTask(vocab, tokenizer, seq_len=5)
    caption = " ".join(SENTENCES[:3])
    rows, stats = task.encode({"captions": [caption]}, training=False)
    assert stats["captions_truncated"] == 1
    np.testing.assert_array_equal(
        response(rows), [*(vocab.text_offset + np.array(tokenizer.encode(caption)[:4])), 0]
    )


def test_decode_drops_non_text_tokens_and_counts_them(task, tokenizer):
    ids = task.vocab.text_offset + np.array(tokenizer.encode("a blue circle"))
    decoded, stats = task.decode(np.array([*ids[:2], 1010, *ids[2:], 0, ids[0]]))
    assert decoded == "a blue circle" and stats == {"malformed_tokens": 1}


def test_a_vocab_without_text_is_refused(tokenizer):
    with pytest.raises(ValueError, match="text_vocab_size"):
        CaptioningTask(Vocab(num_classes=4), tokenizer, seq_len=24)


def test_a_tokenizer_larger_than_the_text_vocab_is_refused_naming_the_fix(tokenizer):
    task = CaptioningTask(Vocab(num_classes=4, text_vocab_size=5), tokenizer, seq_len=24)
    with pytest.raises(ValueError, match="set it to the tokenizer's vocabulary size"):
        task.encode({"captions": ["a purple triangle"]}, training=False)


def test_round_trip_on_rendered_scene_captions_is_exact(tmp_path):
    """Captions of the package's own scene dataset, with a tokenizer trained on them."""
    captions = [
        caption
        for i in range(15)
        for caption in render_scene(scene_rng(3, "test", i), image_id=i).example["captions"]
    ]
    tokenizer = Tokenizer(train_sentencepiece(captions, tmp_path / "scenes.model", 256))
    vocab = Vocab(num_classes=12, text_vocab_size=tokenizer.vocab_size)
    task = CaptioningTask(vocab, tokenizer, seq_len=64)
    for caption in captions:
        rows, stats = task.encode({"captions": [caption]}, training=False)
        assert stats["captions_truncated"] == 0
        assert task.decode(response(rows))[0] == caption
