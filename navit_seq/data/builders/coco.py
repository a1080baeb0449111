"""COCO-format folder -> TFDS dataset (ArrayRecord) with the shared example features.

Serves COCO 2017 as downloaded from cocodataset.org and any dataset in COCO format:

    <coco_dir>/annotations/instances_<split>.json         boxes, masks, iscrowd, categories
    <coco_dir>/annotations/person_keypoints_<split>.json  keypoints, merged by annotation id
    <coco_dir>/annotations/captions_<split>.json          captions, by image id
    <coco_dir>/<split>/<file_name>                        images (e.g. train2017/, val2017/)

Images may also be in <coco_dir>/images/<split>/, <coco_dir>/images/ or <coco_dir>/ itself
(each image record's `file_name` is relative to one of these; an absolute one is used as it
is): a split's folder is the first of those that holds every one of its files, or the one
named by `image_dirs={split: folder}` (`--image-dir SPLIT=FOLDER` on the command line).
Splits are discovered from the annotation file names; any of the three files may be missing
for a split. An image listed in any file of a split is an example (images without annotations, or
listed only in the captions file, have no objects). Image files are stored as they are (no
re-encoding) unless their pixel mode is not RGB/greyscale; those are converted to RGB PNG
(lossless) and counted under `adjusted/reencoded_image`. Classes are the union of the
categories of every split, labelled 0.. in category-id order; `category_id` keeps the id.
`<data_dir>/<name>/1.0.0/` also holds `build_report.json` and `sentencepiece.model`
(trained on the training splits' captions and the class names). Read it with
`tfds.data_source(name, data_dir=...)` or `navit_seq.data.sources.data_source`.

Bad input, decided per case (the report returned by `build` lists every count):
- Error (`CocoFormatError`, naming the file and the image or annotation id): unreadable or
  malformed JSON, missing required field, duplicate id, annotation for an unknown image or
  category, NaN/inf anywhere in a number, a category name used twice, a keypoint category
  without 17 keypoints, an RLE whose size or run lengths do not fit the image, a split
  with no images, a missing image file (all checked before anything is written), a corrupt
  image or one whose size differs from the JSON (checked while writing; TFDS then leaves no
  dataset behind).
- Counted skip (the annotation or polygon is dropped, the image is kept):
  `degenerate_polygon` (< 3 points, odd coordinate count, or zero area: the polygon is
  dropped), `no_valid_polygon` (every polygon of the annotation was degenerate: annotation
  dropped), `degenerate_box` (width or height <= 0), `box_outside_image` (nothing left after
  clipping to the image), `empty_caption`.
- Counted adjustment (kept, changed): `box_clipped` (box clipped to the image),
  `reencoded_image`. Annotations without any segmentation are kept with no mask
  (`mask_rle` = b"", `num_polygons` = 0) and counted under `adjusted/no_segmentation`.
Polygon vertices are stored as given (normalized), not clipped: masks are rasterized from them
exactly as pycocotools does. Pixels are the file's stored pixels (EXIF orientation is not
applied), the frame COCO's annotations and sizes refer to.
"""

import collections
import contextlib
import dataclasses
import io
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from navit_seq.data import text
from navit_seq.data.builders import common
from navit_seq.data.features import NUM_KEYPOINTS, example_features

ANNOTATION_KINDS = ("instances", "person_keypoints", "captions")
DATASET_VERSION = "1.0.0"
REPORT_FILE = common.REPORT_FILE
# SentencePiece pieces for captions: COCO's captions use ~10k distinct words; the vocabulary
# shrinks by itself for smaller datasets.
DEFAULT_VOCAB_SIZE = 8000
# Each skip reason keeps this many example ids in the report, so a user can find the records.
MAX_REPORTED_IDS = 20
# Below this many square pixels a polygon encloses nothing (collinear or repeated points).
MIN_POLYGON_AREA = 1e-6
_PASSTHROUGH_MODES = ("RGB", "L")  # decoded by TFDS to [H, W, 3] correctly
_PASSTHROUGH_FORMATS = ("JPEG", "PNG")


class CocoFormatError(ValueError):
    """Bad input in a COCO-format folder; the message names the file, the record and a fix."""


@dataclasses.dataclass
class SplitReport:
    """What one split contributed: counts, counted skips and adjustments by reason."""

    annotation_files: list[str] = dataclasses.field(default_factory=list)
    image_dir: str = ""  # the folder the split's file_names were found under
    images: int = 0
    annotations: int = 0
    captions: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    adjusted: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    example_ids: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    def count(self, kind: str, reason: str, record_id: int) -> None:
        """Counts one skip (`kind="skipped"`) or adjustment and remembers a few record ids."""
        getattr(self, kind)[reason] += 1
        ids = self.example_ids.setdefault(reason, [])
        if len(ids) < MAX_REPORTED_IDS:
            ids.append(int(record_id))

    def as_dict(self) -> dict[str, Any]:
        return {
            "annotation_files": self.annotation_files,
            "image_dir": self.image_dir,
            "images": self.images,
            "annotations": self.annotations,
            "captions": self.captions,
            "skipped": dict(sorted(self.skipped.items())),
            "adjusted": dict(sorted(self.adjusted.items())),
            "example_ids": dict(sorted(self.example_ids.items())),
        }


@dataclasses.dataclass
class SplitPlan:
    """A validated split: image records, kept annotations (cleaned) and captions per image."""

    name: str
    image_dir: str
    images: dict[int, dict[str, Any]]
    annotations: dict[int, list[dict[str, Any]]]
    captions: dict[int, list[str]]
    categories: dict[int, dict[str, Any]]
    report: SplitReport


def discover_splits(coco_dir: str) -> list[str]:
    """Split names found as `annotations/{instances,person_keypoints,captions}_<split>.json`."""
    annotation_dir = os.path.join(coco_dir, "annotations")
    if not os.path.isdir(annotation_dir):
        raise CocoFormatError(
            f"coco_dir={coco_dir!r} has no 'annotations/' folder; point --coco-dir at the folder "
            "that holds annotations/ and the image folders (e.g. train2017/, val2017/)."
        )
    pattern = re.compile(rf"^({'|'.join(ANNOTATION_KINDS)})_(.+)\.json$")
    splits = {m.group(2) for f in os.listdir(annotation_dir) if (m := pattern.match(f))}
    if not splits:
        raise CocoFormatError(
            f"{annotation_dir} holds no instances_<split>.json, person_keypoints_<split>.json or "
            "captions_<split>.json; add at least one annotation file per split."
        )
    return sorted(splits)


def _load_coco(path: str) -> COCO:
    """pycocotools' view of one JSON file, with its errors turned into ones naming the file."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco = COCO(path)
    except (OSError, ValueError, TypeError, KeyError, AssertionError) as error:
        raise CocoFormatError(
            f"{path}: not a readable COCO JSON file ({type(error).__name__}: {error}); "
            "re-download or re-export it."
        ) from error
    if not isinstance(coco.dataset, dict):
        raise CocoFormatError(f"{path}: top level must be a JSON object with 'images', ...")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.dataset.get(key, []), list):
            raise CocoFormatError(f"{path}: '{key}' must be a list")
    return coco


def _require(record: dict, field: str, path: str, what: str, types_: tuple) -> Any:
    """The field's value, checked for presence and type; numbers (and lists) must be finite."""
    if not isinstance(record, dict) or field not in record:
        raise CocoFormatError(f"{path}: {what} has no '{field}' field; add it.")
    value = record[field]
    if not isinstance(value, types_) or isinstance(value, bool) and bool not in types_:
        raise CocoFormatError(f"{path}: {what} has {field}={value!r}; expected {types_}.")
    if not isinstance(value, str):
        _check_finite(value, path, f"{what} field '{field}'")
    return value


def _check_finite(value: Any, path: str, what: str) -> None:
    """Raises unless `value` is a finite number or a flat list of finite numbers."""
    numbers = value if isinstance(value, list) else [value]
    if not set(map(type, numbers)) <= {int, float}:  # also rejects bools and nested lists
        raise CocoFormatError(f"{path}: {what} holds {str(value)[:80]}; expected numbers.")
    try:
        finite = all(map(math.isfinite, numbers))
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite:
        raise CocoFormatError(f"{path}: {what} contains NaN/inf; replace it with finite numbers.")


def _check_ids_unique(records: list[dict], path: str, what: str) -> None:
    seen: set[int] = set()
    for record in records:
        record_id = _require(record, "id", path, what, (int,))
        if record_id in seen:
            raise CocoFormatError(f"{path}: duplicate {what} id {record_id}; ids must be unique.")
        seen.add(record_id)


def _merge_images(images: dict[int, dict], coco: COCO, path: str) -> None:
    """Adds the file's image records to `images`, checking fields and cross-file agreement."""
    _check_ids_unique(coco.dataset.get("images", []), path, "image")
    for record in coco.dataset.get("images", []):
        image_id = record["id"]
        what = f"image id {image_id}"
        image = {
            "id": image_id,
            "file_name": _require(record, "file_name", path, what, (str,)),
            "height": _require(record, "height", path, what, (int,)),
            "width": _require(record, "width", path, what, (int,)),
        }
        if image["height"] <= 0 or image["width"] <= 0:
            raise CocoFormatError(f"{path}: {what} has size {image['height']}x{image['width']}.")
        previous = images.setdefault(image_id, image)
        if previous != image:
            raise CocoFormatError(
                f"{path}: {what} is {image} here but {previous} in another annotation file of "
                "the same split; make the files agree."
            )


def _merge_categories(categories: dict[int, dict], coco: COCO, path: str) -> None:
    _check_ids_unique(coco.dataset.get("categories", []), path, "category")
    for record in coco.dataset.get("categories", []):
        what = f"category id {record['id']}"
        category = {"id": record["id"], "name": _require(record, "name", path, what, (str,))}
        keypoint_names = record.get("keypoints", [])
        if not isinstance(keypoint_names, list) or len(keypoint_names) not in (0, NUM_KEYPOINTS):
            raise CocoFormatError(
                f"{path}: {what} has keypoints={str(keypoint_names)[:80]}; navit_seq stores "
                f"COCO's {NUM_KEYPOINTS} person keypoints. Remove 'keypoints' or convert them."
            )
        previous = categories.setdefault(record["id"], category)
        if previous != category:
            raise CocoFormatError(
                f"{path}: {what} is {category} here but {previous} elsewhere; make them agree."
            )


def _polygon_area(coords: list[float]) -> float:
    """Shoelace area in square pixels of a flat [x0, y0, x1, y1, ...] polygon."""
    x, y = coords[0::2], coords[1::2]
    next_x, next_y = x[1:] + x[:1], y[1:] + y[:1]
    return 0.5 * abs(sum(map(lambda a, b, c, d: a * d - c * b, x, y, next_x, next_y)))


def _clean_annotation(
    annotation: dict, image: dict, path: str, report: SplitReport
) -> dict[str, Any] | None:
    """The annotation with its box clipped and degenerate polygons removed, or None if skipped.

    Raises for malformed or non-finite fields (also of annotations then skipped); counts every
    skip and adjustment in `report`.
    """
    annotation_id = annotation["id"]
    what = f"annotation id {annotation_id} (image id {image['id']})"
    bbox = _require(annotation, "bbox", path, what, (list,))
    if len(bbox) != 4:
        raise CocoFormatError(f"{path}: {what} has bbox={bbox}; expected [x, y, width, height].")
    segmentation = annotation.get("segmentation", [])
    rle = _check_segmentation(segmentation, image, path, what)
    is_crowd = annotation.get("iscrowd", 0)
    if is_crowd not in (0, 1, True, False):
        raise CocoFormatError(f"{path}: {what} has iscrowd={is_crowd!r}; expected 0 or 1.")
    area = annotation.get("area")
    if area is not None:
        _require(annotation, "area", path, what, (int, float))

    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        report.count("skipped", "degenerate_box", annotation_id)
        return None
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, float(image["width"])), min(y + h, float(image["height"]))
    if x1 <= x0 or y1 <= y0:
        report.count("skipped", "box_outside_image", annotation_id)
        return None
    if (x0, y0, x1, y1) != (x, y, x + w, y + h):
        report.count("adjusted", "box_clipped", annotation_id)

    polygons = []
    for polygon in segmentation if rle is None else []:
        # Fewer than 3 points is not a polygon (and pycocotools would read a 4-number
        # polygon as a box): drop it, counted.
        if len(polygon) < 6 or len(polygon) % 2 or _polygon_area(polygon) < MIN_POLYGON_AREA:
            report.count("skipped", "degenerate_polygon", annotation_id)
            continue
        polygons.append(polygon)
    if rle is None and segmentation and not polygons:
        report.count("skipped", "no_valid_polygon", annotation_id)
        return None
    if rle is None and not segmentation:
        report.count("adjusted", "no_segmentation", annotation_id)
    return {
        "id": annotation_id,
        "image_id": image["id"],
        "category_id": annotation["category_id"],
        "box_xyxy": (x0, y0, x1, y1),
        "polygons": polygons,
        "rle": rle,
        "is_crowd": bool(is_crowd),
        "area": area,
    }


def _check_segmentation(segmentation: Any, image: dict, path: str, what: str) -> dict | None:
    """Raises for a malformed segmentation; returns it if it is an RLE, None for polygons."""
    if isinstance(segmentation, dict):
        return _check_rle(segmentation, image, path, what)
    if not isinstance(segmentation, list):
        raise CocoFormatError(
            f"{path}: {what} has segmentation of type {type(segmentation).__name__}; expected "
            "a list of polygons or an RLE dict."
        )
    for polygon in segmentation:
        if not isinstance(polygon, list):
            raise CocoFormatError(
                f"{path}: {what} has a polygon {str(polygon)[:80]}; expected a flat list "
                "[x0, y0, x1, y1, ...] of numbers."
            )
        _check_finite(polygon, path, f"{what} segmentation")
    return None


def _check_rle(segmentation: dict, image: dict, path: str, what: str) -> dict:
    size = segmentation.get("size")
    counts = segmentation.get("counts")
    if size != [image["height"], image["width"]]:
        raise CocoFormatError(
            f"{path}: {what} has an RLE of size {size} but the image is "
            f"[{image['height']}, {image['width']}]; re-encode the mask at the image's size."
        )
    if not isinstance(counts, str) and not (
        isinstance(counts, list) and set(map(type, counts)) <= {int}
    ):
        raise CocoFormatError(
            f"{path}: {what} has RLE counts that are neither a list of ints nor a compressed "
            "string."
        )
    runs = counts if isinstance(counts, list) else _compressed_rle_runs(counts)
    if min(runs, default=0) < 0 or sum(runs) != image["height"] * image["width"]:
        raise CocoFormatError(
            f"{path}: {what} has RLE runs summing to {sum(runs)} (or negative), not height * "
            f"width = {image['height'] * image['width']}; re-encode the mask."
        )
    return segmentation


def _compressed_rle_runs(counts: str) -> list[int]:
    """Run lengths of a COCO compressed RLE string (pycocotools' rleFrString, in Python).

    Hand-written because pycocotools trusts the string when decoding and writes past its buffer
    if the runs do not sum to height * width; this lets that be checked first.
    """
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(counts):
                return [-1]  # truncated string: reported as invalid by the caller
            chunk = ord(counts[position]) - 48
            value |= (chunk & 0x1F) << shift
            more = bool(chunk & 0x20)
            position += 1
            shift += 5
            if not more and chunk & 0x10:
                value |= -1 << shift  # sign-extend
        runs.append(value + (runs[-2] if len(runs) > 2 else 0))
    return runs


def _check_keypoints(annotation: dict, path: str) -> list[float]:
    what = f"annotation id {annotation['id']} (image id {annotation['image_id']})"
    keypoints = _require(annotation, "keypoints", path, what, (list,))
    if len(keypoints) != 3 * NUM_KEYPOINTS:
        raise CocoFormatError(
            f"{path}: {what} has {len(keypoints)} keypoint numbers; expected "
            f"{3 * NUM_KEYPOINTS} (x, y, v for COCO's {NUM_KEYPOINTS} keypoints)."
        )
    if any(v not in (0, 1, 2) for v in keypoints[2::3]):
        raise CocoFormatError(f"{path}: {what} has keypoint visibilities outside {{0, 1, 2}}.")
    return keypoints


def _check_references(
    annotation: dict, images: Mapping[int, dict], categories: Mapping[int, dict] | None, path: str
) -> None:
    """The annotation's image (and, unless `categories` is None, category) must be listed."""
    what = f"annotation id {annotation['id']}"
    image_id = _require(annotation, "image_id", path, what, (int,))
    if image_id not in images:
        raise CocoFormatError(
            f"{path}: {what} refers to image id {image_id}, which no annotation file of this "
            "split lists under 'images'; add the image record or remove the annotation."
        )
    if categories is not None:
        category_id = _require(annotation, "category_id", path, what, (int,))
        if category_id not in categories:
            raise CocoFormatError(
                f"{path}: {what} refers to category id {category_id}, which is not under "
                "'categories'; add the category or remove the annotation."
            )


def _check_same_object(instance: dict, person: dict, path: str) -> None:
    """The keypoints file's record must describe the instances file's annotation of that id."""
    for field in ("image_id", "category_id"):
        if instance.get(field) != person.get(field):
            raise CocoFormatError(
                f"{path}: annotation id {person['id']} has {field} {person.get(field)} here "
                f"but {instance.get(field)} in the instances file; the files must describe "
                "the same annotation."
            )


def image_dir_candidates(coco_dir: str, split: str) -> list[str]:
    """The folders a split's relative `file_name`s may be relative to, in the order tried."""
    return [
        os.path.join(coco_dir, split),
        os.path.join(coco_dir, "images", split),
        os.path.join(coco_dir, "images"),
        coco_dir,
    ]


def resolve_image_dir(
    coco_dir: str, split: str, images: Mapping[int, dict], image_dir: str | None = None
) -> str:
    """The first candidate folder (or `image_dir`, if given) holding every image file of the
    split; raises naming the folders tried, how many files each holds, and the option to use."""
    candidates = [image_dir] if image_dir else image_dir_candidates(coco_dir, split)
    missing_by_folder = {}
    for folder in candidates:
        missing = [
            (image_id, os.path.join(folder, image["file_name"]))
            for image_id, image in sorted(images.items())
            if not os.path.isfile(os.path.join(folder, image["file_name"]))
        ]
        if not missing:
            return folder
        missing_by_folder[folder] = missing
    looked = "; ".join(
        f"{folder}/ ({len(images) - len(missing)} found)"
        for folder, missing in missing_by_folder.items()
    )
    fewest = min(missing_by_folder.values(), key=len)
    shown = ", ".join(f"{file} (image id {image_id})" for image_id, file in fewest[:5])
    raise CocoFormatError(
        f"split {split}: {len(fewest)} of {len(images)} image files are missing, e.g. {shown}; "
        f"looked for each file_name under {looked}. Put the images there (COCO 2017: unzip "
        f"{split}.zip inside coco_dir) or pass --image-dir {split}=FOLDER naming the folder the "
        "file_names are relative to."
    )


def load_split(coco_dir: str, split: str, image_dir: str | None = None) -> SplitPlan:
    """Reads and validates one split's annotation files (see the module docstring); its images
    are looked up in `image_dir` if given, else in `image_dir_candidates`."""
    report = SplitReport()
    cocos: dict[str, COCO] = {}
    for kind in ANNOTATION_KINDS:
        path = os.path.join(coco_dir, "annotations", f"{kind}_{split}.json")
        if os.path.exists(path):
            cocos[kind] = _load_coco(path)
            report.annotation_files.append(path)
    if not cocos:
        raise CocoFormatError(f"{coco_dir}/annotations has no annotation file for split {split}")

    images: dict[int, dict] = {}
    categories: dict[int, dict] = {}
    for kind, coco in cocos.items():
        path = os.path.join(coco_dir, "annotations", f"{kind}_{split}.json")
        _merge_images(images, coco, path)
        _check_ids_unique(coco.dataset.get("annotations", []), path, "annotation")
        if kind != "captions":
            _merge_categories(categories, coco, path)

    annotations: dict[int, dict] = {}  # annotation id -> cleaned annotation
    instance_records: dict[int, dict] = {}  # annotation id -> the instances file's record
    for kind in ("instances", "person_keypoints"):
        if kind not in cocos:
            continue
        path = os.path.join(coco_dir, "annotations", f"{kind}_{split}.json")
        for annotation in cocos[kind].dataset.get("annotations", []):
            _check_references(annotation, images, categories, path)
            has_keypoints = kind == "person_keypoints" or "keypoints" in annotation
            keypoints = _check_keypoints(annotation, path) if has_keypoints else None
            instance = instance_records.get(annotation["id"])
            if instance is not None:  # a person of the instances file: add its keypoints
                _check_same_object(instance, annotation, path)
                if annotation["id"] in annotations:  # else skipped (and counted) already
                    annotations[annotation["id"]]["keypoints"] = keypoints
                continue
            if kind == "instances":
                instance_records[annotation["id"]] = annotation
            cleaned = _clean_annotation(annotation, images[annotation["image_id"]], path, report)
            if cleaned is not None:
                annotations[annotation["id"]] = {**cleaned, "keypoints": keypoints}

    per_image: dict[int, list[dict]] = collections.defaultdict(list)
    for annotation in sorted(annotations.values(), key=lambda a: a["id"]):
        per_image[annotation["image_id"]].append(annotation)
    report.annotations = len(annotations)

    captions: dict[int, list[str]] = collections.defaultdict(list)
    if "captions" in cocos:
        path = os.path.join(coco_dir, "annotations", f"captions_{split}.json")
        for annotation in cocos["captions"].dataset.get("annotations", []):
            _check_references(annotation, images, None, path)
            text = _require(
                annotation, "caption", path, f"annotation id {annotation['id']}", (str,)
            )
            if not text.strip():
                report.count("skipped", "empty_caption", annotation["id"])
                continue
            captions[annotation["image_id"]].append(text.strip())
            report.captions += 1

    if not images:
        raise CocoFormatError(
            f"split {split}: {', '.join(report.annotation_files)} list no images; add image "
            "records under 'images' or remove the files."
        )
    image_dir = resolve_image_dir(coco_dir, split, images, image_dir)
    report.image_dir = os.path.abspath(image_dir)
    report.images = len(images)
    return SplitPlan(split, image_dir, images, dict(per_image), dict(captions), categories, report)


def read_image_file(path: str, image: Mapping[str, Any]) -> tuple[bytes, bool]:
    """The file's bytes (re-encoded as RGB PNG only if not RGB/greyscale) and whether re-encoded.

    Decodes fully to catch corrupt files and checks the size against the JSON record.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as pil_image:
            pil_image.load()
            mode, image_format, size = pil_image.mode, pil_image.format, pil_image.size
            if mode not in _PASSTHROUGH_MODES or image_format not in _PASSTHROUGH_FORMATS:
                buffer = io.BytesIO()
                pil_image.convert("RGB").save(buffer, format="PNG")
                data = buffer.getvalue()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise CocoFormatError(
            f"{path} (image id {image['id']}) is not a readable image ({error}); re-download it "
            "or remove its records from the annotation files."
        ) from error
    if size != (image["width"], image["height"]):
        raise CocoFormatError(
            f"{path} (image id {image['id']}) is {size[0]}x{size[1]} (width x height) but the "
            f"annotation files say {image['width']}x{image['height']}; fix the JSON or the file."
        )
    reencoded = mode not in _PASSTHROUGH_MODES or image_format not in _PASSTHROUGH_FORMATS
    return data, reencoded


def _object_features(
    annotation: dict, image: dict, label: int, name: str
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """One object's features and its polygons as (y, x) normalized [K, 2] arrays."""
    height, width = image["height"], image["width"]
    x0, y0, x1, y1 = annotation["box_xyxy"]
    if annotation["rle"] is not None and isinstance(annotation["rle"]["counts"], list):
        rle = mask_utils.frPyObjects(annotation["rle"], height, width)  # uncompressed -> bytes
    elif annotation["rle"] is not None:  # already compressed, as pycocotools' annToRLE takes it
        rle = {"size": [height, width], "counts": annotation["rle"]["counts"].encode()}
    elif annotation["polygons"]:
        rle = mask_utils.merge(mask_utils.frPyObjects(annotation["polygons"], height, width))
    else:
        rle = None
    area = annotation["area"]
    if area is None:
        area = mask_utils.area(rle) if rle is not None else (x1 - x0) * (y1 - y0)
    keypoints = np.zeros((NUM_KEYPOINTS, 3), np.float32)  # [17, 3] (y, x, v)
    if annotation["keypoints"] is not None:
        xyv = np.asarray(annotation["keypoints"], np.float64).reshape(NUM_KEYPOINTS, 3)
        keypoints[:] = np.stack([xyv[:, 1] / height, xyv[:, 0] / width, xyv[:, 2]], axis=-1)
    scale = np.array([height, width], np.float64)
    polygons = [
        (np.asarray(p, np.float64).reshape(-1, 2)[:, ::-1] / scale).astype(np.float32)
        for p in annotation["polygons"]
    ]
    features = {
        "bbox": np.array([y0 / height, x0 / width, y1 / height, x1 / width], np.float32),
        "label": label,
        "category_id": annotation["category_id"],
        "id": annotation["id"],
        "is_crowd": annotation["is_crowd"],
        "area": np.float32(area),
        "mask_rle": rle["counts"] if rle is not None else b"",
        "num_polygons": len(polygons),
        "keypoints": keypoints,
        "num_keypoints": int(np.sum(keypoints[:, 2] > 0)),
        "phrase": name,
    }
    return features, polygons


def example_for_image(
    plan: SplitPlan, image_id: int, label_of: Mapping[int, int], name_of: Mapping[int, str]
) -> dict[str, Any]:
    """The feature dict (see `navit_seq.data.features`) of one image of a validated split."""
    image = plan.images[image_id]
    path = os.path.join(plan.image_dir, image["file_name"])
    data, reencoded = read_image_file(path, image)
    if reencoded:
        plan.report.count("adjusted", "reencoded_image", image_id)
    objects, polygons = [], []
    for annotation in plan.annotations.get(image_id, []):
        category_id = annotation["category_id"]
        features, object_polygons = _object_features(
            annotation, image, label_of[category_id], name_of[category_id]
        )
        objects.append(features)
        polygons.extend(object_polygons)
    return {
        "image": data,
        "image_id": image_id,
        "objects": _stack_objects(objects),
        "polygon_points": (
            np.concatenate(polygons) if polygons else np.zeros((0, 2), np.float32)
        ),  # [P, 2]
        "polygon_sizes": np.array([len(p) for p in polygons], np.int32),  # [Q]
        "captions": plan.captions.get(image_id, []),
    }


def _stack_objects(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """A list of per-object dicts as a dict of per-field lists (also right for zero objects)."""
    empty = {
        "bbox": np.zeros((0, 4), np.float32),
        "keypoints": np.zeros((0, NUM_KEYPOINTS, 3), np.float32),
    }
    fields = (
        "bbox label category_id id is_crowd area mask_rle num_polygons keypoints "
        "num_keypoints phrase"
    ).split()
    if not objects:
        return {f: empty.get(f, []) for f in fields}
    return {f: [o[f] for o in objects] for f in fields}


class CocoFormatBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder over validated split plans; make one with `coco_format_builder`.

    Not registered with TFDS: the dataset's name is chosen per folder, and reading needs no
    code (`tfds.data_source(name, data_dir=...)` reads the prepared files).
    """

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "COCO-format folder with the navit_seq example features."}

    def __init__(
        self,
        *,
        coco_dir: str,
        plans: Mapping[str, SplitPlan],
        categories: Sequence[Mapping[str, Any]],
        vocab_size: int = DEFAULT_VOCAB_SIZE,
        **kwargs: Any,
    ):
        self._coco_dir = coco_dir
        self._vocab_size = vocab_size
        self.plans = dict(plans)
        self._categories = sorted(categories, key=lambda c: c["id"])
        self._label_of = {c["id"]: index for index, c in enumerate(self._categories)}
        self._name_of = {c["id"]: c["name"] for c in self._categories}
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                f"COCO-format dataset read from {self._coco_dir} with pycocotools; features "
                "as in navit_seq.data.features (label = index in category-id order)."
            ),
            features=example_features([c["name"] for c in self._categories]),
            homepage="https://cocodataset.org",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # the data is local
        return {split: self._generate_examples(plan) for split, plan in self.plans.items()}

    def _generate_examples(self, plan: SplitPlan) -> Iterator[tuple[int, dict[str, Any]]]:
        for image_id in common.with_progress(sorted(plan.images), plan.name, len(plan.images)):
            yield image_id, example_for_image(plan, image_id, self._label_of, self._name_of)

    def _download_and_prepare(self, dl_manager, download_config=None) -> None:
        super()._download_and_prepare(dl_manager, download_config)
        # Every split is written and self.data_dir is still TFDS's temporary folder, renamed
        # into place after this returns: the tokenizer and the report land atomically with it.
        sentences = tokenizer_sentences(self.plans, self._categories)
        if sentences:
            text.train_sentencepiece(
                sentences,
                os.path.join(self.data_dir, text.SENTENCEPIECE_FILENAME),
                vocab_size=self._vocab_size,
            )
        report = {
            "name": self.name,
            "coco_dir": os.path.abspath(self._coco_dir),
            "class_names": [c["name"] for c in self._categories],
            "category_ids": [c["id"] for c in self._categories],
            "sentencepiece_model": text.SENTENCEPIECE_FILENAME if sentences else None,
            "splits": {split: plan.report.as_dict() for split, plan in self.plans.items()},
        }
        with open(os.path.join(self.data_dir, REPORT_FILE), "w") as f:
            json.dump(report, f, indent=2)


def tokenizer_sentences(
    plans: Mapping[str, SplitPlan], categories: Sequence[Mapping[str, Any]]
) -> list[str]:
    """Text the dataset's SentencePiece model is trained on: the captions of the training
    splits (names containing "train"; every split if none does) and the category names."""
    train_splits = [split for split in plans if "train" in split] or list(plans)
    captions = [
        caption
        for split in train_splits
        for image_captions in plans[split].captions.values()
        for caption in image_captions
    ]
    return captions + [c["name"] for c in categories]


def coco_format_builder(
    coco_dir: str,
    data_dir: str,
    *,
    name: str = "coco_format",
    splits: Sequence[str] | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    image_dirs: Mapping[str, str] | None = None,
) -> CocoFormatBuilder:
    """Validates the folder's splits and returns a builder whose dataset is called `name`.

    `image_dirs`: {split: folder its file_names are relative to} for splits whose images are
    in none of `image_dir_candidates`.
    """
    common.check_dataset_name(name, CocoFormatError)
    available = discover_splits(coco_dir)
    badly_named = [split for split in splits or available if not re.fullmatch(r"\w+", split)]
    if badly_named:
        raise CocoFormatError(
            f"split names {badly_named} (from {coco_dir}/annotations/*_<split>.json) are not valid "
            "TFDS split names; rename the files so that <split> has only letters, digits and _."
        )
    splits = list(splits) if splits else available
    unknown = sorted(set(splits) - set(available))
    if unknown:
        raise CocoFormatError(
            f"splits {unknown} have no annotation file in {coco_dir}/annotations; "
            f"available: {available}."
        )
    image_dirs = dict(image_dirs or {})
    not_built = sorted(set(image_dirs) - set(splits))
    if not_built:
        raise CocoFormatError(
            f"--image-dir names splits {not_built} that are not being built; the splits are "
            f"{splits} (from {coco_dir}/annotations/*_<split>.json)."
        )
    for split, folder in image_dirs.items():
        if not os.path.isdir(folder):
            raise CocoFormatError(
                f"--image-dir {split}={folder}: no such folder; name the folder that holds "
                f"split {split}'s images."
            )
    plans = {split: load_split(coco_dir, split, image_dirs.get(split)) for split in splits}
    categories: dict[int, dict] = {}
    for plan in plans.values():
        for category in plan.categories.values():
            previous = categories.setdefault(category["id"], category)
            if previous != category:
                raise CocoFormatError(
                    f"category id {category['id']} is {category} in split {plan.name} but "
                    f"{previous} in another split; every split must use the same categories."
                )
    names = [c["name"] for c in categories.values()]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise CocoFormatError(
            f"{coco_dir}: category names {duplicated} are used by more than one category id; "
            "class names must be unique (rename them in the 'categories' lists)."
        )
    return common.named_builder(
        CocoFormatBuilder,
        name,
        coco_dir=coco_dir,
        plans=plans,
        categories=list(categories.values()),
        vocab_size=vocab_size,
        data_dir=data_dir,
    )


def build(
    coco_dir: str,
    data_dir: str,
    *,
    name: str = "coco_format",
    splits: Sequence[str] | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    image_dirs: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Builds the COCO-format folder as TFDS dataset `name` in `data_dir` (ArrayRecord).

    Returns the report (per split: the image folder, images, annotations, captions, counted
    skips and adjustments by reason), also written as `build_report.json` in the dataset's
    folder next to the SentencePiece model trained on its text. An existing build is reused,
    not redone. `image_dirs`: see `coco_format_builder`.
    """
    builder = coco_format_builder(
        coco_dir, data_dir, name=name, splits=splits, vocab_size=vocab_size, image_dirs=image_dirs
    )
    return common.prepare_and_report(builder, name, CocoFormatError)
