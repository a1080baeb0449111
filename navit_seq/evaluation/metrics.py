"""Metric families: what a task's predictions are scored by (`SequenceTask.metric` names one).

"bbox", "segm", "keypoints": COCO AP by pycocotools (`coco.py`; the three share one ground
truth); "caption": BLEU-4 and CIDEr (`captions.py`). A new family is one `register_metric`
call next to its task; `score` runs the families of a recipe's tasks, so the metrics of tasks
a recipe does not train are absent.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from navit_seq.evaluation import captions, coco

Scorer = Callable[[Sequence[Mapping[str, Any]], Sequence[Mapping[str, Any]], Sequence[str]], dict]


def caption_scores(
    examples: Sequence[Mapping[str, Any]],
    predictions: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
) -> dict[str, float]:
    """caption_BLEU4 and caption_CIDEr of the images that have a reference caption."""
    del class_names
    references = {int(e["image_id"]): list(e["captions"]) for e in examples}
    predicted = {
        p["image_id"]: p["caption"]
        for p in predictions
        if "caption" in p and any(str(c).strip() for c in references[p["image_id"]])
    }
    return captions.caption_metrics(references, predicted)


# family -> scorer(examples, predictions, class_names) -> metrics (COCO's kinds are in `score`).
METRICS: dict[str, Scorer] = {"caption": caption_scores}


def register_metric(name: str, scorer: Scorer) -> None:
    """Adds metric family `name` (a task whose `metric` is `name` is scored by `scorer`)."""
    METRICS[name] = scorer


def score(
    families: Sequence[str],
    examples: Sequence[Mapping[str, Any]],
    predictions: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
) -> dict[str, float]:
    """The metrics of each family in `families` over the predictions of `examples`."""
    unknown = sorted(set(families) - set(METRICS) - set(coco.IOU_TYPES))
    if unknown:
        raise ValueError(
            f"metric families {unknown} are not registered (known: "
            f"{[*coco.IOU_TYPES, *METRICS]}); register them with "
            "navit_seq.evaluation.metrics.register_metric."
        )
    kinds = [family for family in coco.IOU_TYPES if family in families]
    metrics = coco.coco_metrics(examples, predictions, class_names, kinds) if kinds else {}
    for family in families:
        if family in METRICS:
            metrics.update(METRICS[family](examples, predictions, class_names))
    return metrics
