"""SentencePiece training at build time and the Tokenizer wrapper."""

import pickle

import pytest

from navit_seq.data import text

SENTENCES = [
    "a red circle and two blue squares.",
    "there are three objects: a person in green, a yellow star and a cyan ring.",
    "a picture of two crosses on a striped background.",
    "an image showing a hexagon, a pentagon and an arrow.",
    "the small orange triangle",
    "the large purple diamond",
] * 20


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return text.train_sentencepiece(SENTENCES, tmp_path_factory.mktemp("spm") / "m.model", 128)


def test_encode_then_decode_gives_back_the_sentence(model_path):
    tokenizer = text.Tokenizer(model_path)
    for sentence in SENTENCES[:6]:
        ids = tokenizer.encode(sentence)
        assert ids and all(isinstance(i, int) for i in ids)
        assert tokenizer.decode(ids) == sentence


def test_special_ids_are_pad_0_and_eos_1_and_never_produced_by_encode(model_path):
    tokenizer = text.Tokenizer(model_path)
    assert (tokenizer.pad_id, tokenizer.eos_id) == (0, 1)
    ids = [i for s in SENTENCES[:6] for i in tokenizer.encode(s)]
    assert min(ids) > text.UNK_ID  # known text: no PAD, EOS or UNK
    assert max(ids) < tokenizer.vocab_size <= 128


def test_decode_drops_pad_and_eos(model_path):
    tokenizer = text.Tokenizer(model_path)
    ids = tokenizer.encode("a red circle")
    assert tokenizer.decode([*ids, tokenizer.eos_id, tokenizer.pad_id, tokenizer.pad_id]) == (
        "a red circle"
    )


def test_training_twice_on_the_same_sentences_gives_identical_model_bytes(model_path, tmp_path):
    again = text.train_sentencepiece(SENTENCES, tmp_path / "again.model", 128)
    with open(model_path, "rb") as first, open(again, "rb") as second:
        assert first.read() == second.read()


def test_tokenizer_survives_pickling_for_grain_workers(model_path):
    tokenizer = pickle.loads(pickle.dumps(text.Tokenizer(model_path)))
    assert tokenizer.decode(tokenizer.encode("two blue squares")) == "two blue squares"


def test_missing_model_file_is_reported_with_its_path(tmp_path):
    missing = tmp_path / "nothing.model"
    with pytest.raises(FileNotFoundError, match="nothing.model"):
        text.Tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="sentencepiece.model"):
        text.find_sentencepiece(tmp_path)


def test_training_on_no_text_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no non-empty sentences"):
        text.train_sentencepiece(["", ""], tmp_path / "m.model")
