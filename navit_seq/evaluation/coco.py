"""COCO AP for boxes, masks and keypoints with pycocotools, for any dataset of `features.py`.

Ground truth: decoded examples (`navit_seq.data.sources`) -> a pycocotools `COCO` object in
pixel coordinates of the stored image (category ids from `objects/category_id`, iscrowd, area,
RLE masks, keypoints). Predictions: the per-image dicts of `navit_seq.inference` -> result
lists in pycocotools' own format, so any COCO-format dataset evaluates the same way.

Conventions: an object without a mask (detection-only data) gets its box as mask, counted
under `segm_gt_from_box`; a prediction whose label no ground-truth object has gets no
category (pycocotools then ignores it: a category without ground truth has no AP). A metric
with no predictions reads 0.0 and one without ground truth (pycocotools' -1) also 0.0; the
`<kind>_num_predictions` / `<kind>_num_gt` counts tell the cases apart.
"""

import contextlib
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

IOU_TYPES = ("bbox", "segm", "keypoints")
# COCOeval.stats order (bbox/segm: 12 values; keypoints: 10, same first three).
STAT_NAMES = ("AP", "AP50", "AP75")


def _image_size(example: Mapping[str, Any]) -> tuple[int, int]:
    """(H, W) of the stored image: from `image` [H, W, 3] or an explicit `image_size`."""
    if "image" in example:
        height, width = np.asarray(example["image"]).shape[:2]
    elif "image_size" in example:
        height, width = np.asarray(example["image_size"]).reshape(2)
    else:
        raise ValueError(
            f"example {example.get('image_id')} has neither `image` nor `image_size`; the COCO "
            "conversion needs the stored size to turn normalized coordinates into pixels."
        )
    return int(height), int(width)


def _pixel_box(box: np.ndarray, height: int, width: int) -> list[float]:
    """Normalized (ymin, xmin, ymax, xmax) -> COCO [x, y, w, h] pixels."""
    ymin, xmin, ymax, xmax = np.asarray(box, np.float64)
    return [xmin * width, ymin * height, (xmax - xmin) * width, (ymax - ymin) * height]


def _pixel_keypoints(keypoints: np.ndarray, height: int, width: int) -> list[float]:
    """[17, 3] (y, x, v) normalized -> COCO flat [x, y, v] * 17 in pixels."""
    keypoints = np.asarray(keypoints, np.float64).reshape(-1, 3)
    flat = np.stack([keypoints[:, 1] * width, keypoints[:, 0] * height, keypoints[:, 2]], 1)
    return flat.reshape(-1).tolist()


def _rle_json(rle: Mapping[str, Any]) -> dict[str, Any]:
    """A pycocotools RLE with `counts` as str (the form loadRes/json take)."""
    counts = rle["counts"]
    return {"size": [int(s) for s in rle["size"]], "counts": counts.decode("ascii")
            if isinstance(counts, bytes) else counts}  # fmt: skip


def _box_rle(box: np.ndarray, height: int, width: int) -> dict[str, Any]:
    """The box [x, y, w, h] (pixels) as a mask, for objects stored without one. pycocotools
    reads boxes only as a float64 array [K, 4] (a list of lists is a TypeError)."""
    boxes = np.asarray([_pixel_box(box, height, width)], np.float64)  # [1, 4]
    return mask_utils.frPyObjects(boxes, height, width)[0]


def ground_truth(
    examples: Iterable[Mapping[str, Any]], class_names: Sequence[str] | None = None
) -> tuple[COCO, dict[int, int], dict[str, int]]:
    """Examples -> (COCO ground truth, label -> category id, counts).

    Every example is one COCO image (id = `image_id`, which must be unique).
    """
    images, annotations, categories = [], [], {}
    category_of: dict[int, int] = {}
    counts = {"images": 0, "objects": 0, "segm_gt_from_box": 0}
    for example in examples:
        height, width = _image_size(example)
        image_id = int(example["image_id"])
        images.append({"id": image_id, "height": height, "width": width})
        counts["images"] += 1
        objects = example["objects"]
        labels = np.asarray(objects["label"], np.int64).reshape(-1)
        boxes = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)
        category_ids = np.asarray(objects.get("category_id", labels), np.int64).reshape(-1)
        crowd = np.asarray(objects.get("is_crowd", np.zeros(len(labels))), bool).reshape(-1)
        areas = np.asarray(objects.get("area", np.zeros(len(labels))), np.float64).reshape(-1)
        keypoints = np.asarray(
            objects.get("keypoints", np.zeros((len(labels), 17, 3))), np.float32
        ).reshape(len(labels), -1, 3)
        rles = list(objects.get("mask_rle", [b""] * len(labels)))
        for index, label in enumerate(labels):
            category_id = int(category_ids[index])
            if category_of.setdefault(int(label), category_id) != category_id:
                raise ValueError(
                    f"example {image_id}: label {label} has category_id {category_id} here and "
                    f"{category_of[int(label)]} elsewhere; give each label one category_id."
                )
            name = class_names[label] if class_names is not None else str(label)
            categories[category_id] = {"id": category_id, "name": name}
            box = _pixel_box(boxes[index], height, width)
            if rles[index]:
                segmentation = {"size": [height, width], "counts": rles[index]}
            else:
                segmentation = _box_rle(boxes[index], height, width)
                counts["segm_gt_from_box"] += 1
            visible = keypoints[index, :, 2] > 0
            points = np.where(visible[:, None], keypoints[index], 0.0)
            area = float(areas[index]) if areas[index] > 0 else box[2] * box[3]
            annotations.append(
                {
                    "id": len(annotations) + 1,  # pycocotools needs unique ids >= 1
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": box,
                    "area": area,
                    "iscrowd": int(crowd[index]),
                    "segmentation": _rle_json(segmentation),
                    "keypoints": _pixel_keypoints(points, height, width),
                    "num_keypoints": int(visible.sum()),
                }
            )
            counts["objects"] += 1
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": sorted(categories.values(), key=lambda c: c["id"]),
    }
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco, category_of, counts


def results(
    predictions: Iterable[Mapping[str, Any]],
    coco: COCO,
    category_of: Mapping[int, int],
) -> dict[str, list[dict[str, Any]]]:
    """Per-image predictions (navit_seq.inference format) -> pycocotools result lists per kind.

    Masks and keypoints are listed only where the prediction has them (keypoints: some v > 0).
    """
    out: dict[str, list[dict[str, Any]]] = {kind: [] for kind in IOU_TYPES}
    for prediction in predictions:
        image_id = int(prediction["image_id"])
        if image_id not in coco.imgs:
            raise ValueError(
                f"prediction for image_id {image_id}, which the ground truth does not have; "
                "evaluate predictions of the same split (and image ids) as the ground truth."
            )
        height, width = coco.imgs[image_id]["height"], coco.imgs[image_id]["width"]
        # A caption-only prediction has no boxes.
        labels = np.asarray(prediction.get("labels", ()), np.int64).reshape(-1)
        scores = np.asarray(prediction.get("scores", ()), np.float64).reshape(-1)
        boxes = np.asarray(prediction.get("boxes", ()), np.float64).reshape(-1, 4)
        masks = prediction.get("masks")
        keypoints = prediction.get("keypoints")
        for index, label in enumerate(labels):
            if int(label) not in category_of:
                continue  # no ground truth of this class: pycocotools would ignore it anyway
            common = {
                "image_id": image_id,
                "category_id": category_of[int(label)],
                "score": float(scores[index]),
            }
            box = _pixel_box(boxes[index], height, width)
            out["bbox"].append({**common, "bbox": box})
            if masks is not None and masks[index] is not None:
                out["segm"].append({**common, "segmentation": _rle_json(masks[index])})
            # All-zero visibility: no keypoints were predicted for this box (not a person).
            if keypoints is not None and np.asarray(keypoints[index])[:, 2].any():
                points = _pixel_keypoints(keypoints[index], height, width)
                out["keypoints"].append({**common, "keypoints": points, "bbox": box})
    return out


def evaluate(
    coco: COCO,
    result_lists: Mapping[str, list[dict[str, Any]]],
    kinds: Sequence[str] = IOU_TYPES,
) -> dict[str, float]:
    """COCOeval per kind of `kinds` -> {bbox_AP, bbox_AP50, bbox_AP75, segm_AP, ...,
    keypoints_AP, ...} in [0, 1] plus `<kind>_num_predictions`, `<kind>_num_gt` (see the
    module docstring)."""
    metrics: dict[str, float] = {}
    for kind in kinds:
        detections = list(result_lists.get(kind, []))
        category_ids = _categories_with_gt(coco, kind)
        metrics[f"{kind}_num_predictions"] = float(len(detections))
        metrics[f"{kind}_num_gt"] = float(
            sum(len(coco.getAnnIds(catIds=[c], iscrowd=False)) for c in category_ids)
        )
        stats = [0.0] * len(STAT_NAMES)
        if detections and category_ids:
            with contextlib.redirect_stdout(io.StringIO()):
                predicted = coco.loadRes(detections)
                evaluator = COCOeval(coco, predicted, iouType=kind)
                evaluator.params.catIds = category_ids
                evaluator.evaluate()
                evaluator.accumulate()
                evaluator.summarize()
            stats = [max(float(s), 0.0) for s in evaluator.stats[: len(STAT_NAMES)]]  # -1 -> 0
        for name, value in zip(STAT_NAMES, stats, strict=True):
            metrics[f"{kind}_{name}"] = value
    return metrics


def _categories_with_gt(coco: COCO, kind: str) -> list[int]:
    """Category ids with ground truth for `kind` (keypoints: with labelled keypoints)."""
    annotations = coco.dataset["annotations"]
    if kind == "keypoints":
        return sorted({a["category_id"] for a in annotations if a["num_keypoints"] > 0})
    return sorted({a["category_id"] for a in annotations})


def coco_metrics(
    examples: Iterable[Mapping[str, Any]],
    predictions: Iterable[Mapping[str, Any]],
    class_names: Sequence[str] | None = None,
    kinds: Sequence[str] = IOU_TYPES,
) -> dict[str, float]:
    """Ground truth of `examples` + per-image `predictions` -> `evaluate`'s metrics."""
    coco, category_of, _ = ground_truth(examples, class_names)
    return evaluate(coco, results(predictions, coco, category_of), kinds)
