"""Caption BLEU-4 / CIDEr through pycocoevalcap with the simple tokenizer."""

import pytest
from pycocoevalcap.bleu.bleu import Bleu

from navit_seq.evaluation import captions

REFERENCES = {
    1: ["A red circle and a blue square.", "a square beside a circle"],
    2: ["Two people on a checkered background.", "a pair of persons"],
    3: ["a green arrow pointing left", "An arrow, green."],
}


def test_tokenize_lowercases_and_drops_punctuation():
    assert captions.tokenize("A Red  circle, and a square.") == "a red circle and a square"


def test_identical_captions_score_high():
    metrics = captions.caption_metrics(REFERENCES, {k: v[0] for k, v in REFERENCES.items()})
    assert metrics["caption_BLEU4"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["caption_CIDEr"] > 1.0


def test_disjoint_captions_score_zero():
    metrics = captions.caption_metrics(REFERENCES, dict.fromkeys(REFERENCES, "zebra umbrella"))
    assert metrics["caption_BLEU4"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["caption_CIDEr"] == 0.0


def test_bleu_equals_a_direct_pycocoevalcap_call_on_tokenized_text():
    predictions = {1: "a red circle and a square", 2: "two people on a background",
                   3: "a green arrow"}  # fmt: skip
    gts = {k: [captions.tokenize(r) for r in v] for k, v in REFERENCES.items()}
    res = {k: [captions.tokenize(v)] for k, v in predictions.items()}
    expected, _ = Bleu(4).compute_score(gts, res, verbose=0)
    metrics = captions.caption_metrics(REFERENCES, predictions)
    assert metrics["caption_BLEU4"] == pytest.approx(expected[3], rel=1e-9)
    assert 0 < metrics["caption_BLEU4"] < 1


def test_prediction_without_references_raises_naming_the_image():
    with pytest.raises(ValueError, match=r"image ids \[7\]"):
        captions.caption_metrics(REFERENCES, {7: "a circle"})
