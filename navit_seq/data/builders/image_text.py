"""Folder of (image, caption) pairs -> TFDS dataset (ArrayRecord) with the shared example
features (captions filled, no objects), for image-text contrastive pretraining.

Folder layout (one JSON Lines file per split):

    <folder>/captions_<split>.jsonl   one object per line:
        {"image": "images/0001.jpg", "caption": "a dog on a sofa"}
        {"image": "images/0001.jpg", "captions": ["a brown dog", "a sofa"], "id": 17}
    <folder>/<image paths>           images, paths relative to <folder>

Lines naming the same image merge their captions in file order; `id` (optional, an integer)
is the image id, else the image's order of first appearance in its file. JPEG and PNG files in
RGB or greyscale are stored as they are; other files PIL reads are converted to RGB PNG
(counted under `adjusted/reencoded_image`). `<data_dir>/<name>/1.0.0/` also holds
`build_report.json` and a `sentencepiece.model` trained on the training splits' captions
(split names containing "train"; every split if none does).

Bad input:
- Error (`ImageTextFormatError`, naming the file and line): no captions_<split>.jsonl, a line
  that is not a JSON object, no "image" string, "caption"/"captions" missing or not strings,
  an "id" that is not an integer or names two images, a split left without examples.
- Counted skip (listed by reason in the report, with up to 20 image paths each):
  `missing_image` (no such file), `corrupt_image` (PIL cannot decode it), `empty_caption`
  (blank caption dropped), `image_without_caption` (every caption of the image was blank).
"""

import collections
import dataclasses
import io
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from navit_seq.data import text
from navit_seq.data.builders import common
from navit_seq.data.features import NUM_KEYPOINTS, example_features

DATASET_VERSION = "1.0.0"
REPORT_FILE = common.REPORT_FILE
CAPTIONS_PATTERN = re.compile(r"^captions_(\w+)\.jsonl$")
# Caption vocabularies of real image-text data need thousands of pieces; small folders shrink it.
DEFAULT_VOCAB_SIZE = 8000
MAX_REPORTED_PATHS = 20
_PASSTHROUGH_MODES = ("RGB", "L")
_PASSTHROUGH_FORMATS = ("JPEG", "PNG")


class ImageTextFormatError(ValueError):
    """Bad input in an image-text folder; the message names the file, the line and a fix."""


@dataclasses.dataclass
class SplitPlan:
    """A parsed split: image path -> (image id, captions), plus its counts."""

    name: str
    images: dict[str, tuple[int, list[str]]]
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    adjusted: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    written_images: int = 0
    written_captions: int = 0

    def count(self, kind: str, reason: str, path: str) -> None:
        """Counts one skip (`kind="skipped"`) or adjustment and remembers a few paths."""
        getattr(self, kind)[reason] += 1
        paths = self.examples.setdefault(reason, [])
        if len(paths) < MAX_REPORTED_PATHS:
            paths.append(path)

    def report(self) -> dict[str, Any]:
        return {
            "images": self.written_images,
            "captions": self.written_captions,
            "skipped": dict(sorted(self.skipped.items())),
            "adjusted": dict(sorted(self.adjusted.items())),
            "example_paths": dict(sorted(self.examples.items())),
        }


def discover_splits(folder: str) -> list[str]:
    """Split names of the folder's `captions_<split>.jsonl` files."""
    if not os.path.isdir(folder):
        raise ImageTextFormatError(f"folder={folder!r} is not a directory.")
    splits = sorted(m.group(1) for f in os.listdir(folder) if (m := CAPTIONS_PATTERN.match(f)))
    if not splits:
        raise ImageTextFormatError(
            f"{folder} holds no captions_<split>.jsonl file; write one JSON object per line, "
            'e.g. {"image": "images/0001.jpg", "caption": "a dog"}, to captions_train.jsonl.'
        )
    return splits


def _line_captions(record: Mapping[str, Any], where: str) -> list[str]:
    if "captions" in record:
        captions = record["captions"]
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise ImageTextFormatError(f"{where}: 'captions' must be a list of strings.")
        return captions
    if "caption" in record:
        if not isinstance(record["caption"], str):
            raise ImageTextFormatError(f"{where}: 'caption' must be a string.")
        return [record["caption"]]
    raise ImageTextFormatError(f"{where}: no 'caption' (a string) or 'captions' (a list).")


def load_split(folder: str, split: str) -> SplitPlan:
    """Parses captions_<split>.jsonl, checks every line, counts missing images and blank
    captions (skipped), and returns the images to write."""
    path = os.path.join(folder, f"captions_{split}.jsonl")
    plan = SplitPlan(split, {})
    captions_of: dict[str, list[str]] = {}
    id_of: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            where = f"{path}:{number}"
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ImageTextFormatError(f"{where}: not valid JSON ({error}).") from error
            if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                raise ImageTextFormatError(
                    f'{where}: each line must be an object with an "image" path string, e.g. '
                    '{"image": "images/0001.jpg", "caption": "a dog"}.'
                )
            image, captions = record["image"], _line_captions(record, where)
            if "id" in record:
                if not isinstance(record["id"], int) or isinstance(record["id"], bool):
                    raise ImageTextFormatError(f"{where}: 'id' must be an integer.")
                if id_of.setdefault(image, record["id"]) != record["id"]:
                    raise ImageTextFormatError(
                        f"{where}: image {image!r} has id {record['id']} here but "
                        f"{id_of[image]} on an earlier line; give each image one id."
                    )
            captions_of.setdefault(image, []).extend(captions)
    owners: dict[int, str] = {}
    for order, (image, captions) in enumerate(captions_of.items()):
        image_id = id_of.get(image, order)
        if owners.setdefault(image_id, image) != image:
            raise ImageTextFormatError(
                f"{path}: id {image_id} names both {owners[image_id]!r} and {image!r} (ids "
                "default to the order of first appearance); give every image a distinct id."
            )
        kept = [c.strip() for c in captions if c.strip()]
        for _ in range(len(captions) - len(kept)):
            plan.count("skipped", "empty_caption", image)
        if not kept:
            plan.count("skipped", "image_without_caption", image)
        elif not os.path.isfile(os.path.join(folder, image)):
            plan.count("skipped", "missing_image", image)
        else:
            plan.images[image] = (image_id, kept)
    if not plan.images:
        raise ImageTextFormatError(
            f"{path}: no image with a caption and an existing file is left (skipped: "
            f"{dict(plan.skipped)}); fix the paths or the captions."
        )
    return plan


def read_image(path: str) -> tuple[bytes, bool] | None:
    """The file's bytes (re-encoded as RGB PNG unless JPEG/PNG in RGB or greyscale) and whether
    re-encoded; None when PIL cannot decode it."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as pil_image:
            pil_image.load()  # decode fully: truncated files fail here, not in training
            passthrough = (
                pil_image.mode in _PASSTHROUGH_MODES and pil_image.format in _PASSTHROUGH_FORMATS
            )
            if not passthrough:
                buffer = io.BytesIO()
                pil_image.convert("RGB").save(buffer, format="PNG")
                data = buffer.getvalue()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    return data, not passthrough


def _no_objects() -> dict[str, Any]:
    """The `objects` of an image without annotations (every field, zero entries)."""
    fields = "label category_id id is_crowd area mask_rle num_polygons num_keypoints phrase"
    return {
        "bbox": np.zeros((0, 4), np.float32),
        "keypoints": np.zeros((0, NUM_KEYPOINTS, 3), np.float32),
        **{field: [] for field in fields.split()},
    }


class ImageTextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder over parsed split plans; make one with `image_text_builder`."""

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Image-caption folder with the navit_seq example features."}

    def __init__(
        self,
        *,
        folder: str,
        plans: Mapping[str, SplitPlan],
        vocab_size: int = DEFAULT_VOCAB_SIZE,
        **kwargs: Any,
    ):
        self._folder = folder
        self._vocab_size = vocab_size
        self.plans = dict(plans)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"(image, caption) pairs read from {self._folder}; no objects.",
            features=example_features(class_names=[]),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # the data is local
        return {split: self._generate_examples(plan) for split, plan in self.plans.items()}

    def _generate_examples(self, plan: SplitPlan) -> Iterator[tuple[int, dict[str, Any]]]:
        images = sorted(plan.images.items(), key=lambda item: item[1][0])
        for image, (image_id, captions) in common.with_progress(images, plan.name, len(images)):
            read = read_image(os.path.join(self._folder, image))
            if read is None:
                plan.count("skipped", "corrupt_image", image)
                continue
            data, reencoded = read
            if reencoded:
                plan.count("adjusted", "reencoded_image", image)
            plan.written_images += 1
            plan.written_captions += len(captions)
            yield (
                image_id,
                {
                    "image": data,
                    "image_id": image_id,
                    "objects": _no_objects(),
                    "polygon_points": np.zeros((0, 2), np.float32),
                    "polygon_sizes": np.zeros((0,), np.int32),
                    "captions": captions,
                },
            )
        if not plan.written_images:
            raise ImageTextFormatError(
                f"split {plan.name!r}: every image was skipped ({dict(plan.skipped)}); "
                "replace the corrupt files."
            )

    def _download_and_prepare(self, dl_manager, download_config=None) -> None:
        super()._download_and_prepare(dl_manager, download_config)
        # self.data_dir is still TFDS's temporary folder, renamed into place after this
        # returns: the tokenizer and the report land atomically with the dataset.
        text.train_sentencepiece(
            tokenizer_sentences(self.plans),
            os.path.join(self.data_dir, text.SENTENCEPIECE_FILENAME),
            vocab_size=self._vocab_size,
        )
        report = {
            "name": self.name,
            "folder": os.path.abspath(self._folder),
            "sentencepiece_model": text.SENTENCEPIECE_FILENAME,
            "splits": {split: plan.report() for split, plan in self.plans.items()},
        }
        with open(os.path.join(self.data_dir, REPORT_FILE), "w") as f:
            json.dump(report, f, indent=2)


def tokenizer_sentences(plans: Mapping[str, SplitPlan]) -> list[str]:
    """Captions of the training splits (names containing "train"; every split if none does)."""
    train_splits = [split for split in plans if "train" in split] or list(plans)
    return [
        caption
        for split in train_splits
        for _, captions in plans[split].images.values()
        for caption in captions
    ]


def image_text_builder(
    folder: str,
    data_dir: str,
    *,
    name: str = "image_text",
    splits: Sequence[str] | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> ImageTextBuilder:
    """Parses the folder's splits and returns a builder whose dataset is called `name`."""
    common.check_dataset_name(name, ImageTextFormatError)
    available = discover_splits(folder)
    splits = list(splits) if splits else available
    unknown = sorted(set(splits) - set(available))
    if unknown:
        raise ImageTextFormatError(
            f"splits {unknown} have no captions_<split>.jsonl in {folder}; available: {available}."
        )
    plans = {split: load_split(folder, split) for split in splits}
    return common.named_builder(
        ImageTextBuilder, name, folder=folder, plans=plans, vocab_size=vocab_size, data_dir=data_dir
    )


def build(
    folder: str,
    data_dir: str,
    *,
    name: str = "image_text",
    splits: Sequence[str] | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> dict[str, Any]:
    """Builds the folder as TFDS dataset `name` in `data_dir` (ArrayRecord); returns the report
    (per split: images, captions, counted skips and adjustments), also written as
    `build_report.json` next to the SentencePiece model. An existing build is reused."""
    builder = image_text_builder(folder, data_dir, name=name, splits=splits, vocab_size=vocab_size)
    return common.prepare_and_report(builder, name, ImageTextFormatError)
