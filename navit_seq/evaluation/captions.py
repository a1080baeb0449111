"""Caption BLEU-4 and CIDEr(-D) with pycocoevalcap, the scorers of the COCO caption benchmark.

pycocoevalcap's PTBTokenizer runs Stanford CoreNLP in Java, which this codebase does not
require; `tokenize` stands in for it: lowercase, punctuation removed, split on whitespace
(what PTBTokenizer's output looks like for plain English captions, minus its contractions
splitting). Scores are therefore close to, not identical with, the official ones.
"""

import re
from collections.abc import Mapping, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

_PUNCTUATION = re.compile(r"[^\w\s]")


def tokenize(caption: str) -> str:
    """Lowercase, punctuation removed, single spaces: 'A Red circle.' -> 'a red circle'."""
    return " ".join(_PUNCTUATION.sub(" ", caption.lower()).split())


def caption_metrics(
    references: Mapping[int, Sequence[str]], predictions: Mapping[int, str]
) -> dict[str, float]:
    """{image id: reference captions}, {image id: predicted caption} -> caption_BLEU4 and
    caption_CIDEr (pycocoevalcap's corpus scores; CIDEr is 10x-scaled as in the benchmark).

    Every predicted image needs >= 1 reference; images without a prediction are not scored.
    """
    missing = sorted(set(predictions) - set(references))
    if missing:
        raise ValueError(
            f"caption predictions for image ids {missing[:5]} have no reference captions; "
            "score predictions of the split the references come from."
        )
    gts, res = {}, {}
    for image_id, caption in predictions.items():
        refs = [tokenize(str(r)) for r in references[image_id] if str(r).strip()]
        if not refs:
            raise ValueError(
                f"image {image_id} has no non-empty reference caption; drop it from the "
                "predictions or fix the dataset's captions."
            )
        gts[image_id], res[image_id] = refs, [tokenize(caption)]
    if not res:
        return {"caption_BLEU4": 0.0, "caption_CIDEr": 0.0, "caption_num_predictions": 0.0}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {
        "caption_BLEU4": float(bleu[3]),
        "caption_CIDEr": float(cider),
        "caption_num_predictions": float(len(res)),
    }
