"""SentencePiece text: train a model on a dataset's own sentences at build time, and tokenize.

Id layout of models trained here: 0 = PAD (Pix2Seq's PAD / end of sequence), 1 = EOS,
2 = UNK, no BOS. `Tokenizer` also reads any local SentencePiece model named in a config.
"""

import io
import os
from collections.abc import Iterable

import sentencepiece as spm

SENTENCEPIECE_FILENAME = "sentencepiece.model"
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


def train_sentencepiece(
    sentences: Iterable[str], model_path: str | os.PathLike, vocab_size: int = 512
) -> str:
    """Trains a unigram SentencePiece model on `sentences`, writes it to `model_path`.

    Deterministic for the same sentences (single thread, no sampling or shuffling). The
    vocabulary shrinks below `vocab_size` when the text has fewer distinct pieces.
    """
    sentences = [s for s in sentences if s]
    if not sentences:
        raise ValueError("train_sentencepiece: got no non-empty sentences to train on.")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # small synthetic corpora have fewer pieces than asked for
        model_type="unigram",
        character_coverage=1.0,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        num_threads=1,
        input_sentence_size=0,  # use every sentence: no random sampling
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    model_path = os.fspath(model_path)
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    with open(model_path, "wb") as f:
        f.write(model.getvalue())
    return model_path


class Tokenizer:
    """A SentencePiece model: text <-> ids (no BOS/EOS added; callers append `eos_id`)."""

    def __init__(self, model_path: str | os.PathLike):
        model_path = os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"Tokenizer: no SentencePiece model at {model_path!r}. Build the dataset "
                "(`python -m navit_seq.data.build scenes --data-dir DIR` writes "
                f"<data_dir>/scenes/<config>/<version>/{SENTENCEPIECE_FILENAME}) or point the "
                "config at an existing .model file."
            )
        self.model_path = model_path
        self._processor = spm.SentencePieceProcessor(model_file=model_path)

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._processor.pad_id()

    @property
    def eos_id(self) -> int:
        return self._processor.eos_id()

    def encode(self, text: str) -> list[int]:
        return self._processor.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; PAD and EOS ids are dropped (decoders emit them as terminators)."""
        specials = {self.pad_id, self.eos_id}
        return self._processor.decode([int(i) for i in ids if int(i) not in specials])

    def __getstate__(self):  # picklable for grain worker processes
        return {"model_path": self.model_path}

    def __setstate__(self, state):
        self.__init__(state["model_path"])


def find_sentencepiece(dataset_dir: str | os.PathLike) -> str:
    """Path of the SentencePiece model a builder stored in its dataset directory."""
    path = os.path.join(os.fspath(dataset_dir), SENTENCEPIECE_FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"find_sentencepiece: {path!r} does not exist; the dataset at {dataset_dir!r} was "
            "built without a tokenizer (rebuild it with `python -m navit_seq.data.build`)."
        )
    return path
